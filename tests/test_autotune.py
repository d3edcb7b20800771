"""executor="auto": the pick follows measurements, the env override wins, the probe is harmless."""
import math
import time
import warnings

import pytest
import torch

import fastmoe_adv as fm
from fastmoe_adv import autotune


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(autotune.ENV_VAR, raising=False)
    monkeypatch.setattr(autotune, "PROBE_SETTINGS", autotune.ProbeSettings())
    autotune.clear()
    yield
    autotune.clear()


def _engine(width=2, experts=3):
    return fm.GroupedResNet18(num_experts=experts, num_classes=10, width=width, executor="auto")


def _fake_timer(seconds, calls=None):
    """A timer that reports ``seconds[executor]`` without running the pass."""
    def timer(run, executor):
        if calls is not None:
            calls.append(executor)
        return seconds[executor]
    return timer


def _state(engine):
    buffers = {k: v.clone() for k, v in engine.named_buffers()}
    grads = {k: (None if p.grad is None else p.grad.clone()) for k, p in engine.named_parameters()}
    return buffers, grads


def _assert_same_state(engine, before):
    buffers, grads = before
    for k, v in engine.named_buffers():
        assert torch.equal(v, buffers[k]), f"buffer {k} changed"
    for k, p in engine.named_parameters():
        if grads[k] is None:
            assert p.grad is None, f"{k}.grad was written"
        else:
            assert torch.equal(p.grad, grads[k]), f"{k}.grad changed"


# ----------------------------------------------------------------------------- CPU table
def test_cpu_table_is_total():
    rows = autotune.CPU_TABLE
    assert all(r.executor in autotune.CHOICES for r in rows)
    last = rows[-1]
    assert set(last.passes) == {"fwd", "bwd-input", "bwd-params"} and last.min_batch == 0 and last.min_work == 0


@pytest.mark.parametrize("width, batch, passes, expected", [
    (4, 4, "bwd-params", "grouped"), (8, 32, "bwd-params", "grouped"), (16, 64, "bwd-params", "loop"),
    (8, 32, "fwd", "grouped"), (8, 64, "fwd", "loop"), (8, 16, "fwd", "grouped"), (32, 8, "bwd-params", "grouped"),
    (16, 32, "bwd-input", "loop"), (8, 32, "bwd-input", "grouped")])
def test_cpu_table_follows_the_measurements(width, batch, passes, expected):
    # The table rows encode the measurements in autotune.py's comment; the benchmark's report
    # checks them on the machine at hand.
    key = ("cpu", 9, 9, True, width, batch, 32, 32, "float32", "0123", "0123", "off", True, passes, None)
    assert autotune._from_table(key, autotune.CPU_TABLE).executor == expected


def _min_time(fn, reps):
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_cpu_auto_picks_the_measured_faster_executor():
    # Measured here, at a small size: the pick must be the faster one, or within 10% of it.
    # Min over interleaved repetitions: on a shared machine, noise only ever adds time.
    engine = _engine(width=4, experts=9)
    x = torch.rand(2, 3, 16, 16)
    params = list(engine.parameters())

    def step(executor):
        out = engine(x, executor=executor)
        torch.autograd.grad(out.sum(), params)

    for e in autotune.CHOICES:
        step(e)  # warm up (oneDNN primitive creation)
    times = {e: math.inf for e in autotune.CHOICES}
    for _ in range(3):
        for e in autotune.CHOICES:
            times[e] = min(times[e], _min_time(lambda: step(e), 1))
    pick = autotune.pick_executor(engine, x)
    faster = min(times, key=times.get)
    assert pick == faster or times[pick] <= 1.10 * times[faster], (pick, times, autotune.explain())
    assert autotune.decisions()[-1].source == "table"


def test_cpu_pick_is_deterministic_and_recorded():
    engine = _engine()
    x = torch.rand(2, 3, 8, 8)
    assert len({autotune.pick_executor(engine, x) for _ in range(3)}) == 1
    (d,) = autotune.decisions()
    assert d.source == "table" and "CPU table" in d.reason
    assert "pass=bwd-params" in autotune.explain() and "width=2" in autotune.explain()


# ----------------------------------------------------------------------------- env override
@pytest.mark.parametrize("forced", ["grouped", "loop"])
def test_env_override(monkeypatch, forced):
    engine = _engine()
    x = torch.rand(2, 3, 8, 8)
    monkeypatch.setenv(autotune.ENV_VAR, forced.upper())
    assert autotune.pick_executor(engine, x) == forced
    assert engine.resolve_executor(x) == forced
    assert autotune.decisions()[-1].source == "env"
    # An explicit executor still beats the environment.
    assert engine.resolve_executor(x, "grouped" if forced == "loop" else "loop") != forced


