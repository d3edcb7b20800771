"""kernels/pgd_step.py: the Triton kernels (CPU interpreter, backend="triton") against the torch twins.

Both backends compute in fp32 and round once, so fp32 and fp16 results are bit-identical.
bf16 is compared to within one bf16 ulp: the interpreter converts fp32 -> bf16 by
truncation, where CUDA (and torch) round to nearest even.
"""
import importlib

import pytest
import torch
from helpers import assert_kernels_compile_for_sm90
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmoe_adv.kernels import (
    dispatch,
    fgsm_step,
    pgd_random_start,
    pgd_random_start_torch,
    pgd_step,
    pgd_step_,
    pgd_step_torch,
)

pgd_mod = importlib.import_module("fastmoe_adv.kernels.pgd_step")  # the module, not the function

pytestmark = pytest.mark.skipif(not dispatch.interpreter_enabled(),
                                reason="needs triton with TRITON_INTERPRET=1 (set by tests/conftest.py)")

BF16_ULP = 2.0**-8  # spacing of bf16 values in [0.5, 1); values here lie in [0, 1]


def _assert_same(got, want):
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=BF16_ULP)
    else:
        assert torch.equal(got, want), f"max abs diff {(got.float() - want.float()).abs().max().item()}"


def _triple(shape, dtype=torch.float32, zero_frac=0.3):
    """x_nat in [0, 1], x_adv near it, grad with exact zeros."""
    x_nat = torch.rand(shape)
    x_adv = (x_nat + 0.03 * torch.randn(shape)).clamp(0, 1)
    grad = torch.randn(shape)
    grad[torch.rand(shape) < zero_frac] = 0.0
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


def _bounds(kind, shape):
    if kind == "scalar":
        return 2 / 255, 8 / 255
    prefix = shape[:1] if kind == "per_sample" else shape[:2]
    return torch.rand(prefix) * 0.02, torch.rand(prefix) * 0.06


CASES = [
    ("scalar", (8, 3, 8, 8)),
    ("per_sample", (8, 3, 8, 8)),  # alpha/eps [B]
    ("per_sample", (37, 5)),  # odd sizes, N not a multiple of BLOCK
    ("per_expert", (4, 9, 3, 4, 4)),  # alpha/eps [B, E] for per-expert inputs [B, E, 3, H, W]
    ("scalar", (1,)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,shape", CASES)
def test_step_matches_twin(kind, shape, dtype):
    x_adv, grad, x_nat = _triple(shape, dtype)
    alpha, eps = _bounds(kind, shape)
    got = pgd_step(x_adv, grad, x_nat, alpha, eps, backend="triton")
    want = pgd_step_torch(x_adv, grad, x_nat, alpha, eps)
    assert got.dtype == dtype and got.shape == x_adv.shape
    _assert_same(got, want)


def test_mixed_scalar_and_tensor_bounds_and_box():
    x_adv, grad, x_nat = _triple((6, 2, 5, 5))
    eps = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.05, 0.1])
    for alpha, e in ((0.01, eps), (eps / 4, 0.03), (torch.tensor(0.02), eps)):  # also a 0-d tensor
        got = pgd_step(x_adv, grad, x_nat, alpha, e, lo=0.1, hi=0.9, backend="triton")
        assert torch.equal(got, pgd_step_torch(x_adv, grad, x_nat, alpha, e, lo=0.1, hi=0.9))


def test_step_formula_by_hand():
    x_nat = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0, 0.2])
    x_adv = torch.tensor([0.5, 0.52, 0.48, 0.0, 1.0, 0.01, 0.99, 0.2])
    grad = torch.tensor([0.0, 1.0, -1.0, -3.0, 2.0, 0.0, -0.0, 5.0])
    got = pgd_step(x_adv, grad, x_nat, alpha=0.02, eps=0.03, backend="triton")
    x = x_adv + 0.02 * torch.sign(grad)
    want = torch.min(torch.max(x, x_nat - 0.03), x_nat + 0.03).clamp(0, 1)
    assert torch.equal(got, want)
    assert got[0] == 0.5  # sign(0) = 0: no step
    assert got[3] == 0.0 and got[4] == 1.0  # pushed out of the box at its edges: stays on them


def test_zero_grad_means_projection_only():
    x_adv, grad, x_nat = _triple((16, 3, 4, 4), zero_frac=1.0)
    assert torch.count_nonzero(grad) == 0
    got = pgd_step(x_adv, grad, x_nat, 0.05, 0.01, backend="triton")
    want = torch.min(torch.max(x_adv, x_nat - 0.01), x_nat + 0.01).clamp(0, 1)
    assert torch.equal(got, want)


