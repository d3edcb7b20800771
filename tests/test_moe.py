"""FastSoftMoE against its reference twin: outputs, input and parameter gradients, BN stats."""
import copy

import pytest
import torch
from helpers import grouped_grads_per_expert, random_reference, randomize_, rel_err

import fastmoe_adv as fm

TOL = 1e-5


def _compare(ref, fast, x, train):
    ref.train(train)
    fast.train(train)
    xr = x.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    out_r = ref(xr, return_details=True)
    out_f = fast(xf, return_details=True)
    assert out_f.logits.shape == out_r.logits.shape == (x.shape[0], ref.num_classes)
    assert rel_err(out_f.logits, out_r.logits) <= TOL
    assert rel_err(out_f.expert_logits, out_r.expert_logits) <= TOL
    assert rel_err(out_f.gate_weights, out_r.gate_weights) <= TOL
    g = torch.randn_like(out_r.logits)
    (out_r.logits * g).sum().backward()
    (out_f.logits * g).sum().backward()
    assert rel_err(xf.grad, xr.grad) <= TOL
    # every parameter gradient: the gate's directly, the experts' through the per-expert split
    for (n, pf), (_, pr) in zip(fast.gate.named_parameters(), ref.gate.named_parameters()):
        assert rel_err(pf.grad, pr.grad) <= TOL, n
    for e, grads in enumerate(grouped_grads_per_expert(fast.experts)):
        for k, p in ref.experts[e].named_parameters():
            assert rel_err(grads[k], p.grad) <= TOL, (e, k)
    # running statistics (train mode updates them; eval mode must not)
    for e, sd in enumerate(fast.expert_state_dicts()):
        for k, v in ref.experts[e].state_dict().items():
            if k.endswith("num_batches_tracked"):
                assert torch.equal(sd[k], v), (e, k)
            else:
                assert rel_err(sd[k], v) <= TOL, (e, k)
    for (k, a), (_, b) in zip(fast.gate.state_dict().items(), ref.gate.state_dict().items()):
        assert rel_err(a.float(), b.float()) <= TOL, k


