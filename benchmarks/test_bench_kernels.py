"""Triton kernels vs their eager torch twins, side by side in one run (pytest-benchmark).

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only [--benchmark-json out.json]
    FASTMOE_BENCH_QUICK=1 ...   small sizes (smoke run)

Groups: "gated_mix fwd+bwd <mode> B=.." (rows: torch twin, triton) and "pgd <shape>" (rows:
pgd_step and pgd_random_start on both backends, plus the x.clone() copy reference). The Triton
interpreter is never timed: without CUDA only the torch rows run. On CUDA every row records
the achieved bandwidth (bytes the op must move at minimum / median time) in extra_info, next
to a measured copy bandwidth (x.clone()) of the same tensor for reference.
"""
import os

import pytest
import torch
from bench_utils import device_name

from fastmoe_adv.kernels import dispatch, gated_mix, pgd_random_start, pgd_step

QUICK = os.environ.get("FASTMOE_BENCH_QUICK", "0") == "1"
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
# Triton rows need compiled kernels on a GPU; an interpreted kernel would time numpy.
TRITON_OK = CUDA and dispatch.triton_available() and not dispatch.interpreter_enabled()

MIX_B = (64, 256) if QUICK else (512, 8192)
MIX_E, MIX_K = 9, 10
STEP_SHAPES = ((8, 3, 32, 32), (8, 9, 3, 32, 32)) if QUICK else ((512, 3, 32, 32), (512, 9, 3, 32, 32))
BACKENDS = ("torch", "triton")


def _device_name():
    return device_name("cuda" if CUDA else "cpu")


def _triton_version():
    if not dispatch.triton_available():
        return "not installed"
    return dispatch.triton.__version__


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _skip_unless_runnable(backend):
    if backend == "triton" and not TRITON_OK:
        pytest.skip("triton rows need CUDA with compiled kernels (the interpreter is never timed)")


def _run(benchmark, fn, group, backend, nbytes, path, **info):
    """Time fn (synchronized on CUDA), then record device, versions, sizes and GB/s. The torch
    twin is each group's reference row; the copy row is the bandwidth yardstick."""
    benchmark.group = group
    benchmark.extra_info.update(
        device="cuda" if CUDA else "cpu", device_name=_device_name(), torch=torch.__version__,
        triton=_triton_version(), backend=backend, path=path, reference=backend == "torch",
        bytes_moved=nbytes, quick=QUICK, **info,
    )

    def timed():
        fn()
        _sync()

    for _ in range(3):  # warm up: compile / autotune caches, allocator
        timed()
    if QUICK:  # CI smoke mode: a few rounds, not pytest-benchmark's one-second budget
        benchmark.pedantic(timed, rounds=3, iterations=1)
    else:
        benchmark(timed)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None) if stats is not None else None
    if CUDA and median:
        benchmark.extra_info["median_s"] = median
        benchmark.extra_info["achieved_GBps"] = nbytes / median / 1e9


# ---------------------------------------------------------------- gated_mix (forward + backward)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ("logits", "probs"))
@pytest.mark.parametrize("B", MIX_B)
def test_bench_gated_mix(benchmark, B, mode, backend):
    _skip_unless_runnable(backend)
    z = torch.randn(B, MIX_E, MIX_K, device=DEV, requires_grad=True)
    g = torch.randn(B, MIX_E, device=DEV, requires_grad=True)
    dy = torch.randn(B, MIX_K, device=DEV)

    def fwd_bwd():
        out = gated_mix(z, g, mode=mode, backend=backend)
        torch.autograd.grad(out, (z, g), dy)

    bek, be, bk = B * MIX_E * MIX_K, B * MIX_E, B * MIX_K
    # forward reads z, g and writes out, weights; backward reads z, g, dy and writes dz, dg
    nbytes = z.element_size() * ((bek + 2 * be + bk) + (2 * bek + 2 * be + bk))
    _run(benchmark, fwd_bwd, f"gated_mix fwd+bwd {mode} B={B} E={MIX_E} K={MIX_K}", backend, nbytes,
         f"gated_mix-{backend}", B=B, E=MIX_E, K=MIX_K, mode=mode)


# ---------------------------------------------------------------- pgd_step / pgd_random_start

def _step_inputs(shape):
    x_nat = torch.rand(shape, device=DEV)
    x_adv = (x_nat + 0.01 * torch.randn(shape, device=DEV)).clamp(0, 1)
    grad = torch.randn(shape, device=DEV)
    return x_adv, grad, x_nat


def _shape_str(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", (False, True), ids=("scalar_eps", "per_sample_eps"))
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=_shape_str)
def test_bench_pgd_step(benchmark, shape, per_sample, backend):
    _skip_unless_runnable(backend)
    x_adv, grad, x_nat = _step_inputs(shape)
    prefix = shape[:2] if len(shape) == 5 else shape[:1]
    alpha = torch.full(prefix, 2 / 255, device=DEV) if per_sample else 2 / 255
    eps = torch.full(prefix, 8 / 255, device=DEV) if per_sample else 8 / 255
    out = torch.empty_like(x_adv)
    fn = lambda: pgd_step(x_adv, grad, x_nat, alpha, eps, out=out, backend=backend)  # noqa: E731
    nbytes = 4 * x_adv.numel() * x_adv.element_size()  # read x_adv, grad, x_nat; write out
    kind = "per-sample" if per_sample else "scalar"
    _run(benchmark, fn, f"pgd_step {_shape_str(shape)} {kind} eps", backend, nbytes, f"pgd_step-{backend}",
         shape=list(shape), per_sample=per_sample)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=_shape_str)
def test_bench_pgd_random_start(benchmark, shape, backend):
    _skip_unless_runnable(backend)
    x_nat = torch.rand(shape, device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    fn = lambda: pgd_random_start(x_nat, 8 / 255, generator=gen, backend=backend)  # noqa: E731
    nbytes = 4 * x_nat.numel() * x_nat.element_size()  # write noise; read x_nat, noise; write out
    _run(benchmark, fn, f"pgd_random_start {_shape_str(shape)}", backend, nbytes, f"pgd_random_start-{backend}",
         shape=list(shape))


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=_shape_str)
def test_bench_copy_bandwidth(benchmark, shape):
    """x.clone() of a step-sized tensor: the device's practical bandwidth, for reference."""
    x = torch.rand(shape, device=DEV)
    nbytes = 2 * x.numel() * x.element_size()
    _run(benchmark, x.clone, f"copy {_shape_str(shape)}", "copy", nbytes, "clone", shape=list(shape))
