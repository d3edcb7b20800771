"""Helpers for the benchmarks: sizes, devices, timing, and what every row records.

Environment (read here):
- ``FASTMOE_BENCH_QUICK=1``: smoke mode (width 4, batch 4, one round), for CI.
- ``FASTMOE_BENCH_DEVICE=cpu|cuda|all`` (default all): which device's rows run; rows of a
  device that is absent are skipped.
- ``FASTMOE_BENCH_COMPILE=0|1|all``: the ``torch.compile`` rows (default 1, 0 in quick mode;
  1 skips the CPU forward+backward compile, which alone takes minutes).
"""
import contextlib
import os
import statistics
import time

import pytest
import torch

from fastmoe_adv.reporting import cpu_model, environment  # noqa: F401  (cpu_model: for the benchmark files)

QUICK = os.environ.get("FASTMOE_BENCH_QUICK", "0") == "1"
DEVICES = os.environ.get("FASTMOE_BENCH_DEVICE", "all").lower()
# "0": no torch.compile rows; "1": forward on CPU, forward and forward+backward on CUDA;
# "all": forward+backward on CPU too (about 400 s of compile on 2 cores).
COMPILE = os.environ.get("FASTMOE_BENCH_COMPILE", "0" if QUICK else "1").lower()

# One expert's forward FLOPs for one 32x32 image at width 64 (the real CIFAR ResNet-18);
# FLOPs scale with width^2 and with H*W. A backward costs about twice the forward.
GFLOP_PER_IMAGE_W64 = 1.11
BACKWARD_FACTOR = 2.0


# Backward w.r.t. the input only (an attack step): the data gradients, about one forward.
INPUT_BACKWARD_FACTOR = 1.0
_PASS_FACTOR = {"fwd": 1.0, "fwd+bwd": 1.0 + BACKWARD_FACTOR, "fwd+bwd-input": 1.0 + INPUT_BACKWARD_FACTOR}


def expert_flops(width, height=32, width_px=32, images=1, experts=1, passes="fwd"):
    """FLOPs of ``experts`` ResNet-18 experts on ``images`` images; ``passes`` is "fwd",
    "fwd+bwd" (parameter and input gradients) or "fwd+bwd-input" (input gradient only)."""
    fwd = GFLOP_PER_IMAGE_W64 * 1e9 * (width / 64) ** 2 * (height * width_px / 1024)
    factor = _PASS_FACTOR[passes]
    return fwd * factor * images * experts


# ----------------------------------------------------------------------------- devices
def cuda_ok() -> bool:
    return torch.cuda.is_available()


def want(device: str) -> bool:
    return DEVICES in ("all", device)


def skip_unless_device(device: str):
    """pytest.skip unless rows for ``device`` are wanted and the device exists."""
    if not want(device):
        pytest.skip(f"FASTMOE_BENCH_DEVICE={DEVICES}: {device} rows not requested")
    if device == "cuda" and not cuda_ok():
        pytest.skip("no CUDA device")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    """The library's one environment description, reduced to what a benchmark row needs."""
    env = environment("cuda" if cuda_ok() else "cpu")
    return {k: env[k] for k in ("torch", "triton", "python", "cuda", "cudnn")}


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing
def rounds(full: int, quick: int = 1) -> int:
    return quick if QUICK else full


def run(benchmark, fn, *, device, group, path, images, flops=None, rounds_full=3, warmup=1, reference=False,
        **info):
    """Time ``fn`` with ``benchmark.pedantic`` (one call per round; on CUDA the call ends with a
    synchronize) and record the row's extra_info: path, device, versions, images/s and, given
    ``flops`` per call, the achieved TFLOP/s."""
    benchmark.group = group

    def timed():
        out = fn()
        sync(device)
        return out

    n_rounds = rounds(rounds_full, 1 if rounds_full <= 3 else 2)
    result = benchmark.pedantic(timed, rounds=n_rounds, iterations=1, warmup_rounds=0 if QUICK else warmup)
    median = benchmark.stats.stats.median
    extra = benchmark.extra_info
    extra.update(path=path, device=device, device_name=device_name(device), images_per_call=images,
                 images_per_s=images / median if median > 0 else None, reference=bool(reference),
                 quick=QUICK, threads=torch.get_num_threads(), **versions())
    if device == "cuda":  # fp32 convolutions/matmuls may run as TF32: say which
        extra.update(tf32_cudnn=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                     cudnn_benchmark=torch.backends.cudnn.benchmark)
    if flops is not None:
        extra["tflops"] = flops / median / 1e12 if median > 0 else None
        extra["flops_per_call"] = flops
    extra.update(info)
    return result


@contextlib.contextmanager
def skip_on_oom(device: str):
    """A row that does not fit in GPU memory is skipped (with the reason), not failed."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory on {device_name(device)}: {str(exc).splitlines()[0]}")


def measure_once(fn, device, reps=1):
    """Median seconds of ``reps`` untimed-by-pytest-benchmark calls (compile warm-up, probes)."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- CUDA graph rows