@pytest.mark.parametrize("executor", ["grouped", "loop"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("num_experts,width,batch,mix", [
    (9, 4, 3, "logits"), (3, 16, 5, "probs"), (1, 8, 7, "logits"), (3, 6, 1 + 2, "logits"), (9, 4, 5, "probs"),
])
def test_from_reference_matches(executor, train, num_experts, width, batch, mix):
    ref = random_reference(num_experts, width, mix=mix, temperature=1.7)
    fast = fm.FastSoftMoE.from_reference(ref, executor=executor)
    x = torch.rand(batch, 3, 16, 16)
    _compare(ref, fast, x, train)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_both_mix_backends_match_reference(backend):
    ref = random_reference(3, 4, mix="probs")
    fast = fm.FastSoftMoE.from_reference(ref, backend=backend, executor="grouped")
    _compare(ref, fast, torch.rand(5, 3, 16, 16), train=True)


def test_to_reference_round_trip():
    ref = random_reference(3, 4)
    fast = fm.FastSoftMoE.from_reference(ref)
    back = fast.to_reference()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(back.eval()(x), ref.eval()(x))
    assert back.config() == ref.config()


def test_load_experts_gives_each_expert_on_normalized_input():
    torch.manual_seed(1)
    experts = [randomize_(fm.ResNet18(10, 4)).eval() for _ in range(9)]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    moe = fm.FastSoftMoE(num_experts=9, width=4, mean=mean, std=std).eval()
    moe.load_experts([m.state_dict() for m in experts])
    x = torch.rand(3, 3, 32, 32)
    details = moe(x, return_details=True)
    xn = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    for e, m in enumerate(experts):
        assert rel_err(details.expert_logits[:, e], m(xn)) <= TOL
    for m, sd in zip(experts, moe.expert_state_dicts()):
        for k, v in m.state_dict().items():
            assert torch.equal(sd[k], v), k


def test_gate_is_soft_and_flat():
    ref = random_reference(9, 4)
    moe = fm.FastSoftMoE.from_reference(ref).eval()
    with torch.no_grad():
        moe.gate.fc.weight.mul_(1e4)  # push the gate hard towards one expert
        w = moe(torch.rand(6, 3, 32, 32), return_details=True).gate_weights
    assert torch.allclose(w.sum(-1), torch.ones(6), atol=1e-5)
    assert (w > 0).all(), "every expert must keep a non-zero weight"
    fresh = fm.FastSoftMoE(num_experts=9, width=4).eval()
    w0 = fresh(torch.rand(2, 3, 32, 32), return_details=True).gate_weights
    assert torch.allclose(w0, torch.full_like(w0, 1 / 9))  # starts flat


def test_experts_forward_roles_and_per_expert_input():
    ref = random_reference(9, 4)
    fast = fm.FastSoftMoE.from_reference(ref).eval()
    assert fast.roles == ["clean"] + ["fgsm"] * 4 + ["pgd"] * 4
    assert fast.role_slice("pgd") == slice(5, 9)
    x = torch.rand(2, 4, 3, 32, 32)
    got = fast.experts_forward(x, experts="pgd")
    want = ref.eval().experts_forward(x, experts="pgd")
    assert got.shape == (2, 4, 10)
    assert rel_err(got, want) <= TOL


def test_channels_last_and_bf16_autocast():
    ref = random_reference(3, 8)
    fast = fm.FastSoftMoE.from_reference(ref).eval()
    x = torch.rand(4, 3, 32, 32)
    want = ref.eval()(x)
    cl = fast.to(memory_format=torch.channels_last)
    assert rel_err(cl(x.contiguous(memory_format=torch.channels_last)), want) <= TOL
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(x)
    # Convolutions ran in bf16 (the result differs from fp32); the heads' bias add promotes
    # the logits back to fp32. bf16 has an 8-bit mantissa; through 18 layers the logits stay within a few percent.
    assert 0 < rel_err(got.float(), want) <= 5e-2


def test_default_roles():
    assert fm.default_roles(9) == ["clean"] + ["fgsm"] * 4 + ["pgd"] * 4
    assert fm.default_roles(1) == ["clean"]
    assert fm.default_roles(3) == ["clean", "fgsm", "pgd"]


# ------------------------------------------------------------------ errors
def test_bad_inputs():
    moe = fm.FastSoftMoE(num_experts=3, width=4)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\].*\(2, 1, 32, 32\)"):
        moe(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        moe(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="float images.*torch.uint8"):
        moe(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        moe([[0.0]])
    with pytest.raises(ValueError, match=r"per-expert input \[B,2,3,H,W\]"):
        moe.experts_forward(torch.rand(2, 3, 3, 32, 32), experts=(0, 2))
    with pytest.raises(ValueError, match="expected 3 state_dicts.*got 9"):
        moe.load_experts([fm.ResNet18(10, 4).state_dict() for _ in range(9)])
    with pytest.raises(ValueError, match="no expert has role 'pgd'"):
        fm.FastSoftMoE(num_experts=1, width=4).role_slice("pgd")


@pytest.mark.parametrize("kwargs,match", [
    (dict(mean=(0.5, 0.5)), "mean must have 3 values.*got 2"),
    (dict(std=(0.5, 0.5, 0.5, 0.5)), "std must have 3 values.*got 4"),
    (dict(std=(0.5, 0.0, 0.5)), "std must be > 0"),
    (dict(mean="abc"), "mean must have 3 values|mean must be a sequence"),
    (dict(mix="max"), "mix must be one of.*'max'"),
    (dict(backend="cuda"), "backend must be one of.*'cuda'"),
    (dict(executor="vmap"), "executor must be one of.*'vmap'"),
    (dict(temperature=0.0), "temperature must be a float > 0"),
    (dict(temperature=float("inf")), "temperature must be a float > 0 \\(finite\\), got inf"),
    (dict(std=(float("nan"), 1.0, 1.0)), "std must be finite per channel"),
    (dict(mean=(float("inf"), 0.5, 0.5)), "mean must be finite per channel"),
    (dict(std=(-0.1, 1.0, 1.0)), "std must be > 0 per channel"),
    (dict(num_experts=65), "num_experts must be <= 64 \\(the limit of the fused gated_mix"),
    (dict(num_experts=65, backend="torch"), "num_experts must be <= 64"),
    (dict(num_classes=1025, backend="triton"), "num_classes must be <= 1024 \\(the limit of the fused gated_mix"),
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(roles=["clean", "pgd", "fgsm", "pgd"]), "expected 3 roles"),
    (dict(roles=["pgd", "clean", "pgd"]), "contiguous"),
    (dict(roles=["clean", "fgsm", "cw"]), "unknown expert role 'cw'"),
])
def test_bad_config(kwargs, match):
    kwargs = dict(dict(num_experts=3, width=4), **kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        fm.FastSoftMoE(**kwargs)


def test_expert_and_class_limits():
    # gated_mix (both backends) takes at most 64 experts and 1024 classes: the limits themselves work ...
    moe = fm.FastSoftMoE(num_experts=64, num_classes=3, width=1, backend="torch", gate_hidden=1).eval()
    assert moe(torch.rand(1, 3, 4, 4)).shape == (1, 3)
    assert fm.FastSoftMoE(num_experts=1, num_classes=1024, width=1).num_classes == 1024
    # ... and the reference, which mixes with plain torch ops, has none.
    assert fm.ReferenceSoftMoE(num_experts=2, num_classes=1025, width=1).num_classes == 1025


# ------------------------------------------------------------------ input checks, dtypes, empty batches
TWINS = [fm.FastSoftMoE, fm.ReferenceSoftMoE]
BAD_PIXELS = [
    (lambda x: x * 255, r"min \d+\.\d+ and max \d{2,3}\."),             # 0..255 images
    (lambda x: x.index_fill(0, torch.tensor([1]), float("nan")), "min nan"),
    (lambda x: x.index_fill(0, torch.tensor([0]), float("inf")), "min 0.1.* and max inf"),
    (lambda x: x - 0.5, "min -0.3"),
]


@pytest.mark.parametrize("cls", TWINS)
@pytest.mark.parametrize("entry", ["forward", "experts_forward"])
def test_both_entry_points_check_their_input(cls, entry):
    moe = cls(num_experts=3, width=4).eval()
    call = getattr(moe, entry)
    with pytest.raises(TypeError, match="float images.*torch.uint8"):
        call(torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\)"):
        call(torch.rand(2, 1, 8, 8))  # not broadcast to 3 channels
    with pytest.raises(TypeError, match="torch.Tensor"):
        call([[0.0]])
    for corrupt, match in BAD_PIXELS:
        with pytest.raises(ValueError, match=f"finite pixels in \\[0, 1\\], got {match}"):
            call(corrupt(torch.rand(2, 3, 8, 8) * 0.8 + 0.1))


@pytest.mark.parametrize("cls", TWINS)
def test_check_inputs_switch(cls):
    x = torch.rand(2, 3, 8, 8).index_fill(0, torch.tensor([1]), float("nan"))
    moe = cls(num_experts=3, width=4, check_inputs=False).eval()
    assert moe.check_inputs is False
    out = moe(x)                                        # not checked: the NaN goes through
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    assert torch.isnan(moe.experts_forward(x)[1]).all()
    moe.check_inputs = True                             # the attribute switches it back on
    with pytest.raises(ValueError, match="min nan"):
        moe(x)
    with pytest.raises(ValueError, match="min nan"):
        moe.experts_forward(x)
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\)"):  # shape checks stay on either way
        cls(num_experts=3, width=4, check_inputs=False)(torch.rand(2, 1, 8, 8))
    assert cls(num_experts=3, width=4).check_inputs is True   # default on


def test_unchecked_inputs_context_reaches_wrapped_models_and_restores():
    from fastmoe_adv.checks import unchecked_inputs
    a, b = fm.FastSoftMoE(num_experts=3, width=4).eval(), fm.ReferenceSoftMoE(num_experts=3, width=4).eval()
    b.check_inputs = False
    wrapper = torch.nn.Sequential(a, torch.nn.Identity()).append(b)
    x = torch.full((1, 3, 8, 8), 2.0)
    with unchecked_inputs(wrapper) as m:
        assert m is wrapper and a.check_inputs is False
        a(x)                                            # out of range, not checked inside
    assert a.check_inputs is True and b.check_inputs is False
    with pytest.raises(ValueError, match="max 2.0"):
        a(x)
    with pytest.raises(RuntimeError, match="boom"):
        with unchecked_inputs(a):
            raise RuntimeError("boom")
    assert a.check_inputs is True


def test_pixel_check_stands_aside_while_compiling(monkeypatch):
    # Inside torch.compile tracing (and CUDA graph capture) a device-to-host read breaks the
    # graph or the capture: the range check is skipped there, the free checks stay.
    moe = fm.FastSoftMoE(num_experts=3, width=4).eval()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.isfinite(moe(torch.full((1, 3, 8, 8), 2.0))).all()
    with pytest.raises(TypeError, match="torch.uint8"):
        moe(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_check_inputs_survives_twin_conversion():
    ref = random_reference(3, 4, check_inputs=False)
    assert fm.FastSoftMoE.from_reference(ref).check_inputs is False
    assert fm.FastSoftMoE.from_reference(ref).to_reference().check_inputs is False


@pytest.mark.parametrize("cls", TWINS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtype_is_refused_naming_both(cls, dtype):
    moe = cls(num_experts=3, width=4).eval()
    x = torch.rand(2, 3, 8, 8, dtype=dtype)
    with pytest.raises(TypeError, match=f"images have dtype {dtype} but the model's parameters are torch.float32"):
        moe(x)
    with pytest.raises(TypeError, match=f"images have dtype {dtype}"):
        moe.experts_forward(x)


def test_fp64_model_takes_fp64_input_and_autocast_takes_any():
    ref = random_reference(3, 4)
    fast = fm.FastSoftMoE.from_reference(ref).eval()
    x = torch.rand(3, 3, 16, 16)
    want = ref.eval()(x)
    got64 = copy.deepcopy(fast).double()(x.double())
    assert got64.dtype == torch.float64 and rel_err(got64, want) <= TOL
    with torch.autocast("cpu", dtype=torch.bfloat16):   # autocast casts fp16/bf16/fp32 per op
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = fast(x.to(dtype))
            assert 0 < rel_err(got.float(), want) <= 5e-2, dtype
        with pytest.raises(TypeError, match="images have dtype torch.float64"):  # autocast leaves fp64 alone
            fast(x.double())


@pytest.mark.parametrize("cls,kw", [(fm.ReferenceSoftMoE, {}), (fm.FastSoftMoE, dict(executor="grouped")),
                                    (fm.FastSoftMoE, dict(executor="loop", backend="triton")),
                                    (fm.FastSoftMoE, dict(executor="auto", mix="probs"))])
def test_empty_batch_eval_gives_empty_outputs(cls, kw):
    moe = cls(num_experts=3, num_classes=7, width=4, **kw).eval()
    x = torch.rand(0, 3, 16, 16, requires_grad=True)
    out = moe(x, return_details=True)
    assert out.logits.shape == (0, 7) and out.expert_logits.shape == (0, 3, 7) and out.gate_weights.shape == (0, 3)
    assert all(t.dtype == torch.float32 for t in out)
    out.logits.sum().backward()
    assert x.grad.shape == x.shape
    assert moe.experts_forward(torch.rand(0, 2, 3, 16, 16), experts=(1, 3)).shape == (0, 2, 7)
    assert moe.experts_forward(torch.rand(0, 3, 16, 16), experts="pgd").shape == (0, 1, 7)


@pytest.mark.parametrize("cls", TWINS)
def test_empty_batch_in_train_mode_is_refused(cls):
    moe = cls(num_experts=3, width=4).train()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{cls.__name__} got an empty batch \(B=0\) in training mode"):
        moe(torch.rand(0, 3, 16, 16))
    with pytest.raises(ValueError, match="empty batch"):
        moe.experts_forward(torch.rand(0, 3, 16, 16))
    for k, v in moe.state_dict().items():
        assert torch.equal(v, before[k]), k  # no NaN running statistics


def test_shared_names_come_from_constants():
    from fastmoe_adv import constants, grouped, moe
    for name in ("CIFAR10_MEAN", "CIFAR10_STD", "MIX_MODES", "BACKENDS", "ROLES"):
        assert getattr(moe, name) is getattr(constants, name), name
    assert grouped.EXECUTORS is constants.EXECUTORS


# ------------------------------------------------------------------ fused BatchNorm in the mixture
# FastSoftMoE(bn_backend="triton") (kernels under the CPU interpreter) against ReferenceSoftMoE.
# Both are held to the reference run in fp64: each result within BN_TOL of it, or within
# BN_FACTOR times the fp32 reference's own error (a gradient: the reference's worst gradient
# error of the step). At B=3 and 7x7 images the last stage sees 3 values per channel in train
# mode, where the BatchNorm backward cancels in fp32 (see tests/test_grouped.py).
BN_TOL, BN_FACTOR = 2e-5, 10.0


def _results(model, x, g):
    """[logits, expert logits, gate weights, input grad, gate grads..., expert grads..., expert buffers...]
    in ReferenceSoftMoE's key order, for either twin."""
    xr = x.clone().to(model.gate.fc.weight.dtype).requires_grad_()
    out = model(xr, return_details=True)
    (out.logits * g.to(out.logits.dtype)).sum().backward()
    found = list(out) + [xr.grad] + [p.grad for p in model.gate.parameters()]
    keys = [k for k, _ in fm.ResNet18(model.num_classes, model.width).named_parameters()]
    if isinstance(model, fm.FastSoftMoE):
        grads, states = grouped_grads_per_expert(model.experts), model.expert_state_dicts()
    else:
        grads = [dict(m.named_parameters()) for m in model.experts]
        grads = [{k: p.grad for k, p in d.items()} for d in grads]
        states = [m.state_dict() for m in model.experts]
    found += [d[k] for d in grads for k in keys]
    found += [v.clone() for sd in states for k, v in sd.items() if k.split(".")[-1].startswith("running")]
    return found, 4 + len(list(model.gate.parameters())) + len(keys) * model.num_experts


@pytest.mark.parametrize("executor,train,channels_last", [
    ("grouped", True, False), ("grouped", False, True), ("loop", True, True), ("loop", False, False)])
def test_triton_bn_backend_matches_reference(executor, train, channels_last):
    ref = random_reference(3, 4, temperature=1.7).train(train)
    exact = copy.deepcopy(ref).double()
    fast = fm.FastSoftMoE.from_reference(ref, executor=executor, bn_backend="triton").train(train)
    assert fast.bn_backend == "triton" and fast.experts.bn_backend == "triton"
    x = torch.rand(3, 3, 7, 7)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 10)
    ours, n_grads = _results(fast, x, g)
    twin, _ = _results(ref, x, g)
    want, _ = _results(exact, x, g)
    assert len(ours) == len(twin) == len(want) > n_grads
    grad_noise = max(rel_err(b, w) for b, w in zip(twin[3:n_grads], want[3:n_grads]))
    for i, (a, b, w) in enumerate(zip(ours, twin, want)):
        noise = grad_noise if 3 <= i < n_grads else rel_err(b, w)
        assert rel_err(a, w) <= max(BN_TOL, BN_FACTOR * noise), i


def test_bn_backend_is_a_runtime_choice_not_architecture():
    fast = fm.FastSoftMoE(num_experts=3, width=4, bn_backend="torch")
    assert "bn_backend" not in fast.config()   # checkpoints (train/state.py) rebuild from config()
    fm.FastSoftMoE(**fast.config())
    fast.bn_backend = "auto"
    assert fast.experts.bn_backend == "auto"
    with pytest.raises(ValueError, match="bn_backend must be one of.*'cuda'"):
        fast.bn_backend = "cuda"
    with pytest.raises(ValueError, match="bn_backend must be one of.*'cuda'"):
        fm.FastSoftMoE(num_experts=3, width=4, bn_backend="cuda")
