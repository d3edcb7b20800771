"""gated_mix (forward + backward): the Triton kernel vs its eager torch twin, side by side.

    python -m pytest benchmarks/test_bench_gated_mix.py --benchmark-only [--benchmark-json out.json]
    FASTMOE_BENCH_QUICK=1 ...   small sizes (smoke run)

The Triton interpreter is never timed: without CUDA only the torch rows run. On CUDA every row
records the achieved bandwidth (bytes the op must move at minimum / median time).
"""
import pytest
import torch
from bench_utils import QUICK, cuda_ok, run_kernel, skip_unless_runnable

from fastmoe_adv.kernels import gated_mix

DEV = torch.device("cuda" if cuda_ok() else "cpu")
MIX_B = (64, 256) if QUICK else (512, 8192)
MIX_E, MIX_K = 9, 10
BACKENDS = ("torch", "triton")


# ---------------------------------------------------------------- gated_mix (forward + backward)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ("logits", "probs"))
@pytest.mark.parametrize("B", MIX_B)
def test_bench_gated_mix(benchmark, B, mode, backend):
    skip_unless_runnable(backend)
    z = torch.randn(B, MIX_E, MIX_K, device=DEV, requires_grad=True)
    g = torch.randn(B, MIX_E, device=DEV, requires_grad=True)
    dy = torch.randn(B, MIX_K, device=DEV)

    def fwd_bwd():
        out = gated_mix(z, g, mode=mode, backend=backend)
        torch.autograd.grad(out, (z, g), dy)

    bek, be, bk = B * MIX_E * MIX_K, B * MIX_E, B * MIX_K
    # forward reads z, g and writes out, weights; backward reads z, g, dy and writes dz, dg
    nbytes = z.element_size() * ((bek + 2 * be + bk) + (2 * bek + 2 * be + bk))
    run_kernel(benchmark, fwd_bwd, f"gated_mix fwd+bwd {mode} B={B} E={MIX_E} K={MIX_K}", backend, nbytes,
         f"gated_mix-{backend}", B=B, E=MIX_E, K=MIX_K, mode=mode)