def test_env_override_rejects_unknown(monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="FASTMOE_EXECUTOR"):
        autotune.pick_executor(_engine(), torch.rand(2, 3, 8, 8))


# ----------------------------------------------------------------------------- the probe
@pytest.mark.parametrize("faster", ["grouped", "loop"])
def test_probe_picks_the_faster_and_caches(monkeypatch, faster):
    monkeypatch.setenv(autotune.ENV_VAR, "probe")  # probe on CPU, as on CUDA
    calls = []
    slow = "loop" if faster == "grouped" else "grouped"
    autotune.PROBE_SETTINGS.runs, autotune.PROBE_SETTINGS.warmup = 3, 0
    autotune.PROBE_SETTINGS.timer = _fake_timer({faster: 1.0, slow: 1.5}, calls)
    engine = _engine()
    x = torch.rand(2, 3, 8, 8)
    assert autotune.pick_executor(engine, x) == faster
    assert sorted(calls) == sorted(["grouped", "loop"] * 3)
    d = autotune.decisions()[-1]
    assert d.source == "probe" and d.timings == {faster: 1.0, slow: 1.5}
    assert "1.50x" in d.reason
    # Cached: the same shape does not probe again; another shape does.
    assert engine(x).shape == (2, 3, 10)
    assert len(calls) == 6
    autotune.pick_executor(engine, torch.rand(3, 3, 8, 8))
    assert len(calls) == 12


def test_probe_key_separates_pass_kinds_and_layouts(monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, "probe")
    autotune.PROBE_SETTINGS.runs, autotune.PROBE_SETTINGS.warmup = 1, 0
    autotune.PROBE_SETTINGS.timer = _fake_timer({"grouped": 1.0, "loop": 2.0})
    engine = _engine()
    x = torch.rand(2, 3, 8, 8)
    autotune.pick_executor(engine, x)                                   # training pass
    with torch.no_grad():
        autotune.pick_executor(engine, x)                               # forward only
    autotune.pick_executor(engine, x.clone().requires_grad_(True))      # attack step
    autotune.pick_executor(engine, x.contiguous(memory_format=torch.channels_last))
    engine.eval()
    autotune.pick_executor(engine, x)
    autotune.pick_executor(engine, torch.rand(2, 3, 3, 8, 8))           # per-expert input
    keys = [dict(zip(autotune._KEY_FIELDS, d.key)) for d in autotune.decisions()]
    assert len(keys) == 6
    assert [k["pass"] for k in keys[:3]] == ["bwd-params", "fwd", "bwd-input"]
    assert keys[3]["x_layout"] == "0231" and keys[0]["x_layout"] == "0123"
    assert keys[4]["bn_train"] is False and keys[5]["shared_input"] is False


@pytest.mark.parametrize("needs_input_grad", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_probe_leaves_bn_stats_and_grads_untouched(needs_input_grad, training):
    engine = _engine().train(training)
    # Some parameters carry a gradient already (mid-accumulation), the rest have none.
    for i, p in enumerate(engine.parameters()):
        if i % 3 == 0:
            p.grad = torch.randn_like(p)
    with torch.no_grad():  # non-trivial running stats
        for name, b in engine.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    before = _state(engine)
    x = torch.rand(2, 3, 8, 8).requires_grad_(needs_input_grad)
    timings = autotune.probe(engine, x, runs=1, warmup=1)
    assert set(timings) == {"grouped", "loop"} and all(t > 0 for t in timings.values())
    _assert_same_state(engine, before)
    assert engine.training is training
    assert x.grad is None


def test_probe_state_restored_on_error():
    engine = _engine()
    before = _state(engine)

    def boom(run, executor):
        run()
        raise RuntimeError("timer failed")

    with pytest.raises(RuntimeError, match="timer failed"):
        autotune.probe(engine, torch.rand(2, 3, 8, 8), runs=1, warmup=0, timer=boom)
    _assert_same_state(engine, before)


def test_probe_survives_out_of_memory_of_one_executor():
    def timer(run, executor):
        if executor == "grouped":
            raise torch.cuda.OutOfMemoryError("fake OOM")
        run()
        return 1.0

    timings = autotune.probe(_engine(), torch.rand(2, 3, 8, 8), runs=2, warmup=0, timer=timer)
    assert math.isinf(timings["grouped"]) and timings["loop"] == 1.0


def test_no_probe_inside_compile_warns_and_does_not_cache(monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, "probe")
    monkeypatch.setattr(autotune, "_is_compiling", lambda: True)
    calls = []
    autotune.PROBE_SETTINGS.timer = _fake_timer({"grouped": 2.0, "loop": 1.0}, calls)
    engine = _engine()
    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="cannot time"):
        assert autotune.pick_executor(engine, x) == "grouped"
    assert calls == [] and not autotune._PROBED
    monkeypatch.setattr(autotune, "_is_compiling", lambda: False)
    autotune.PROBE_SETTINGS.runs, autotune.PROBE_SETTINGS.warmup = 1, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autotune.pick_executor(engine, x) == "loop"


