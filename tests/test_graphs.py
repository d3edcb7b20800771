"""fastmoe_adv.graphs and the graphed attack / training paths.

On CPU there are no CUDA graphs: graph sets run their bodies eagerly on the static buffers
("emulated"). These tests check that the graphed code paths (static buffers, device-side step
counter, per-span bodies, captured gradients fed to the optimizer) compute exactly what the
plain loops compute, that the cache keys see every change that would make a graph stale, and
that a failed capture falls back to the eager body. tests/test_graphs_cuda.py captures for real.
"""
import copy

import pytest
import torch
from helpers import tiny_train_config
from test_attacks import SyncCounter, data, small_moe

import fastmoe_adv as fm
from fastmoe_adv import attacks as A
from fastmoe_adv import graphs
from fastmoe_adv.train import steps as S
from fastmoe_adv.train.config import TrainConfig


@pytest.fixture(autouse=True)
def _fresh_graphs():
    graphs.clear()
    yield
    graphs.clear()


# ----------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("kw", [dict(), dict(norm="L2", loss="dlr", eps=0.3, alpha=0.1),
                                dict(loss="moe_gate", restarts=2), dict(random_start=False, steps=1)])
def test_graphed_pgd_is_the_plain_pgd_bit_for_bit(kw):
    moe, _ = small_moe()
    x, y = data(b=5)
    kw = dict(kw)
    eps, alpha, steps = kw.pop("eps", 0.03), kw.pop("alpha", 0.01), kw.pop("steps", 4)
    outs = [A.pgd(moe, x, y, eps, alpha, steps, generator=torch.Generator().manual_seed(3), graph=g, **kw)
            for g in (False, True)]
    assert (outs[0] - x).abs().max() > 0.5 * alpha        # the attack moved: the comparison is not vacuous
    assert torch.equal(outs[0], outs[1])
    assert all(r.status == "emulated" for r in graphs.records()) and graphs.records()


def test_graphed_fgsm_is_fgsm():
    moe, _ = small_moe()
    x, y = data(b=7)
    plain, graphed = A.fgsm(moe, x, y, 0.05), A.fgsm(moe, x, y, 0.05, graph=True)
    assert torch.equal(plain, graphed) and not torch.equal(plain, x)


def test_one_graph_set_serves_new_values_of_eps_alpha_and_images():
    moe, _ = small_moe()
    for seed, (eps, alpha) in enumerate([(0.03, 0.01), (0.05, 0.02), (0.01, 0.004)]):
        x, y = data(b=4, seed=seed)
        want = A.pgd(moe, x, y, eps, alpha, 3, random_start=False)
        assert torch.equal(A.pgd(moe, x, y, eps, alpha, 3, random_start=False, graph=True), want)
    assert len(graphs.records()) == 1        # one set, one body: the values live in static buffers


@pytest.mark.parametrize("executor", ["grouped", "loop"])
def test_graphed_attack_experts_matches_the_span_loop(executor):
    moe, _ = small_moe(executor=executor)
    x, y = data(b=5)
    plan = A.make_plan(moe.roles, [0.02, 0.04], [3, 5])   # spans: all, then the PGD pair, then the last one
    outs = [A.attack_experts(moe, x, y, plan, generator=torch.Generator().manual_seed(3), graph=g)
            for g in (False, True)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0][:, 4], outs[0][:, 3])
    bodies = sorted(r.body for r in graphs.records())
    assert bodies == ["('span', 1, 5)", "('span', 3, 5)", "('span', 4, 5)"], bodies


def test_graphed_attack_experts_on_per_expert_streams_and_a_second_call():
    moe, _ = small_moe()
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(4, 5, 3, 8, 8, generator=g), torch.randint(0, 10, (4, 5), generator=g)
    for steps in ([2, 4], [4, 1]):   # new step counts: the same set, the counter reset
        plan = A.make_plan(moe.roles, [0.03, 0.01], steps)
        outs = [A.attack_experts(moe, x, y, plan, generator=torch.Generator().manual_seed(1), graph=gr)
                for gr in (False, True)]
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("which", ["pgd", "experts"])
def test_no_host_sync_in_the_graphed_attack_loops(which):
    moe, _ = small_moe()
    x, y = data(b=2)

    def attack(steps):
        if which == "pgd":
            A.pgd(moe, x, y, 0.03, 0.01, steps, graph=True)
        else:
            A.attack_experts(moe, x, y, A.make_plan(moe.roles, 0.02, steps), graph=True)

    counts = []
    for steps in (1, 4):
        attack(steps)                    # first use of the set outside the count
        with SyncCounter() as c:
            attack(steps)
        counts.append(c.count)
    assert counts[0] == counts[1], counts


