"""Nine ResNet-18 experts, forward and forward+backward: every way of running them, side by side.

Paths (each a row of the group ``experts <device> w<width> b<batch> <precision> <pass>``):
- ``reference``: ``ReferenceSoftMoE.experts_forward``, an ``nn.ModuleList`` of ``ResNet18`` run
  one by one; the group's ratios are against its fastest reference row (any layout);
- ``grouped`` / ``loop``: ``FastSoftMoE.experts_forward`` with that executor (the row records
  what ``executor="auto"`` picks for the same call, ``auto_pick``, so the report can check it);
  every row but the next two runs BatchNorm, add and ReLU as separate torch ops (``bn_backend="torch"``);
- ``grouped+fusedbn`` / ``loop+fusedbn`` (CUDA): the same executors with ``bn_backend="triton"``, each
  BatchNorm with its residual add and ReLU as one fused Triton op (``kernels.batch_norm_act``), to
  read against the ``grouped`` / ``loop`` rows of the same group;
- ``vmap``: a ``torch.func`` ensemble, ``stack_module_state`` + ``functional_call`` + ``vmap``
  over copies of the reference's nine ResNet18. In train mode its BatchNorms go through
  ``torch.func.replace_all_batch_norm_modules_`` (batch statistics, no running-stat update:
  vmap cannot update a shared buffer in place), so that row skips the running-stat update the
  other rows do; in eval mode it uses the running statistics like every row;
- ``compile``: ``torch.compile`` of ``executor="auto"``'s pick (one size per device; on CPU the
  forward only unless ``FASTMOE_BENCH_COMPILE=all``: compiling the backward takes minutes);
- ``cudagraph`` (CUDA, forward only): auto's pick captured once in a CUDA graph, replayed;
- ``<path>+graph`` (CUDA, forward+backward, bf16 at batch 128 and 512): the ``grouped``, ``loop``
  (and, at batch 512, ``grouped+fusedbn`` / ``loop+fusedbn``) row's whole step (forward and
  every parameter gradient) captured once with ``fastmoe_adv.graphs`` over a static copy of the
  input and replayed: the same kernels without the host launching them one by one, next to the
  eager rows of the same group (the rows record ``graphed: True``). Batch 128 has only these
  rows, their eager twins and the references: does the grouped pass still beat per-expert
  convolutions once the launches are gone?

Passes: ``fwd`` = evaluation forward (eval mode, ``torch.no_grad``); ``fwd+bwd`` = a training
forward (train mode) and the gradient of every parameter (``torch.autograd.grad`` of the summed
logits; no optimizer). Inputs: one shared 32x32 image batch for all experts, already normalized.
Layouts: ``nchw`` (contiguous) and ``cl`` (channels_last weights and input).
"""
import contextlib
import copy

import pytest
import torch
from bench_utils import (
    COMPILE,
    QUICK,
    cuda_ok,
    device_name,
    expert_flops,
    graph_row,
    measure_once,
    models,
    run,
    skip_on_oom,
    skip_unless_device,
    skip_unless_graphs,
)

E, K, HW = 9, 10, 32

# (device, width, batch, precision); quick mode shrinks every device to width 4, batch 4.
CONFIGS = [("cpu", 8, 32, "fp32"), ("cpu", 16, 64, "fp32"),
           ("cuda", 64, 128, "bf16"),
           ("cuda", 64, 256, "fp32"), ("cuda", 64, 256, "bf16"),
           ("cuda", 64, 512, "fp32"), ("cuda", 64, 512, "bf16")]
QUICK_CONFIGS = [("cpu", 4, 4, "fp32"), ("cuda", 4, 4, "fp32"), ("cuda", 4, 4, "bf16")]
# torch.compile costs minutes per graph on a small CPU: one size per device.
COMPILE_CONFIGS = {("cpu", 16, 64, "fp32"), ("cuda", 64, 256, "bf16"),
                   ("cpu", 4, 4, "fp32"), ("cuda", 4, 4, "bf16")}
