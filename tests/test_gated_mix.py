"""kernels/gated_mix.py: the Triton kernels (CPU interpreter, backend="triton") against the torch twin.

Checked: outputs and BOTH gradients (expert and gate logits, also through the returned
weights) in fp32 and fp64 (gradcheck), odd sizes, both modes, temperature != 1,
non-contiguous inputs, the K-chunk loop, fp16/bf16 against an fp32 reference, bad inputs,
and the dispatcher.
"""
import importlib

import pytest
import torch
from helpers import assert_kernels_compile_for_sm90

import fastmoe_adv.kernels as K
from fastmoe_adv.kernels import dispatch, gated_mix, gated_mix_torch, use_triton

gm_mod = importlib.import_module("fastmoe_adv.kernels.gated_mix")  # the module, not the function

pytestmark = pytest.mark.skipif(not dispatch.interpreter_enabled(),
                                reason="needs triton with TRITON_INTERPRET=1 (set by tests/conftest.py)")

MODES = ("logits", "probs")
# fp32 kernel vs the twin run in fp64 on the same values: the kernel's own fp32 rounding only.
# The gate gradient is a difference of terms of size ~|z| * K, hence the absolute part.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _leaf(shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, dtype=torch.float32) * scale).to(dtype).requires_grad_(True)


def _run(fn, z, g, mode, temperature, dy, dw, **kw):
    """out, weights and both input grads for loss = <out, dy> + <weights, dw> (dw may be None)."""
    out, w = fn(z, g, mode=mode, temperature=temperature, return_weights=True, **kw)
    loss = (out.to(dy.dtype) * dy).sum()
    if dw is not None:
        loss = loss + (w.to(dw.dtype) * dw).sum()
    dz, dg = torch.autograd.grad(loss, (z, g))
    return out, w, dz, dg


def _assert_all_close(got, want, **tol):
    for name, a, b in zip(("out", "weights", "d_expert_logits", "d_gate_logits"), got, want):
        torch.testing.assert_close(a, b.to(a.dtype), **tol, msg=lambda m, n=name: f"{n}: {m}")


def _twin64(z, g, mode, temperature, dy, dw):
    """The twin in fp64 on the same (detached, upcast) values: the fp32 reference."""
    z64 = z.detach().double().requires_grad_(True)
    g64 = g.detach().double().requires_grad_(True)
    return _run(gated_mix_torch, z64, g64, mode, temperature, dy.double(), None if dw is None else dw.double())