# ----------------------------------------------------------------------------- keys
def test_the_key_changes_with_everything_a_graph_records():
    moe, _ = small_moe()
    x, y = data(b=3)
    base = graphs.signature((moe,), (x, y), ("pgd",))
    assert graphs.signature((moe,), (x, y), ("pgd",)) == base
    assert graphs.signature((moe,), (x[:2], y[:2]), ("pgd",)) != base                        # shape
    assert graphs.signature((moe,), (x.double(), y), ("pgd",)) != base                       # dtype
    assert graphs.signature((moe,), (x.contiguous(memory_format=torch.channels_last), y), ("pgd",)) != base
    assert graphs.signature((moe.train(),), (x, y), ("pgd",)) != base                        # a module's mode
    moe.eval()
    moe.experts.executor = "loop"
    assert graphs.signature((moe,), (x, y), ("pgd",)) != base                                # executor
    moe.experts.executor = "grouped"
    moe.temperature = 2.0
    assert graphs.signature((moe,), (x, y), ("pgd",)) != base                                # a setting read in forward
    moe.temperature = 1.0
    assert graphs.signature((moe,), (x, y), ("pgd",)) == base
    moe.gate.fc.weight = torch.nn.Parameter(moe.gate.fc.weight.detach().clone())
    assert graphs.signature((moe,), (x, y), ("pgd",)) != base                                # a new parameter storage


def test_sets_are_kept_per_owner_and_the_oldest_dropped(monkeypatch):
    monkeypatch.setattr(graphs, "MAX_SETS", 2)
    moe, _ = small_moe()
    made = []
    for k in range(3):
        graphs.graph_set(moe, (k,), lambda k=k: made.append(k) or {"a": torch.zeros(1)})
    graphs.graph_set(moe, (2,), lambda: made.append("again") or {"a": torch.zeros(1)})
    graphs.graph_set(moe, (0,), lambda: made.append("0 again") or {"a": torch.zeros(1)})
    assert made == [0, 1, 2, "0 again"]


def test_a_failed_capture_runs_the_body_eagerly_once_warned(monkeypatch):
    moe, _ = small_moe()
    x, y = data(b=4)
    moe.experts.bn1.running_mean.add_(0.25)
    want = A.pgd(moe, x, y, 0.03, 0.01, 3, random_start=False)

    def fake_set(owner, key, make_buffers):
        gs = graphs.GraphSet(owner, key, make_buffers())
        gs.emulated = False             # pretend this is CUDA, and make the capture fail
        return gs

    def failing_capture(self, body):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.GraphSet, "_capture_graph", failing_capture)
    monkeypatch.setattr(graphs, "graph_set", fake_set)
    before = [b.clone() for b in moe.buffers()]
    with pytest.warns(RuntimeWarning, match="capture of FastSoftMoE.step failed"):
        got = A.pgd(moe, x, y, 0.03, 0.01, 3, random_start=False, graph=True)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(before, moe.buffers()))
    assert [r.status.split(":")[0] for r in graphs.records()] == ["failed"]
    assert "operation not permitted" in graphs.explain()