def test_box_edges():
    # x_nat exactly 0 and 1, gradients pushing outwards and inwards.
    x_nat = torch.tensor([0.0, 0.0, 1.0, 1.0] * 8).reshape(8, 4)
    grad = torch.tensor([-1.0, 1.0, 1.0, -1.0] * 8).reshape(8, 4)
    eps = torch.linspace(0, 0.1, 8)
    got = pgd_step(x_nat.clone(), grad, x_nat, 0.05, eps, backend="triton")
    assert torch.equal(got, pgd_step_torch(x_nat.clone(), grad, x_nat, 0.05, eps))
    assert torch.equal(got[:, 0], torch.zeros(8)) and torch.equal(got[:, 2], torch.ones(8))
    assert torch.equal(got[:, 1], torch.minimum(torch.full((8,), 0.05), eps))
    assert torch.equal(got[:, 3], 1.0 - torch.minimum(torch.full((8,), 0.05), eps))


def test_in_place_variants():
    x_adv, grad, x_nat = _triple((8, 3, 4, 4))
    want = pgd_step_torch(x_adv, grad, x_nat, 0.01, 0.03)
    x = x_adv.clone()
    ptr = x.data_ptr()
    res = pgd_step_(x, grad, x_nat, 0.01, 0.03, backend="triton")
    assert res is x and x.data_ptr() == ptr and torch.equal(x, want)
    x = x_adv.clone()
    assert pgd_step(x, grad, x_nat, 0.01, 0.03, out=x, backend="triton") is x and torch.equal(x, want)
    # Twin in place too.
    x = x_adv.clone()
    assert pgd_step_(x, grad, x_nat, 0.01, 0.03, backend="torch") is x and torch.equal(x, want)


def test_non_contiguous_inputs_and_out():
    base = torch.rand(4, 4, 3, 8)
    x_nat = base.permute(0, 2, 1, 3)  # [4, 3, 4, 8], non-contiguous
    x_adv = (x_nat + 0.02).clamp(0, 1)
    grad = torch.randn(8, 4, 3, 4).permute(1, 2, 3, 0)
    assert not x_nat.is_contiguous() and not grad.is_contiguous()
    eps = torch.rand(4) * 0.05
    want = pgd_step_torch(x_adv, grad, x_nat, 0.01, eps)
    assert torch.equal(pgd_step(x_adv, grad, x_nat, 0.01, eps, backend="triton"), want)
    out = torch.empty(4, 4, 3, 8).permute(0, 2, 1, 3)
    res = pgd_step(x_adv, grad, x_nat, 0.01, eps, out=out, backend="triton")
    assert res is out and torch.equal(out, want)
    x = x_adv.clone().transpose(0, 1).contiguous().transpose(0, 1)  # in place on a non-contiguous x_adv
    pgd_step_(x, grad, x_nat, 0.01, eps, backend="triton")
    assert torch.equal(x, want)


def test_not_differentiable_and_detached():
    x_adv, grad, x_nat = _triple((4, 3, 4, 4))
    x_adv.requires_grad_(True)
    y = pgd_step(x_adv, grad, x_nat, 0.01, 0.03, backend="triton")
    assert not y.requires_grad
    leaf = x_adv.detach().clone().requires_grad_(True)
    pgd_step_(leaf, grad, x_nat, 0.01, 0.03, backend="triton")  # in place on a leaf: allowed
    assert torch.equal(leaf.detach(), y)