SIZES = [(1, 1, 10), (1, 9, 100), (37, 1, 100), (37, 9, 10), (37, 9, 100), (1000, 9, 10), (1000, 1, 10)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,E,Kc", SIZES)
def test_fp32_outputs_and_grads_match_twin(B, E, Kc, mode):
    z, g = _leaf((B, E, Kc)), _leaf((B, E))
    dy, dw = torch.randn(B, Kc), torch.randn(B, E)
    got = _run(gated_mix, z, g, mode, 0.7, dy, dw, backend="triton")
    want = _twin64(z, g, mode, 0.7, dy, dw)
    _assert_all_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_largest_supported_sizes(mode):
    # E = 64, K = 1024: BLOCK_K < K, so every pass loops over several K chunks.
    z, g = _leaf((2, 64, 1024)), _leaf((2, 64))
    dy, dw = torch.randn(2, 1024), torch.randn(2, 64)
    got = _run(gated_mix, z, g, mode, 1.3, dy, dw, backend="triton")
    want = _twin64(z, g, mode, 1.3, dy, dw)
    _assert_all_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,E,Kc", [(37, 9, 10), (3, 64, 100)])
def test_gpu_block_config_under_interpreter(B, E, Kc, mode, monkeypatch):
    # The interpreter normally gets bigger tiles; run the exact GPU block shapes once
    # (e.g. BLOCK_B = 4 rows per program for E = 9; BLOCK_B = 1 and K chunks of 16 for E = 64).
    monkeypatch.setattr(gm_mod, "_TILE_INTERPRETER", gm_mod._TILE)
    z, g = _leaf((B, E, Kc)), _leaf((B, E))
    dy, dw = torch.randn(B, Kc), torch.randn(B, E)
    got = _run(gated_mix, z, g, mode, 0.7, dy, dw, backend="triton")
    want = _twin64(z, g, mode, 0.7, dy, dw)
    _assert_all_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_gradcheck_fp64(mode, temperature):
    z = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(z, g):  # both outputs, so gradients through the weights are checked too
        return gated_mix(z, g, mode=mode, temperature=temperature, return_weights=True, backend="triton")

    assert torch.autograd.gradcheck(f, (z, g), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_fp64_with_k_chunks(mode, monkeypatch):
    # A tiny tile budget forces BLOCK_K = 4 < K = 5: two K chunks, the last one partial.
    monkeypatch.setattr(gm_mod, "_TILE_INTERPRETER", 16)
    monkeypatch.setattr(gm_mod, "_MIN_BLOCK_K", 2)
    assert gm_mod._gated_mix_config(3, 3, 5, interpreter=True)[2] == 4
    z = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def f(z, g):
        return gated_mix(z, g, mode=mode, temperature=0.8, return_weights=True, backend="triton")

    assert torch.autograd.gradcheck(f, (z, g), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_fp64_matches_twin_tightly(mode):
    z, g = _leaf((5, 9, 10), torch.float64), _leaf((5, 9), torch.float64)
    dy, dw = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    got = _run(gated_mix, z, g, mode, 0.9, dy, dw, backend="triton")
    want = _run(gated_mix_torch, z, g, mode, 0.9, dy, dw)
    _assert_all_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode):
    zt = _leaf((37, 10, 9))  # stored [B, K, E]; viewed as [B, E, K]
    gt = _leaf((9, 37))  # stored [E, B]; viewed as [B, E]
    z, g = zt.transpose(1, 2), gt.t()
    assert not z.is_contiguous() and not g.is_contiguous()
    dy, dw = torch.randn(37, 10), torch.randn(37, 9)
    out, w = gated_mix(z, g, mode=mode, temperature=1.5, return_weights=True, backend="triton")
    dzt, dgt = torch.autograd.grad((out * dy).sum() + (w * dw).sum(), (zt, gt))
    out2, w2 = gated_mix_torch(z, g, mode=mode, temperature=1.5, return_weights=True)
    dzt2, dgt2 = torch.autograd.grad((out2 * dy).sum() + (w2 * dw).sum(), (zt, gt))
    _assert_all_close((out, w, dzt, dgt), (out2, w2, dzt2, dgt2), **FP32_TOL)


# Low precision: the same low-precision inputs, upcast, through the twin in fp64 are the
# reference. Outputs and grads are rounded once to the input dtype, so the error is about
# one unit in the last place: fp16 2^-10 (~1e-3) relative, bf16 2^-7 (~8e-3) relative (the
# interpreter truncates fp32 -> bf16 instead of rounding to nearest, so a full ulp).
LOW_TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_against_fp32_reference(dtype, mode):
    B, E, Kc = 37, 9, 10
    z, g = _leaf((B, E, Kc), dtype, scale=2.0), _leaf((B, E), dtype, scale=2.0)
    dy = torch.randn(B, Kc).to(dtype).float()
    dw = torch.randn(B, E).to(dtype).float()
    out, w, dz, dg = _run(gated_mix, z, g, mode, 0.7, dy, dw, backend="triton")
    for t in (out, w, dz, dg):
        assert t.dtype == dtype
    want = _twin64(z, g, mode, 0.7, dy, dw)
    _assert_all_close(tuple(t.float() for t in (out, w, dz, dg)), want, **LOW_TOL[dtype])


@pytest.mark.parametrize("mode", MODES)
def test_grads_when_weights_unused(mode):
    # Weights not returned: the weights output gets no gradient (HAS_DW = False path).
    z, g = _leaf((37, 9, 10)), _leaf((37, 9))
    dy = torch.randn(37, 10)
    out = gated_mix(z, g, mode=mode, backend="triton")
    got = torch.autograd.grad((out * dy).sum(), (z, g))
    out2 = gated_mix_torch(z, g, mode=mode)
    want = torch.autograd.grad((out2 * dy).sum(), (z, g))
    torch.testing.assert_close(out, out2, **FP32_TOL)
    torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_grads_through_weights_only(mode):
    # Only the returned weights are used: d expert_logits = 0, d gate_logits via the softmax.
    z, g = _leaf((37, 9, 10)), _leaf((37, 9))
    c = torch.randn(37, 9)
    _, w = gated_mix(z, g, mode=mode, temperature=0.6, return_weights=True, backend="triton")
    dz, dg = torch.autograd.grad((w * c).sum(), (z, g), allow_unused=True)
    _, w2 = gated_mix_torch(z, g, mode=mode, temperature=0.6, return_weights=True)
    (dg2,) = torch.autograd.grad((w2 * c).sum(), (g,))
    assert dz is None or torch.count_nonzero(dz) == 0
    torch.testing.assert_close(dg, dg2, **FP32_TOL)


def test_weights_are_a_softmax():
    z, g = torch.randn(37, 9, 10), torch.randn(37, 9)
    out, w = gated_mix(z, g, temperature=0.25, return_weights=True, backend="triton")
    assert w.shape == (37, 9) and out.shape == (37, 10)
    torch.testing.assert_close(w.sum(-1), torch.ones(37), rtol=0, atol=1e-6)
    torch.testing.assert_close(w, torch.softmax(g / 0.25, -1), **FP32_TOL)


def test_single_expert_is_identity():
    z, g = torch.randn(7, 1, 10), torch.randn(7, 1)
    torch.testing.assert_close(gated_mix(z, g, backend="triton"), z[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(gated_mix(z, g, mode="probs", backend="triton"),
                               torch.log_softmax(z[:, 0], -1), **FP32_TOL)


def test_probs_mode_is_stable_for_extreme_logits():
    z = torch.randn(8, 9, 10) * 200.0  # softmax of each expert underflows almost everywhere
    g = torch.randn(8, 9) * 100.0  # most weights underflow to 0
    z.requires_grad_(True)
    g.requires_grad_(True)
    dy = torch.randn(8, 10)
    got = _run(gated_mix, z, g, "probs", 1.0, dy, None, backend="triton")
    want = _twin64(z, g, "probs", 1.0, dy, None)
    for t in got:
        assert torch.isfinite(t).all()
    _assert_all_close(got, want, rtol=1e-5, atol=1e-4)


def test_empty_batch():
    out, w = gated_mix(torch.randn(0, 9, 10), torch.randn(0, 9), return_weights=True, backend="triton")
    assert out.shape == (0, 10) and w.shape == (0, 9)


# ---------------------------------------------------------------- bad inputs

def _bad_cases():
    z, g = torch.randn(4, 9, 10), torch.randn(4, 9)
    return [
        ("rank", lambda f: f(torch.randn(4, 90), g), "rank 3"),
        ("gate rank", lambda f: f(z, torch.randn(4, 9, 1)), "rank 2"),
        ("B mismatch", lambda f: f(z, torch.randn(5, 9)), r"\(4, 9\)"),
        ("E mismatch", lambda f: f(z, torch.randn(4, 8)), r"\(4, 9\)"),
        ("dtype mismatch", lambda f: f(z, g.double()), "float32"),
        ("int dtype", lambda f: f(z.long(), g.long()), "dtype"),
        ("device mismatch", lambda f: f(z, g.to("meta")), "device"),
        ("E > 64", lambda f: f(torch.randn(2, 65, 10), torch.randn(2, 65)), "E=65"),
        ("K > 1024", lambda f: f(torch.randn(2, 3, 1025), torch.randn(2, 3)), "K=1025"),
        ("K = 0", lambda f: f(torch.randn(2, 3, 0), torch.randn(2, 3)), "K=0"),
        ("temperature 0", lambda f: f(z, g, temperature=0.0), "temperature"),
        ("temperature < 0", lambda f: f(z, g, temperature=-1.0), "temperature"),
        ("temperature nan", lambda f: f(z, g, temperature=float("nan")), "temperature"),
        ("unknown mode", lambda f: f(z, g, mode="mean"), "mode"),
        ("not a tensor", lambda f: f(z.tolist(), g), "Tensor"),
    ]


@pytest.mark.parametrize("fn", [lambda *a, **k: gated_mix(*a, backend="triton", **k), gated_mix_torch],
                         ids=["triton", "twin"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_value_error(case, fn):
    _, call, match = case
    with pytest.raises(ValueError, match=match):
        call(fn)


def test_error_names_expected_and_given():
    with pytest.raises(ValueError, match=r"expected shape \(4, 9\).*got \(5, 9\)"):
        gated_mix(torch.randn(4, 9, 10), torch.randn(5, 9), backend="triton")


# ---------------------------------------------------------------- dispatch

def test_backend_torch_runs_the_twin(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton path used with backend='torch'")

    monkeypatch.setattr(gm_mod.GatedMixFunction, "apply", boom)
    z, g = torch.randn(5, 9, 10), torch.randn(5, 9)
    torch.testing.assert_close(gated_mix(z, g, backend="torch"), gated_mix_torch(z, g), rtol=0, atol=0)


def test_backend_auto_runs_triton_under_interpreter(monkeypatch):
    calls = []
    real = gm_mod.GatedMixFunction.apply
    monkeypatch.setattr(gm_mod.GatedMixFunction, "apply", lambda *a: calls.append(1) or real(*a))
    z, g = torch.randn(5, 9, 10), torch.randn(5, 9)
    gated_mix(z, g)  # auto
    assert calls == [1]


def test_use_triton_rules(monkeypatch):
    x = torch.zeros(2)
    assert K.triton_available()
    assert use_triton(x, "auto") and use_triton(x, "triton")
    assert not use_triton(x, "torch")
    with pytest.raises(ValueError, match="backend"):
        use_triton(x, "cuda")
    # Interpreter switched off: auto falls back to torch, a forced triton says why it cannot.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(x, "auto")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton(x, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gated_mix(torch.randn(2, 3, 4), torch.randn(2, 3), backend="triton")
    out = gated_mix(torch.randn(2, 3, 4), torch.randn(2, 3))  # auto -> twin
    assert out.shape == (2, 4)


def test_use_triton_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton", None)
    x = torch.zeros(2)
    assert not K.triton_available()
    assert not use_triton(x, "auto")
    with pytest.raises(RuntimeError, match="not importable"):
        use_triton(x, "triton")
    z, g = torch.randn(2, 3, 4), torch.randn(2, 3)
    torch.testing.assert_close(gated_mix(z, g), gated_mix_torch(z, g), rtol=0, atol=0)


def test_public_exports():
    for name in ("gated_mix", "gated_mix_torch", "pgd_step", "pgd_step_", "pgd_step_torch", "pgd_random_start",
                 "pgd_random_start_torch", "fgsm_step", "use_triton", "triton_available"):
        assert name in K.__all__ and callable(getattr(K, name))


# ---------------------------------------------------------------- real compiler

def test_kernels_compile_for_sm90(tmp_path):
    assert_kernels_compile_for_sm90("gated_mix", tmp_path)


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_non_finite_inputs_poison_only_their_row_on_both_backends(mode):
    """Documented: values are not checked; a NaN/Inf row gives NaN there and nowhere else."""
    torch.manual_seed(0)
    z, g = torch.randn(5, 3, 10), torch.randn(5, 3)
    z[1, 2, 4] = float("nan")
    g[3, 0] = float("inf")
    for backend in ("torch", "triton"):
        out = gated_mix(z, g, mode=mode, backend=backend)
        bad = ~torch.isfinite(out).all(dim=1)
        assert bad.tolist() == [False, True, False, True, False], backend
        assert torch.allclose(out[bad.logical_not()], gated_mix_torch(z, g, mode)[bad.logical_not()], atol=1e-5)