def test_auto_forward_matches_picked_executor():
    engine = _engine().eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out = engine(x)
        ref = engine(x, executor=autotune.decisions()[-1].executor)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_probes_once_and_picks_the_faster():
    engine = _engine(width=8, experts=9).cuda().train()
    x = torch.rand(8, 3, 32, 32, device="cuda")
    before = _state(engine)
    autotune.PROBE_SETTINGS.runs, autotune.PROBE_SETTINGS.warmup = 3, 1
    pick = autotune.pick_executor(engine, x)
    d = autotune.decisions()[-1]
    assert d.source == "probe" and pick == min(d.timings, key=d.timings.get)
    assert dict(zip(autotune._KEY_FIELDS, d.key))["device"] == torch.cuda.get_device_name()
    _assert_same_state(engine, before)
    # The cached decision is reused: a forward does not probe again.
    autotune.PROBE_SETTINGS.timer = lambda run, executor: pytest.fail("probed twice")
    assert engine(x).shape == (8, 9, 10)


# ----------------------------------------------------------------------------- bn_backend="auto"
def test_bn_auto_on_cpu_is_torch_and_recorded():
    engine = _engine()
    engine.bn_backend = "auto"
    x = torch.rand(2, 3, 8, 8)
    out = engine(x)
    engine.bn_backend = "torch"
    assert torch.equal(out, engine(x))
    bn = [d for d in autotune.decisions() if d.kind == "bn_backend"]
    assert [d.executor for d in bn] == ["torch"] and bn[0].source == "table"
    assert bn[0].describe().startswith("bn_backend torch [table]") and "for_executor=" in bn[0].describe()


@pytest.mark.parametrize("faster", ["torch", "triton"])
def test_bn_auto_probes_both_backends_with_the_picked_executor(monkeypatch, faster):
    """FASTMOE_EXECUTOR=probe measures on CPU as on CUDA (the fused op runs under the Triton
    interpreter here): the faster backend is used, once probed per shape and executor."""
    monkeypatch.setenv(autotune.ENV_VAR, "probe")
    calls = []
    slow = "triton" if faster == "torch" else "torch"
    autotune.PROBE_SETTINGS.runs, autotune.PROBE_SETTINGS.warmup = 2, 0
    autotune.PROBE_SETTINGS.timer = _fake_timer({faster: 1.0, slow: 3.0, "grouped": 1.0, "loop": 2.0}, calls)
    engine = _engine()
    engine.bn_backend = "auto"
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out = engine(x)
        assert sorted(calls) == sorted(["grouped", "loop"] * 2 + ["torch", "triton"] * 2)
        engine(x)
        assert len(calls) == 8                             # cached: no second probe
        bn = [d for d in autotune.decisions() if d.kind == "bn_backend"][-1]
        assert bn.executor == faster and bn.source == "probe" and bn.key[-1] == "grouped"
        want = engine._forward(x, None, "grouped", faster)
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)


def test_probe_with_candidates_times_each_label():
    engine = _engine()
    seen = []
    timings = autotune.probe(engine, torch.rand(2, 3, 8, 8), runs=1, warmup=0,
                             timer=lambda run, label: seen.append(label) or {"a": 2.0, "b": 1.0}[label],
                             candidates={"a": ("grouped", "torch"), "b": ("loop", "torch")})
    assert timings == {"a": 2.0, "b": 1.0} and seen == ["a", "b"]


def test_bn_auto_falls_back_to_torch_when_the_fused_op_fails(monkeypatch):
    """A fused kernel that fails on the device loses the probe (the error in the reason) instead
    of failing the forward: "auto" is never worse than "torch"."""
    monkeypatch.setenv(autotune.ENV_VAR, "probe")
    autotune.PROBE_SETTINGS.runs, autotune.PROBE_SETTINGS.warmup = 1, 1
    engine = _engine()
    engine.bn_backend = "auto"
    real = engine._forward

    def broken(x, experts=None, executor=None, bn_backend=None):
        if bn_backend == "triton":
            raise RuntimeError("no kernel image is available for execution on the device")
        return real(x, experts, executor, bn_backend)

    monkeypatch.setattr(engine, "_forward", broken)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out = engine(x)
        bn = [d for d in autotune.decisions() if d.kind == "bn_backend"][-1]
        assert bn.executor == "torch" and math.isinf(bn.timings["triton"])
        assert "triton failed: RuntimeError: no kernel image" in bn.reason
        engine.bn_backend = "torch"
        assert torch.equal(out, real(x))