def test_capture_restores_what_the_warm_up_changed(monkeypatch):
    """The warm-up runs the body (BatchNorm statistics move in train mode, the static buffers
    step): the first real run must start from the state before it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    x = torch.rand(2, 3, 6, 6)
    gs = graphs.GraphSet(net, ("k",), {"x": x.clone(), "count": torch.zeros(())})
    gs.emulated = False

    def fake_capture(self, body):       # a warm-up that changes state, then "capture" = the body
        for _ in range(graphs.WARMUP):
            body()

        class Replay:
            def replay(self):
                body()

            def pool(self):
                return None
        return Replay(), None

    monkeypatch.setattr(graphs.GraphSet, "_capture_graph", fake_capture)
    stats = net[1].running_mean.clone()

    def body():
        net(gs.buf.x)
        gs.buf.count.add_(1)
        gs.buf.x.mul_(2)

    gs.run("b", body)
    assert gs.buf.count.item() == 1 and torch.allclose(gs.buf.x, 2 * x)
    ref = copy.deepcopy(net)
    ref[1].running_mean.copy_(stats)
    ref[1].running_var.fill_(1)
    ref[1].num_batches_tracked.zero_()
    ref(x)
    assert torch.allclose(net[1].running_mean, ref[1].running_mean) and net[1].num_batches_tracked.item() == 1


# ----------------------------------------------------------------------------- training steps
def _moe_and_opt(seed=0, executor="grouped"):
    torch.manual_seed(seed)
    moe = fm.FastSoftMoE(num_experts=3, num_classes=10, width=4, roles=["clean", "fgsm", "pgd"], executor=executor,
                         backend="torch")
    return moe, torch.optim.SGD(moe.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _state(moe):
    return {k: v.clone() for k, v in moe.state_dict().items()}


def _same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("executor", ["grouped", "loop"])
def test_graphed_phase1_steps_equal_the_plain_steps(executor):
    cfg = tiny_train_config(num_experts=3)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(6, 3, 3, 8, 8, generator=g), torch.randint(0, 10, (6, 3), generator=g)
    results = []
    for graph in (False, True):
        moe, _ = _moe_and_opt(executor=executor)
        net = S.ExpertsNet(moe)
        opt = torch.optim.SGD(moe.experts.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        choice, attack_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)
        out = []
        for _ in range(3):
            plan = S.draw_phase1_plan(list(moe.roles), cfg, choice)
            out.append(S.phase1_step(moe, net, opt, x, y, plan, attack_gen, graph=graph))
        results.append((out, _state(moe)))
    (plain, s0), (graphed, s1) = results
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, graphed))
    assert _same_state(s0, s1)
    assert not torch.equal(s0["experts.bn1.running_mean"], torch.zeros_like(s0["experts.bn1.running_mean"]))


@pytest.mark.parametrize("extra", [dict(), dict(gate_entropy_weight=0.1, gate_balance_weight=0.2),
                                   dict(train_experts=False, gate_lr_scale=3.0)])
def test_graphed_phase2_steps_equal_the_plain_steps(extra):
    cfg = tiny_train_config(num_experts=3, **extra)
    x, y = data(b=6, size=8, seed=3)
    attacks_ = [S.Phase2Attack("pgd", 0.03, 0.01, 2), S.Phase2Attack("fgsm", 0.02, 0.02, 1),
                S.Phase2Attack("pgd", 0.03, 0.01, 3)]
    results = []
    for graph in (False, True):
        moe, _ = _moe_and_opt()
        opt = torch.optim.SGD(S.optimizer_groups(moe, moe.parameters(), cfg, 2), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(7)
        out = [S.phase2_step(moe, moe, opt, x, y, a, cfg, gen, graph=graph) for a in attacks_]
        results.append((out, _state(moe)))
    (plain, s0), (graphed, s1) = results
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, graphed))
    assert _same_state(s0, s1)


def test_graphed_step_gradients_reach_the_optimizer():
    """The captured gradients are what the step applies: parameters move exactly as with backward()."""
    cfg = tiny_train_config(num_experts=3)
    x, y = data(b=4, size=8, seed=9)
    moe, opt = _moe_and_opt()
    before = _state(moe)
    S.phase2_step(moe, moe, opt, x, y, S.Phase2Attack("fgsm", 0.02, 0.02, 1), cfg, graph=True)
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], moe.state_dict()[k])]
    assert any(k.startswith("gate.") for k in moved) and any(k.startswith("experts.conv1") for k in moved)


def test_graph_steps_refuse_ddp_and_the_config_refuses_graphs_under_torchrun():
    cfg = tiny_train_config(num_experts=3)
    moe, opt = _moe_and_opt()
    fake_ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    x, y = data(b=4, size=8)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        S._update(fake_ddp, opt, x, y, lambda a, b: None, graph=True)
    from fastmoe_adv import distributed
    from fastmoe_adv.errors import ConfigError
    from fastmoe_adv.train.trainer import _check_runtime
    info = distributed.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="cuda_graphs"):
        _check_runtime(TrainConfig(**{**cfg.__dict__, "cuda_graphs": True, "batch_size": 16}), info)


def test_a_tiny_run_with_cuda_graphs_ends_where_the_plain_run_ends(tmp_path):
    """Both phases graphed, or only phase 2 (cuda_graphs may change between phases and on
    resume: it does not change the trajectory)."""
    from fastmoe_adv.train import pretrain, train
    finals = []
    for name, (graph1, graph2) in {"plain": (False, False), "graphed": (True, True), "mixed": (False, True)}.items():
        out = tmp_path / name
        pretrain(tiny_train_config(cuda_graphs=graph1), out, progress=False, log=lambda *a: None)
        summary = train(tiny_train_config(cuda_graphs=graph2), out, progress=False, log=lambda *a: None)
        finals.append(_state(summary["model"]))
    assert _same_state(finals[0], finals[1]) and _same_state(finals[0], finals[2])


def test_graphing_scope_is_per_call_and_the_auto_key_records_it():
    from fastmoe_adv import autotune
    moe, _ = small_moe(executor="auto")
    x, _ = data(b=3)
    assert not graphs.graphing()
    with graphs._graphing_scope():
        assert graphs.graphing()
        with graphs._graphing_scope():
            assert graphs.graphing()
        assert graphs.graphing()
        key = dict(zip(autotune._KEY_FIELDS, autotune._key(moe.experts, x)))
    assert not graphs.graphing()
    assert key["graphed"] is False        # CPU: nothing is captured, the executors run as they always do


def test_train_step_for_user_code_matches_backward_and_step():
    """graphs.train_step on a user's own module and loss: the same parameters as backward + step."""
    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
                                  torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 6, 10)).train()
        return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)

    def loss_fn(net):
        def fn(xb, yb):
            logits = net(xb)
            return torch.nn.functional.cross_entropy(logits, yb), (logits.argmax(-1) == yb).sum()
        return fn

    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(7, 3, 8, 8, generator=g), torch.randint(0, 10, (7,), generator=g)) for _ in range(3)]
    (net0, opt0), (net1, opt1) = make(), make()
    for x, y in batches:
        loss0, stats0 = S._update(net0, opt0, x, y, loss_fn(net0), graph=False)
        loss1, stats1 = fm.graphs.train_step(net1, opt1, x, y, loss_fn(net1))
        assert torch.equal(loss0, loss1) and torch.equal(stats0, stats1)
    assert all(torch.equal(a, b) for a, b in zip(net0.state_dict().values(), net1.state_dict().values()))


