"""Folded eval-mode BatchNorm: same function as the unfolded engine (outputs, input gradients), never stale."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import random_reference, randomize_, rel_err

import fastmoe_adv as fm
from fastmoe_adv.fold import FoldedExperts, fold_conv_bn, folded

TOL = 1e-5      # fp32: folding reorders a multiply and an add per layer
TOL64 = 1e-10   # fp64: the same maths, rounding far below any real difference
EXECUTORS = ["grouped", "loop"]
# (input shape, experts): shared, per-expert, a subset, one expert; odd sizes everywhere.
CASES = [((3, 3, 13, 11), None), ((5, 2, 3, 9, 15), (1, 3)), ((1, 3, 7, 7), 2), ((2, 3, 3, 10, 10), None)]


@pytest.fixture
def smooth_relu(monkeypatch):
    """ReLU -> softplus in every module that calls F.relu. A ReLU input that fp32 rounding puts at
    0 on one side and 1e-8 on the other switches that unit's gradient off in one model and on in
    the other (seen: a 2% difference from one unit), so input gradients are compared on a smooth
    network; outputs are compared with the real ReLU as well."""
    monkeypatch.setattr(F, "relu", lambda t, inplace=False: F.softplus(t, beta=4.0))


def _engine(num_experts=3, num_classes=7, width=5, seed=0):
    torch.manual_seed(seed)
    return randomize_(fm.GroupedResNet18(num_experts, num_classes, width)).eval()


def _out_and_grad(fn, x, g_out=None):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    g_out = torch.randn_like(out) if g_out is None else g_out.to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, g_out)
    return out.detach(), grad, g_out


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("shape,experts", CASES)
def test_folded_outputs_match_unfolded_fp32(executor, shape, experts):
    engine = _engine(num_experts=shape[1] if len(shape) == 5 and experts is None else 3)
    x = torch.randn(shape)
    with torch.no_grad():
        got = FoldedExperts(engine)(x, experts=experts, executor=executor)
        want = engine(x, experts=experts, executor=executor)
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("shape,experts", CASES)
def test_folded_outputs_and_input_grads_match_unfolded_fp64(executor, shape, experts):
    engine = _engine(num_experts=shape[1] if len(shape) == 5 and experts is None else 3).double()
    x = torch.randn(shape, dtype=torch.float64)
    want, want_grad, g_out = _out_and_grad(lambda z: engine(z, experts=experts, executor=executor), x)
    got, got_grad, _ = _out_and_grad(lambda z: FoldedExperts(engine)(z, experts=experts, executor=executor), x, g_out)
    assert rel_err(got, want) <= TOL64
    assert rel_err(got_grad, want_grad) <= TOL64


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("shape,experts", CASES)
def test_folded_input_grads_match_unfolded_fp32(smooth_relu, executor, shape, experts):
    engine = _engine(num_experts=shape[1] if len(shape) == 5 and experts is None else 3)
    x = torch.randn(shape)
    want, want_grad, g_out = _out_and_grad(lambda z: engine(z, experts=experts, executor=executor), x)
    got, got_grad, _ = _out_and_grad(lambda z: FoldedExperts(engine)(z, experts=experts, executor=executor), x, g_out)
    assert rel_err(got, want) <= TOL
    assert rel_err(got_grad, want_grad) <= TOL


def test_fold_conv_bn_formula():
    engine = _engine()
    conv, bn = engine.layer2[0].conv1, engine.layer2[0].bn1
    w, b = fold_conv_bn(conv, bn)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert rel_err(w, conv.weight * s[:, None, None, None]) <= 1e-6
    assert rel_err(b, bn.bias - bn.running_mean * s) <= 1e-6
    assert not w.requires_grad and not b.requires_grad


def test_folded_forward_runs_no_batchnorm():
    engine = _engine()
    seen, stack, names = set(), [FoldedExperts(engine)(torch.randn(2, 3, 8, 8)).grad_fn], []
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.append(type(node).__name__)
            stack.extend(fn for fn, _ in node.next_functions)
    assert names and not any("BatchNorm" in n for n in names)


def test_folded_follows_optimizer_steps_and_running_stats():
    engine = _engine()
    fold = FoldedExperts(engine)
    x = torch.randn(3, 3, 9, 9)
    fold(x)
    n = fold.num_folds
    fold(x)
    assert fold.num_folds == n, "nothing changed: no refold"
    opt = torch.optim.SGD(engine.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        engine.train()
        engine(torch.randn(4, 3, 9, 9)).square().mean().backward()   # also updates the running stats
        opt.step()
        opt.zero_grad()
        engine.eval()
        with torch.no_grad():
            assert rel_err(fold(x), engine(x)) <= TOL
    assert fold.num_folds == n + 2


def test_folded_follows_load_state_dict_dtype_and_buffer_writes():
    engine = _engine()
    fold = FoldedExperts(engine)
    x = torch.randn(2, 3, 8, 8)
    fold(x)
    engine.load_state_dict(_engine(seed=1).state_dict())
    assert rel_err(fold(x), engine(x)) <= TOL
    with torch.no_grad():
        engine.layer3[1].bn2.running_var.mul_(3.0)      # an in-place write to one buffer
    assert rel_err(fold(x), engine(x)) <= TOL
    engine.double()                                     # parameters replaced: new storage, new dtype
    got = fold(x.double())
    assert got.dtype == torch.float64 and rel_err(got, engine(x.double())) <= TOL64
    with torch.no_grad():
        engine.fc.weight.mul_(2.0)                      # the heads are not folded: always live
    assert rel_err(fold(x.double()), engine(x.double())) <= TOL64


def test_folded_result_ignores_engine_mode():
    engine = _engine()
    x = torch.randn(3, 3, 8, 8)
    want = engine.eval()(x)
    before = copy.deepcopy(engine.state_dict())
    got = FoldedExperts(engine.train())(x)              # eval-mode function whatever the mode
    assert rel_err(got, want) <= TOL
    for k, v in engine.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_folded_bad_input():
    with pytest.raises(TypeError, match="expected a GroupedResNet18, got ResNet18"):
        FoldedExperts(fm.ResNet18(10, 4))
    with pytest.raises(ValueError, match=r"3 channels.*\(2, 4, 8, 8\)"):
        FoldedExperts(_engine())(torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="fold_bn switch"):
        with folded(fm.ReferenceSoftMoE(3, width=4)):
            pass


# ------------------------------------------------------------------ the FastSoftMoE option
@pytest.mark.parametrize("executor", EXECUTORS)
def test_moe_fold_bn_matches_unfolded(smooth_relu, executor):
    ref = random_reference(3, 6, num_classes=7, mix="probs")
    plain = fm.FastSoftMoE.from_reference(ref, executor=executor).eval()
    fast = fm.FastSoftMoE.from_reference(ref, executor=executor).eval()
    fast.fold_bn = True
    x = torch.rand(5, 3, 11, 13)
    want, want_grad, g_out = _out_and_grad(plain, x)
    got, got_grad, _ = _out_and_grad(fast, x, g_out)
    assert fast._folded is not None and fast._folded.num_folds == 1
    assert rel_err(got, want) <= TOL and rel_err(got_grad, want_grad) <= TOL
    want, want_grad, g_out = _out_and_grad(lambda z: plain.experts_forward(z, experts="fgsm"), x)
    got, got_grad, _ = _out_and_grad(lambda z: fast.experts_forward(z, experts="fgsm"), x, g_out)
    assert rel_err(got, want) <= TOL and rel_err(got_grad, want_grad) <= TOL


def test_moe_fold_bn_is_off_by_default_and_ignored_in_train_mode():
    ref = random_reference(3, 4)
    assert fm.FastSoftMoE(3, width=4).fold_bn is False
    a = fm.FastSoftMoE.from_reference(ref, executor="grouped").train()
    b = fm.FastSoftMoE.from_reference(ref, executor="grouped").train()
    b.fold_bn = True
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(a(x), b(x))                      # train mode: batch statistics, the same path
    assert b._folded is None


def test_folded_context_sets_and_restores(smooth_relu):
    ref = random_reference(3, 4)
    moe = fm.FastSoftMoE.from_reference(ref).eval()
    x = torch.rand(3, 3, 8, 8)
    want = moe(x)
    with folded(moe) as m:
        assert m is moe and moe.fold_bn is True
        assert rel_err(moe(x), want) <= TOL
        with torch.no_grad():
            moe.experts.conv1.weight.mul_(1.5)           # a change inside the block is seen at once
        changed = moe(x)
    assert moe.fold_bn is False
    assert rel_err(changed, moe(x)) <= TOL
    with pytest.raises(RuntimeError, match="boom"):
        with folded(moe):
            raise RuntimeError("boom")
    assert moe.fold_bn is False