# The graphed rows (forward+backward only) run at these sizes.
GRAPH_CONFIGS = {("cuda", 64, 128, "bf16"), ("cuda", 64, 512, "bf16"), ("cuda", 4, 4, "bf16")}
# Sizes that run only some passes and paths: (passes, paths without the "+graph" suffix).
SLIM_CONFIGS = {("cuda", 64, 128, "bf16"): (("fwd+bwd",), {"reference", "grouped", "loop"})}
PASSES = ("fwd", "fwd+bwd")
ROUNDS = {"cpu": 5, "cuda": 6}
WARMUP = {"cpu": 1, "cuda": 2}   # CUDA: cuDNN's algorithm search (cudnn.benchmark) happens on first calls


def _paths(device):
    """(path, layout) rows per device: CPU both layouts; CUDA channels_last (plus an NCHW reference),
    each graphed row right after its eager twin (a run cut short keeps the pairs it finished)."""
    if device == "cpu":
        return [("reference", "nchw"), ("reference", "cl"), ("grouped", "nchw"), ("grouped", "cl"),
                ("loop", "nchw"), ("loop", "cl"), ("vmap", "nchw"), ("compile", "nchw")]
    return [("reference", "nchw"), ("reference", "cl"), ("grouped", "cl"), ("grouped+graph", "cl"), ("loop", "cl"),
            ("loop+graph", "cl"), ("grouped+fusedbn", "cl"), ("grouped+fusedbn+graph", "cl"), ("loop+fusedbn", "cl"),
            ("loop+fusedbn+graph", "cl"), ("vmap", "cl"), ("cudagraph", "cl"), ("compile", "cl")]


def _wanted(cfg, passes, path):
    if path == "cudagraph" and passes != "fwd":
        return False
    if path.endswith("+graph") and (passes != "fwd+bwd" or cfg not in GRAPH_CONFIGS):
        return False
    if path == "compile" and cfg not in COMPILE_CONFIGS:
        return False
    slim_passes, slim_paths = SLIM_CONFIGS.get(cfg, (PASSES, None))
    return passes in slim_passes and (slim_paths is None or path.removesuffix("+graph") in slim_paths)


def _rows():
    rows = []
    for cfg in (QUICK_CONFIGS if QUICK else CONFIGS):
        device, width, batch, prec = cfg
        for passes in PASSES:
            for path, layout in _paths(device):
                if not _wanted(cfg, passes, path):
                    continue
                marks = [pytest.mark.cuda] if device == "cuda" else []
                rows.append(pytest.param(cfg, passes, path, layout, marks=marks,
                                         id=f"{device}-w{width}-b{batch}-{prec}-{passes}-{path}-{layout}"))
    return rows