def test_graphed_pgd_with_the_fused_batchnorm_kernel():
    """bn_backend="triton" (the interpreter on CPU): the graphed step code runs the fused op too."""
    moe, _ = small_moe()
    moe.bn_backend = "triton"
    x, y = data(b=3)
    outs = [A.pgd(moe, x, y, 0.03, 0.01, 2, random_start=False, graph=g) for g in (False, True)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], x)


def test_a_folded_mixture_is_recaptured_after_its_weights_change():
    """fold_bn computes from folded copies that are rebuilt (new tensors) after any change: a
    graph captured over the old copies must not be replayed."""
    moe, _ = small_moe()
    x, y = data(b=3)
    for fold in (False, True):
        moe.fold_bn = fold
        with A.attack_mode(moe):
            before = graphs.signature((moe,), (x, y))
            with torch.no_grad():
                moe.experts.conv1.weight.mul_(1.01)      # an optimizer step, in place: same storage
            after = graphs.signature((moe,), (x, y))
        assert (before != after) == fold
    moe.fold_bn = True
    plain = A.pgd(moe, x, y, 0.03, 0.01, 3, random_start=False)
    assert torch.equal(A.pgd(moe, x, y, 0.03, 0.01, 3, random_start=False, graph=True), plain)


def test_periodic_evaluation_with_graphs_reports_the_same_accuracies():
    from fastmoe_adv.evaluate.experts import expert_robustness, mixture_robustness
    moe, _ = small_moe()
    x, _ = data(b=10, seed=4)
    with torch.no_grad():
        y = moe(x).argmax(-1)            # the mixture is right on every clean image: the attack has work to do
    kw = dict(pgd_eps=0.1, pgd_alpha=0.04, pgd_steps=3, batch_size=4, seed=1)   # batches of 4, 4 and 2
    mixture = mixture_robustness(moe, x, y, graph=True, **kw)
    assert mixture == mixture_robustness(moe, x, y, **kw) and mixture["clean"] == 1.0 > mixture["pgd"]
    assert expert_robustness(moe, x, y, graph=True, **kw) == expert_robustness(moe, x, y, **kw)


def test_train_step_hands_the_optimizer_gradients_in_the_parameters_layout():
    """As backward() does: the grouped head's einsum gives its weight gradient another layout."""
    torch.manual_seed(0)
    engine = fm.GroupedResNet18(num_experts=3, width=4, executor="grouped").train()
    opt = torch.optim.SGD(engine.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))

    def loss_fn(xb, yb):
        logits = engine(xb).mean(dim=1)
        return torch.nn.functional.cross_entropy(logits, yb), (logits.argmax(-1) == yb).sum()

    raw = torch.autograd.grad(loss_fn(x, y)[0], list(engine.parameters()))
    assert any(g.stride() != p.stride() for g, p in zip(raw, engine.parameters()))   # not vacuous
    fm.graphs.train_step(engine, opt, x, y, loss_fn)
    assert all(p.grad.stride() == p.stride() for p in engine.parameters())


def test_autocast_dtype_reads_the_active_autocast():
    assert graphs.autocast_dtype("cpu") is None and graphs.autocast_dtype("cuda") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert graphs.autocast_dtype("cpu") == torch.bfloat16 and graphs.autocast_dtype("cuda") is None
