"""pgd_step / pgd_random_start: the Triton kernels vs their eager torch twins, side by side, with
the x.clone() copy of the same tensor as the bandwidth yardstick.

    python -m pytest benchmarks/test_bench_pgd_step.py --benchmark-only [--benchmark-json out.json]
    FASTMOE_BENCH_QUICK=1 ...   small sizes (smoke run)
"""
import pytest
import torch
from bench_utils import QUICK, cuda_ok, run_kernel, skip_unless_runnable

from fastmoe_adv.constants import DEFAULT_ALPHA, DEFAULT_EPS
from fastmoe_adv.kernels import pgd_random_start, pgd_step

DEV = torch.device("cuda" if cuda_ok() else "cpu")
STEP_SHAPES = ((8, 3, 32, 32), (8, 9, 3, 32, 32)) if QUICK else ((512, 3, 32, 32), (512, 9, 3, 32, 32))
BACKENDS = ("torch", "triton")


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
    skip_unless_runnable(backend)
    x_adv, grad, x_nat = _step_inputs(shape)
    prefix = shape[:2] if len(shape) == 5 else shape[:1]
    alpha = torch.full(prefix, DEFAULT_ALPHA, device=DEV) if per_sample else DEFAULT_ALPHA
    eps = torch.full(prefix, DEFAULT_EPS, device=DEV) if per_sample else DEFAULT_EPS
    out = torch.empty_like(x_adv)
    fn = lambda: pgd_step(x_adv, grad, x_nat, alpha, eps, out=out, backend=backend)  # noqa: E731
    nbytes = 4 * x_adv.numel() * x_adv.element_size()  # read x_adv, grad, x_nat; write out
    kind = "per-sample" if per_sample else "scalar"
    run_kernel(benchmark, fn, f"pgd_step {_shape_str(shape)} {kind} eps", backend, nbytes, f"pgd_step-{backend}",
         shape=list(shape), per_sample=per_sample)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=_shape_str)
def test_bench_pgd_random_start(benchmark, shape, backend):
    skip_unless_runnable(backend)
    x_nat = torch.rand(shape, device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    fn = lambda: pgd_random_start(x_nat, DEFAULT_EPS, generator=gen, backend=backend)  # noqa: E731
    nbytes = 4 * x_nat.numel() * x_nat.element_size()  # write noise; read x_nat, noise; write out
    run_kernel(benchmark, fn, f"pgd_random_start {_shape_str(shape)}", backend, nbytes, f"pgd_random_start-{backend}",
         shape=list(shape))


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=_shape_str)
def test_bench_copy_bandwidth(benchmark, shape):
    """x.clone() of a step-sized tensor: the device's practical bandwidth, for reference."""
    x = torch.rand(shape, device=DEV)
    nbytes = 2 * x.numel() * x.element_size()
    run_kernel(benchmark, x.clone, f"copy {_shape_str(shape)}", "copy", nbytes, "clone", shape=list(shape))
