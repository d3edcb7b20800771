"""FastSoftMoE against its reference twin: outputs, input and parameter gradients, BN stats."""
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
    (dict(roles=["clean", "pgd", "fgsm", "pgd"]), "expected 3 roles"),
    (dict(roles=["pgd", "clean", "pgd"]), "contiguous"),
    (dict(roles=["clean", "fgsm", "cw"]), "unknown expert role 'cw'"),
])
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fm.FastSoftMoE(num_experts=3, width=4, **kwargs)