def test_in_place_update_is_seen_by_autograd():
    x_adv, grad, x_nat = _triple((4, 5))
    leaf = x_adv.clone().requires_grad_(True)
    y = leaf * 1.0
    loss = (y * y).sum()  # saves y for backward
    with torch.no_grad():
        pgd_step_(y, grad, x_nat, 0.01, 0.03, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fgsm_step():
    x_nat = torch.rand(8, 3, 4, 4)
    grad = torch.randn(8, 3, 4, 4)
    grad[0] = 0.0
    got = fgsm_step(x_nat, grad, 0.03, backend="triton")
    assert torch.equal(got, (x_nat + 0.03 * torch.sign(grad)).clamp(0, 1))
    eps = torch.rand(8) * 0.1
    assert torch.equal(fgsm_step(x_nat, grad, eps, backend="triton"),
                       (x_nat + eps.view(8, 1, 1, 1) * torch.sign(grad)).clamp(0, 1))


def test_empty_input():
    x = torch.zeros(0, 3, 4, 4)
    assert pgd_step(x, x, x, 0.1, torch.zeros(0), backend="triton").shape == x.shape
    assert pgd_random_start(x, 0.1, backend="triton").shape == x.shape


def test_fp64_uses_twin_under_auto_and_is_refused_by_triton():
    x_adv, grad, x_nat = _triple((4, 5), torch.float64)
    assert torch.equal(pgd_step(x_adv, grad, x_nat, 0.01, 0.03), pgd_step_torch(x_adv, grad, x_nat, 0.01, 0.03))
    with pytest.raises(ValueError, match="float64"):
        pgd_step(x_adv, grad, x_nat, 0.01, 0.03, backend="triton")


# ---------------------------------------------------------------- random start

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,shape", CASES[:4])
def test_random_start_matches_twin_and_is_reproducible(kind, shape, dtype):
    x_nat = torch.rand(shape).to(dtype)
    _, eps = _bounds(kind, shape)
    got = pgd_random_start(x_nat, eps, generator=torch.Generator().manual_seed(7), backend="triton")
    again = pgd_random_start(x_nat, eps, generator=torch.Generator().manual_seed(7), backend="triton")
    want = pgd_random_start_torch(x_nat, eps, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, again)
    _assert_same(got, want)
    other = pgd_random_start(x_nat, eps, generator=torch.Generator().manual_seed(8), backend="triton")
    if float(torch.as_tensor(eps).max()) > 0.01:
        assert not torch.equal(got, other)


def test_random_start_default_generator_and_range():
    x_nat = torch.rand(64, 3, 4, 4)
    x_nat[:8] = 0.0
    x_nat[8:16] = 1.0
    torch.manual_seed(3)
    got = pgd_random_start(x_nat, 0.05, backend="triton")
    torch.manual_seed(3)
    assert torch.equal(got, pgd_random_start_torch(x_nat, 0.05))
    assert (got - x_nat).abs().max() <= 0.05 + 1e-7
    assert got.min() >= 0 and got.max() <= 1
    assert (got[:8] > 0).any() and (got[8:16] < 1).any()  # noise really applied at the edges


# ---------------------------------------------------------------- properties

@st.composite
def _step_problem(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    lo = draw(st.floats(-1.0, 0.5))
    hi = lo + draw(st.floats(0.0, 1.5))
    prefix_len = draw(st.integers(0, min(2, ndim)))
    as_tensor = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, lo, hi, prefix_len, as_tensor, seed


def _make(shape, lo, hi, prefix_len, as_tensor, seed):
    gen = torch.Generator().manual_seed(seed)
    x_nat = lo + (hi - lo) * torch.rand(shape, generator=gen)
    x_adv = x_nat + 0.2 * torch.randn(shape, generator=gen)  # may even start outside the ball
    grad = torch.randn(shape, generator=gen).round()  # many exact zeros
    if as_tensor:
        eps = 0.1 * torch.rand(shape[:prefix_len], generator=gen)
        alpha = 0.05 * torch.rand(shape[:prefix_len], generator=gen)
        eps_full = eps.reshape(eps.shape + (1,) * (len(shape) - prefix_len)).expand(shape)
    else:
        eps = float(0.1 * torch.rand((), generator=gen))
        alpha = float(0.05 * torch.rand((), generator=gen))
        eps_full = torch.full(shape, eps)
    return x_adv, grad, x_nat, alpha, eps, eps_full


SLACK = 1e-6  # x_nat +- eps is rounded to fp32


@settings(max_examples=30, deadline=None)
@given(_step_problem())
def test_property_step_stays_in_ball_and_box(problem):
    shape, lo, hi, prefix_len, as_tensor, seed = problem
    x_adv, grad, x_nat, alpha, eps, eps_full = _make(shape, lo, hi, prefix_len, as_tensor, seed)
    y = pgd_step(x_adv, grad, x_nat, alpha, eps, lo=lo, hi=hi, backend="triton")
    assert torch.equal(y, pgd_step_torch(x_adv, grad, x_nat, alpha, eps, lo=lo, hi=hi))
    assert ((y.double() - x_nat.double()).abs() <= eps_full.double() + SLACK).all()
    lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    assert (y >= lo32).all() and (y <= hi32).all()


@settings(max_examples=30, deadline=None)
@given(_step_problem())
def test_property_random_start_stays_in_ball_and_box(problem):
    shape, lo, hi, prefix_len, as_tensor, seed = problem
    _, _, x_nat, _, eps, eps_full = _make(shape, lo, hi, prefix_len, as_tensor, seed)
    y = pgd_random_start(x_nat, eps, lo=lo, hi=hi, generator=torch.Generator().manual_seed(seed), backend="triton")
    assert torch.equal(y, pgd_random_start_torch(x_nat, eps, lo=lo, hi=hi,
                                                 generator=torch.Generator().manual_seed(seed)))
    assert ((y.double() - x_nat.double()).abs() <= eps_full.double() + SLACK).all()
    lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    assert (y >= lo32).all() and (y <= hi32).all()


# ---------------------------------------------------------------- bad inputs

def _bad_step_cases():
    x = torch.rand(4, 3, 2, 2)
    xe = torch.rand(4, 9, 3, 2, 2)
    return [
        ("grad shape", lambda f: f(x, torch.rand(4, 3, 2, 3), x, 0.1, 0.1), r"grad: expected shape \(4, 3, 2, 2\)"),
        ("x_nat shape", lambda f: f(x, x, torch.rand(4, 3, 2), 0.1, 0.1), "x_nat: expected shape"),
        ("dtype", lambda f: f(x, x.double(), x, 0.1, 0.1), "grad: expected dtype torch.float32"),
        ("int dtype", lambda f: f(x.long(), x.long(), x.long(), 0.1, 0.1), "x_adv: expected dtype"),
        ("device", lambda f: f(x, x, x.to("meta"), 0.1, 0.1), "x_nat: expected device cpu"),
        ("eps < 0", lambda f: f(x, x, x, 0.1, -0.1), "eps: expected a finite float >= 0"),
        ("alpha < 0", lambda f: f(x, x, x, -0.1, 0.1), "alpha: expected a finite float >= 0"),
        ("eps nan", lambda f: f(x, x, x, 0.1, float("nan")), "eps"),
        ("negative entry", lambda f: f(x, x, x, torch.tensor([0.1, -0.1, 0.1, 0.1]), 0.1), "alpha: expected every"),
        ("lo > hi", lambda f: f(x, x, x, 0.1, 0.1, 1.0, 0.0), "lo <= hi"),
        ("not a prefix", lambda f: f(x, x, x, 0.1, torch.rand(3)), r"prefix.*got shape \(3,\)"),
        ("trailing shape", lambda f: f(x, x, x, 0.1, torch.rand(2, 2)), "prefix"),
        ("[B,E] mismatch", lambda f: f(xe, xe, xe, torch.rand(4, 8), 0.1), r"got shape \(4, 8\)"),
        ("too long", lambda f: f(x, x, x, torch.rand(4, 3, 2, 2, 1), 0.1), "prefix"),
        ("tensor device", lambda f: f(x, x, x, 0.1, torch.rand(4, device="meta")), "eps: expected a tensor on cpu"),
        ("int tensor", lambda f: f(x, x, x, torch.ones(4, dtype=torch.long), 0.1), "floating-point"),
        ("string", lambda f: f(x, x, x, "0.1", 0.1), "alpha: expected a float or a tensor"),
        ("out shape", lambda f: f(x, x, x, 0.1, 0.1, out=torch.empty(4, 3)), "out: expected shape"),
    ]


def _step(backend):
    def call(*a, **k):
        if backend == "twin":
            return pgd_step_torch(*a, **k)
        return pgd_step(*a, backend=backend, **k)
    return call


@pytest.mark.parametrize("backend", ["triton", "torch", "twin"])
@pytest.mark.parametrize("case", _bad_step_cases(), ids=lambda c: c[0])
def test_bad_step_inputs_raise_value_error(case, backend):
    _, call, match = case
    with pytest.raises(ValueError, match=match):
        call(_step(backend))


@pytest.mark.parametrize("fn", [lambda *a, **k: pgd_random_start(*a, backend="triton", **k), pgd_random_start_torch],
                         ids=["triton", "twin"])
def test_bad_random_start_inputs_raise_value_error(fn):
    x = torch.rand(4, 3)
    with pytest.raises(ValueError, match="eps: expected a finite float >= 0"):
        fn(x, -0.1)
    with pytest.raises(ValueError, match="eps: expected every"):
        fn(x, torch.tensor([0.1, 0.1, -1.0, 0.1]))
    with pytest.raises(ValueError, match="prefix"):
        fn(x, torch.rand(3))
    with pytest.raises(ValueError, match="lo <= hi"):
        fn(x, 0.1, lo=0.5, hi=0.4)
    with pytest.raises(ValueError, match="generator"):
        fn(x.to("meta"), 0.1, generator=torch.Generator())  # generator on another device type
    with pytest.raises(ValueError, match="generator"):
        fn(x, 0.1, generator=123)


# ---------------------------------------------------------------- dispatch

def test_backend_torch_runs_the_twin(monkeypatch):
    class Boom:  # stands in for a @triton.jit kernel: kernel[grid](...)
        def __getitem__(self, grid):
            raise AssertionError("Triton kernel launched")

    boom = Boom()
    monkeypatch.setattr(pgd_mod, "_pgd_step_kernel", boom)
    monkeypatch.setattr(pgd_mod, "_pgd_random_start_kernel", boom)
    x_adv, grad, x_nat = _triple((4, 5))
    pgd_step(x_adv, grad, x_nat, 0.01, 0.03, backend="torch")
    pgd_random_start(x_nat, 0.03, backend="torch")
    with pytest.raises(AssertionError, match="Triton kernel"):
        pgd_step(x_adv, grad, x_nat, 0.01, 0.03, backend="auto")  # auto uses the kernel here


def test_backend_auto_falls_back_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x_adv, grad, x_nat = _triple((4, 5))
    assert torch.equal(pgd_step(x_adv, grad, x_nat, 0.01, 0.03), pgd_step_torch(x_adv, grad, x_nat, 0.01, 0.03))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        pgd_step(x_adv, grad, x_nat, 0.01, 0.03, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        pgd_step(x_adv, grad, x_nat, 0.01, 0.03, backend="numpy")


# ---------------------------------------------------------------- real compiler

def test_kernels_compile_for_sm90(tmp_path):
    assert_kernels_compile_for_sm90("pgd_step", tmp_path)


# ---------------------------------------------------------------- validate=False and NaN gradients

@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind,shape", CASES)
def test_prevalidated_path_matches_validated(kind, shape, backend):
    x_adv, grad, x_nat = _triple(shape)
    alpha, eps = _bounds(kind, shape)
    want = pgd_step(x_adv, grad, x_nat, alpha, eps, backend=backend)
    _assert_same(pgd_step(x_adv, grad, x_nat, alpha, eps, backend=backend, validate=False), want)
    inplace = x_adv.clone()
    pgd_step_(inplace, grad, x_nat, alpha, eps, backend=backend, validate=False)
    _assert_same(inplace, want)
    _assert_same(fgsm_step(x_nat, grad, eps, backend=backend, validate=False),
                 fgsm_step(x_nat, grad, eps, backend=backend))
    g = torch.Generator().manual_seed(3)
    start = pgd_random_start(x_nat, eps, backend=backend, validate=False, generator=g)
    _assert_same(start, pgd_random_start(x_nat, eps, backend=backend, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("backend", ["triton", "torch", "twin"])
def test_nan_gradient_is_refused_when_validated(backend):
    x_adv, grad, x_nat = _triple((4, 3, 2, 2))
    grad[1, 2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="grad: expected no NaN entries.*got 1 NaN"):
        _step(backend)(x_adv, grad, x_nat, 0.1, 0.2)
    with pytest.raises(ValueError, match="grad: expected no NaN"):
        fgsm_step(x_nat, grad, 0.1, backend="torch" if backend == "twin" else backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_gradient_without_validation_means_no_step_on_both_backends(backend):
    x_adv, grad, x_nat = _triple((4, 3, 2, 2), zero_frac=0.0)
    nan_at = torch.rand(grad.shape) < 0.3
    grad[nan_at] = float("nan")
    out = pgd_step(x_adv, grad, x_nat, 0.01, 0.05, backend=backend, validate=False)
    want = pgd_step(x_adv, torch.where(nan_at, torch.zeros_like(grad), grad), x_nat, 0.01, 0.05, backend="torch")
    assert nan_at.any() and torch.equal(out, want)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fgsm_step_names_eps(backend):
    x = torch.rand(4, 3)
    for bad in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match=r"^eps: expected a finite float >= 0"):
            fgsm_step(x, torch.randn(4, 3), bad, backend=backend)
    with pytest.raises(ValueError, match=r"^eps: expected every entry"):
        fgsm_step(x, torch.randn(4, 3), torch.tensor([0.1, float("nan"), 0.1, 0.1]), backend=backend)