# ----------------------------------------------------------------------------- building blocks
def _input(device, batch, layout):
    x = torch.rand(batch, 3, HW, HW, device=device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


def _autocast(device, prec):
    if prec == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return torch.autocast(device, enabled=False)


class _VmapEnsemble:
    """The experts as one vmapped functional call over their stacked parameters and buffers."""

    def __init__(self, experts, train_mode):
        experts = [copy.deepcopy(m).train(train_mode) for m in experts]
        if train_mode:
            for m in experts:
                torch.func.replace_all_batch_norm_modules_(m)
        self.params, self.buffers = torch.func.stack_module_state(experts)   # leaves with requires_grad
        self.base = copy.deepcopy(experts[0]).to("meta")

    def parameters(self):
        return list(self.params.values())

    def _one(self, params, buffers, x):
        return torch.func.functional_call(self.base, (params, buffers), (x,))

    def __call__(self, x):
        out = torch.vmap(self._one, in_dims=(0, 0, None))(self.params, self.buffers, x)   # [E, B, K]
        return out.transpose(0, 1)


def _runner(path, ref, fast, x, train_mode, device):
    """(forward callable, the parameters a backward differentiates, what the row records)."""
    if path == "reference":
        return (lambda: ref.experts_forward(x)), list(ref.experts.parameters()), {}
    if path in ("grouped", "loop", "grouped+fusedbn", "loop+fusedbn"):
        executor, _, fused = path.partition("+")
        fast.executor = executor
        fast.bn_backend = "triton" if fused else "torch"
        return (lambda: fast.experts_forward(x)), list(fast.experts.parameters()), {"bn_backend": fast.bn_backend}
    if path == "vmap":
        ens = _VmapEnsemble(ref.experts, train_mode)
        note = ("BN via replace_all_batch_norm_modules_ (batch stats, no running-stat update)" if train_mode
                else "BN eval mode (running stats)")
        xn = ref.normalize(x)
        return (lambda: ens(xn)), ens.parameters(), {"note": note}
    raise AssertionError(path)


def _auto_pick(fast, x, passes, prec, device):
    """What executor="auto" picks for this exact call (device, shape, layout, mode, grad, autocast)."""
    from fastmoe_adv import autotune
    xn = fast.normalize(x)
    with _autocast(device, prec), torch.set_grad_enabled(passes == "fwd+bwd"):
        decision = autotune.decide(fast.experts, xn)
    return decision.executor, decision.reason


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("cfg, passes, path, layout", _rows())
def test_experts(benchmark, cfg, passes, path, layout):
    device, width, batch, prec = cfg
    skip_unless_device(device)
    if path == "compile":
        if COMPILE not in ("1", "all"):
            pytest.skip("torch.compile rows off (FASTMOE_BENCH_COMPILE=0, the quick-mode default: minutes per graph)")
        if device == "cpu" and passes == "fwd+bwd" and COMPILE != "all":
            pytest.skip("torch.compile of forward+backward on CPU: about 400 s of compile on 2 cores (measured), "
                        "over the 10-minute budget of the CPU run; FASTMOE_BENCH_COMPILE=all runs it")
    base = path.removesuffix("+graph")   # a graphed row runs its eager twin's step as one CUDA graph
    if base != path:
        skip_unless_graphs(device)
    if base.endswith("+fusedbn"):
        _skip_unless_triton(device)
    train_mode = passes == "fwd+bwd"
    ref, fast = models(device, width, layout, E, K)
    ref.train(train_mode), fast.train(train_mode)
    # The rows time the engines: the inputs are torch.rand, so the per-call pixel check (a device sync) is off.
    ref.check_inputs = fast.check_inputs = False
    fast.bn_backend = "torch"   # the models are cached across rows: only the fusedbn rows switch it on
    x = _input(device, batch, layout)
    info = {"width": width, "batch": batch, "experts": E, "precision": prec, "layout": layout, "pass": passes,
            "bn": "train" if train_mode else "eval", "graphed": base != path}

    with skip_on_oom(device), (graph_row(device) if base != path else contextlib.nullcontext()) as graph_status:
        if base in ("grouped", "loop", "grouped+fusedbn", "loop+fusedbn", "compile", "cudagraph"):
            info["auto_pick"], info["auto_reason"] = _auto_pick(fast, x, passes, prec, device)
        if path == "compile":
            forward, params, extra = _compiled(fast, x, info["auto_pick"], passes, prec, device)
        elif path == "cudagraph":
            forward, params, extra = _cuda_graph(fast, x, info["auto_pick"], prec)
        else:
            forward, params, extra = _runner(base, ref, fast, x, train_mode, device)
        step = _step(forward, params, passes, device, prec)
        if base != path:
            step, graph_info = _graphed_step(fast, x, params, prec, graph_status)
            extra = {**extra, **graph_info}
        info.update(extra)
        # the fused and graphed rows' executor names keep them out of the report's grouped-vs-loop pairs
        executor = {"reference": "modulelist", "vmap": "vmap", "grouped": "grouped", "loop": "loop",
                    "grouped+fusedbn": "grouped+fusedbn", "loop+fusedbn": "loop+fusedbn"}.get(
            base, f"{path}({info.get('auto_pick')})") + ("+graph" if base != path else "")
        run(benchmark, step, device=device,
            group=f"experts {device} w{width} b{batch} {prec} {passes}", path=f"{path}-{layout}", images=batch,
            flops=expert_flops(width, HW, HW, batch, E, passes), reference=path == "reference",
            rounds_full=ROUNDS[device], warmup=WARMUP[device], executor=executor, **info)


def _skip_unless_triton(device):
    """The fused rows time compiled Triton kernels on CUDA, never the interpreter or a CPU fallback."""
    from fastmoe_adv.kernels import dispatch
    if device != "cuda":
        pytest.skip("fused BatchNorm rows are CUDA only (on CPU the op would run its torch twin)")
    if not dispatch.triton_available() or dispatch.interpreter_enabled():
        pytest.skip("fused BatchNorm rows need compiled Triton kernels (triton missing or TRITON_INTERPRET=1)")


def _step(forward, params, passes, device, prec):
    if passes == "fwd":
        def fwd():
            with torch.no_grad(), _autocast(device, prec):
                return forward()
        return fwd
    params = [p for p in params if p.requires_grad]

    def fwd_bwd():
        with _autocast(device, prec):
            out = forward()
        return torch.autograd.grad(out.float().sum(), params)
    return fwd_bwd


def _graphed_step(fast, x, params, prec, graph_status):
    """The forward+backward step (what ``_step`` times eagerly) as the replay of one CUDA graph
    (``fastmoe_adv.graphs``) over a static copy of x; each call copies x in, then replays. The
    first call, timed here as ``capture_s``, runs the warm-up and the capture."""
    from fastmoe_adv import graphs
    params = [p for p in params if p.requires_grad]
    device = x.device.type
    with _autocast(device, prec):   # the key records the autocast state the graph is captured under
        key = graphs.signature((fast,), (x,), ("bench experts fwd+bwd",))
    gs = graphs.graph_set(fast, key, lambda: dict(x=torch.empty_like(x)))

    def body():
        out = fast.experts_forward(gs.buf.x)
        return torch.autograd.grad(out.float().sum(), params)

    def step():
        with _autocast(device, prec):
            gs.load(x=x)
            return gs.run("fwd+bwd", body)

    capture_s = measure_once(step, device)
    return step, {**graph_status(), "capture_s": capture_s}


def _compiled(fast, x, pick, passes, prec, device):
    engine = fast.experts
    xn = fast.normalize(x).detach()

    def experts(inp):
        return engine(inp, executor=pick)

    compiled = torch.compile(experts)
    try:
        with _autocast(device, prec), torch.set_grad_enabled(passes == "fwd+bwd"):
            if passes == "fwd+bwd":
                seconds = measure_once(lambda: torch.autograd.grad(compiled(xn).float().sum(),
                                                                   list(engine.parameters())), device)
            else:
                seconds = measure_once(lambda: compiled(xn), device)
    except Exception as exc:  # noqa: BLE001 (any compiler failure is a skip with its reason)
        pytest.skip(f"torch.compile failed on {device_name(device)}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}")
    return (lambda: compiled(xn)), list(engine.parameters()), {"compile_s": seconds}


def _cuda_graph(fast, x, pick, prec):
    if not cuda_ok():
        pytest.skip("CUDA graphs need CUDA")
    engine = fast.experts.eval()
    static_x = fast.normalize(x).detach().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm up outside the graph (cuDNN algorithm choice, allocator)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16", cache_enabled=False):
                engine(static_x, executor=pick)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16", cache_enabled=False):
            static_out = engine(static_x, executor=pick)

    def replay():
        graph.replay()
        return static_out
    return replay, [], {}


# ----------------------------------------------------------------------------- peak reference
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_matmul_peak(benchmark, dtype):
    """A large square matmul: what the GPU's matrix units give, to read the TFLOP/s above against."""
    skip_unless_device("cuda")
    n = 2048 if QUICK else 8192
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device="cuda", dtype=dt)
    b = torch.randn(n, n, device="cuda", dtype=dt)
    run(benchmark, lambda: a @ b, device="cuda", group=f"peak matmul {n}^3", path=f"matmul-{dtype}", images=0,
        flops=2.0 * n ** 3, rounds_full=20, warmup=3, precision=dtype,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