def skip_unless_graphs(device: str):
    """Graphed rows time CUDA graph replays: without CUDA ``fastmoe_adv.graphs`` runs the same
    bodies uncaptured (no speed-up), so such a row would time the eager path a second time."""
    if device != "cuda":
        pytest.skip("CUDA graph rows are CUDA only: without CUDA the graphed code runs uncaptured "
                    "(fastmoe_adv.graphs emulation, no speed-up), so the row would repeat the eager row")


@contextlib.contextmanager
def graph_row(device: str):
    """Around a graphed row: yields ``status()``, which fails the row unless every body it used
    was captured (a failed capture runs uncaptured: the row would time the eager path under a
    graphed name) and returns what the row records; afterwards every graph set is dropped (each
    holds its own memory pool) and the cached memory released."""
    from fastmoe_adv import graphs
    start = len(graphs.records())

    def status() -> dict:
        recs = graphs.records()[start:]
        bad = [r.describe() for r in recs if r.status != "captured"]
        if bad or not recs:
            pytest.fail(f"CUDA graph capture did not happen as it should ({bad or 'nothing captured'}): "
                        "a graphed row must time graph replays")
        bodies = f"{len(recs)} captured bod{'y' if len(recs) == 1 else 'ies'}"
        return {"graphed": True, "graph_bodies": len(recs),
                "note": f"CUDA graphs (fastmoe_adv.graphs): {bodies}, replayed on every call"}

    try:
        yield status
    finally:
        graphs.clear()
        if device == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- eager references
def eager_fgsm(model, x, y, eps):
    """Textbook FGSM in plain torch ops, eval mode (a reference twin)."""
    was_training = model.training
    model.eval()
    x_req = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x_req), y), x_req)
    model.train(was_training)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def eager_pgd(model, x, y, eps, alpha, steps):
    """Textbook L-inf PGD with a random start in plain torch ops (``autograd.grad``, ``sign``,
    ``clamp``), eval mode (a reference twin)."""
    was_training = model.training
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()


# ----------------------------------------------------------------------------- models
_MODELS: dict = {}


def models(device, width, layout="nchw", experts=9, classes=10):
    """(ReferenceSoftMoE, FastSoftMoE) with the same weights, seeded, on ``device``, in
    ``layout`` ("nchw" or "cl"). Cached per (device, width): both layouts stay, another size
    evicts them (nine width-64 ResNet-18s take seconds to build). Callers set the executor, the
    mode and whatever else they need on every use; gradients are cleared here."""
    import fastmoe_adv as fm
    key = (device, width, layout, experts, classes)
    if key not in _MODELS:
        if any(k[:2] != key[:2] or k[3:] != key[3:] for k in _MODELS):
            _MODELS.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
        torch.manual_seed(0)
        with torch.device(device):   # initialise on the device: much faster than on the host for width 64
            ref = fm.ReferenceSoftMoE(num_experts=experts, num_classes=classes, width=width)
            fast = fm.FastSoftMoE.from_reference(ref, backend="auto", executor="auto")
        ref, fast = ref.to(device), fast.to(device)
        if layout == "cl":
            ref, fast = ref.to(memory_format=torch.channels_last), fast.to(memory_format=torch.channels_last)
        _MODELS[key] = (ref, fast)
    ref, fast = _MODELS[key]
    for p in list(ref.parameters()) + list(fast.parameters()):
        p.grad = None
    return ref, fast


# ----------------------------------------------------------------------------- kernels (one file per op)
def triton_timeable() -> bool:
    """Triton rows need compiled kernels on a GPU; an interpreted kernel would time numpy."""
    from fastmoe_adv.kernels import dispatch
    return cuda_ok() and dispatch.triton_available() and not dispatch.interpreter_enabled()


def skip_unless_runnable(backend: str):
    if backend == "triton" and not triton_timeable():
        pytest.skip("triton rows need CUDA with compiled kernels (the interpreter is never timed)")


def run_kernel(benchmark, fn, group, backend, nbytes, path, **info):
    """Time a kernel (synchronized on CUDA), then record device, versions, sizes and GB/s. The
    torch twin is each group's reference row; a copy row is the bandwidth yardstick. This is the
    host timer around a synchronize: on a GPU it includes the launch path."""
    device = "cuda" if cuda_ok() else "cpu"
    benchmark.group = group
    benchmark.extra_info.update(device=device, device_name=device_name(device), backend=backend, path=path,
                                reference=backend == "torch", bytes_moved=nbytes, quick=QUICK, **versions(), **info)

    def timed():
        fn()
        sync(device)

    for _ in range(3):  # warm up: compile / autotune caches, allocator
        timed()
    if QUICK:  # CI smoke mode: a few rounds, not pytest-benchmark's one-second budget
        benchmark.pedantic(timed, rounds=3, iterations=1)
    else:
        benchmark(timed)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None) if stats is not None else None
    if device == "cuda" and median:
        benchmark.extra_info["median_s"] = median
        benchmark.extra_info["achieved_GBps"] = nbytes / median / 1e9
