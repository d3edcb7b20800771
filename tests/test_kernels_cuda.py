"""Compiled Triton kernels on CUDA against the torch twins (skipped without a GPU).

tests/conftest.py turns the Triton interpreter on by default, and @triton.jit decides at
import time, so run these with the interpreter off:

    TRITON_INTERPRET=0 python -m pytest tests/test_kernels_cuda.py -m cuda -q
"""
import pytest
import torch

from fastmoe_adv.kernels import (
    dispatch,
    fgsm_step,
    gated_mix,
    gated_mix_torch,
    pgd_random_start,
    pgd_random_start_torch,
    pgd_step,
    pgd_step_,
    pgd_step_torch,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not dispatch.triton_available(), reason="needs triton"),
    pytest.mark.skipif(dispatch.interpreter_enabled(),
                       reason="kernels are interpreted: run with TRITON_INTERPRET=0 to test the compiled ones"),
]

DEV = "cuda"
MODES = ("logits", "probs")
# fp32 kernel vs the fp64 twin: fp32 rounding, plus tl.exp/tl.log approximations on GPU.
FP32_TOL = dict(rtol=2e-5, atol=2e-5)
# bf16 outputs/grads rounded once (round to nearest even): half a bf16 ulp, 2^-9 relative,
# plus the fp32 error above; 8e-3 is about one bf16 ulp.
BF16_TOL = dict(rtol=8e-3, atol=8e-3)


def _mix_grads(fn, z, g, mode, temperature, dy, dw, **kw):
    out, w = fn(z, g, mode=mode, temperature=temperature, return_weights=True, **kw)
    loss = (out.to(dy.dtype) * dy).sum() + (w.to(dw.dtype) * dw).sum()
    dz, dg = torch.autograd.grad(loss, (z, g))
    return out, w, dz, dg


def _reference(z, g, mode, temperature, dy, dw):
    z64 = z.detach().double().requires_grad_(True)
    g64 = g.detach().double().requires_grad_(True)
    return _mix_grads(gated_mix_torch, z64, g64, mode, temperature, dy.double(), dw.double())


def _check(got, want, tol):
    for name, a, b in zip(("out", "weights", "d_expert_logits", "d_gate_logits"), got, want):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,E,K", [(1, 1, 10), (8192, 9, 10), (1000, 9, 100), (3, 64, 1024), (4099, 5, 17)])
def test_gated_mix_cuda(B, E, K, dtype, tol, mode):
    z = (torch.randn(B, E, K, device=DEV) * 3).to(dtype).requires_grad_(True)
    g = (torch.randn(B, E, device=DEV) * 3).to(dtype).requires_grad_(True)
    dy = torch.randn(B, K, device=DEV).to(dtype).float()
    dw = torch.randn(B, E, device=DEV).to(dtype).float()
    got = _mix_grads(gated_mix, z, g, mode, 0.7, dy, dw, backend="triton")
    for t in got:
        assert t.dtype == dtype and t.device.type == "cuda"
    _check(got, _reference(z, g, mode, 0.7, dy, dw), tol)


@pytest.mark.parametrize("mode", MODES)
def test_gated_mix_cuda_fp64_gradcheck(mode):
    z = torch.randn(3, 4, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, device=DEV, dtype=torch.float64, requires_grad=True)
    f = lambda z, g: gated_mix(z, g, mode=mode, temperature=0.6, return_weights=True, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(f, (z, g), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gated_mix_cuda_non_contiguous_and_auto():
    z = torch.randn(512, 10, 9, device=DEV).transpose(1, 2).requires_grad_(True)
    g = torch.randn(9, 512, device=DEV).t().requires_grad_(True)
    dy, dw = torch.randn(512, 10, device=DEV), torch.randn(512, 9, device=DEV)
    assert dispatch.use_triton(z, "auto")
    got = _mix_grads(gated_mix, z, g, "probs", 1.0, dy, dw)  # auto -> triton on CUDA
    _check(got, _reference(z, g, "probs", 1.0, dy, dw), FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,prefix", [((512, 3, 32, 32), 0), ((512, 3, 32, 32), 1), ((256, 9, 3, 32, 32), 2),
                                          ((1000, 7), 1)])
def test_pgd_step_cuda_bit_exact(shape, prefix, dtype):
    # Same fp32 arithmetic, one rounding to dtype (round to nearest even on both): bit-exact.
    x_nat = torch.rand(shape, device=DEV)
    x_adv = (x_nat + 0.03 * torch.randn(shape, device=DEV)).clamp(0, 1)
    grad = torch.randn(shape, device=DEV)
    grad[torch.rand(shape, device=DEV) < 0.2] = 0.0
    x_nat, x_adv, grad = x_nat.to(dtype), x_adv.to(dtype), grad.to(dtype)
    if prefix == 0:
        alpha, eps = 2 / 255, 8 / 255
    else:
        alpha = torch.rand(shape[:prefix], device=DEV) * 0.02
        eps = torch.rand(shape[:prefix], device=DEV) * 0.06
    want = pgd_step_torch(x_adv, grad, x_nat, alpha, eps)
    assert torch.equal(pgd_step(x_adv, grad, x_nat, alpha, eps, backend="triton"), want)
    x = x_adv.clone()
    pgd_step_(x, grad, x_nat, alpha, eps, backend="triton")
    assert torch.equal(x, want)
    assert torch.equal(fgsm_step(x_nat, grad, eps, backend="triton"), pgd_step_torch(x_nat, grad, x_nat, eps, eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_pgd_random_start_cuda(dtype, per_sample):
    shape = (512, 9, 3, 32, 32)
    x_nat = torch.rand(shape, device=DEV).to(dtype)
    eps = torch.rand(512, 9, device=DEV) * 0.06 if per_sample else 8 / 255
    gen = lambda: torch.Generator(device=DEV).manual_seed(11)  # noqa: E731
    got = pgd_random_start(x_nat, eps, generator=gen(), backend="triton")
    again = pgd_random_start(x_nat, eps, generator=gen(), backend="triton")
    want = pgd_random_start_torch(x_nat, eps, generator=gen())
    assert torch.equal(got, again)
    # The compiler may fuse (2u - 1) * eps + x into one FMA: a last-bit difference in fp32,
    # which can flip one rounding of the final bf16 value.
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-8
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * ulp)
    e = eps if isinstance(eps, float) else eps.view(512, 9, 1, 1, 1)
    assert ((got.float() - x_nat.float()).abs() <= e + 2 * ulp).all()
    assert got.min() >= 0 and got.max() <= 1
