"""fastmoe_adv.apgd: the checkpoint schedule against the paper's formula, the halving rule,
agreement with torchattacks' APGD / APGD-T, threat-model invariants, the mixture losses,
restored model state, no host syncs in the step loop, empty batches and errors."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_
from test_attacks import SyncCounter

import fastmoe_adv as fm
from fastmoe_adv import apgd as AP
from fastmoe_adv import attacks as A


def conv_model(seed=0, k=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 16, k)).eval()


def correct_data(model, b=64, seed=1):
    """Images with labels the model gets right: robust accuracy starts at 100%."""
    x = torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)


def small_moe(seed=0):
    torch.manual_seed(seed)
    ref = randomize_(fm.ReferenceSoftMoE(num_experts=3, num_classes=10, width=4, roles=["clean", "fgsm", "pgd"]))
    return fm.FastSoftMoE.from_reference(ref).eval(), ref.eval()


def robust_acc(model, x_adv, y):
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- schedule and halving rule
def _paper_checkpoints(n):
    """Croce & Hein 2020, Sec. 3.2, in exact rational arithmetic."""
    p = [Fraction(0), Fraction(22, 100)]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100))
        if nxt > 1:
            break
        p.append(nxt)
    return sorted({math.ceil(q * n) for q in p})


@pytest.mark.parametrize("steps", [0, 1, 5, 10, 20, 33, 100, 250, 1000])
def test_checkpoints_follow_the_paper(steps):
    assert AP.apgd_checkpoints(steps) == _paper_checkpoints(steps)


def test_checkpoints_for_100_steps():
    assert AP.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


def test_halving_rule_and_restart_from_best():
    b = 4
    x, best = torch.rand(b, 3, 2, 2), torch.rand(b, 3, 2, 2)
    s = AP._State(x=x, x_prev=x, grad=torch.randn(b, 3, 2, 2), loss=torch.rand(b), best=best,
                  best_loss=torch.tensor([1.0, 1.0, 2.0, 2.0]), best_grad=torch.randn(b, 3, 2, 2), adv=x,
                  fooled=torch.zeros(b, dtype=torch.bool), eta=torch.full((b,), 0.1),
                  wins=torch.tensor([10.0, 20.0, 20.0, 20.0]), check_loss=torch.tensor([0.5, 0.5, 2.0, 2.0]),
                  reduced=torch.tensor([False, False, True, False]))
    old_x, old_grad, best_grad = s.x.clone(), s.grad.clone(), s.best_grad.clone()
    AP._checkpoint(s, 0.75 * 22)
    # 0: too few loss increases (10 < 16.5); 1: enough, and best improved; 2: best stalled but eta
    # was halved last time; 3: best stalled and eta unchanged -> condition 2.
    assert s.reduced.tolist() == [True, False, False, True]
    torch.testing.assert_close(s.eta, torch.tensor([0.05, 0.1, 0.1, 0.05]))
    for i, red in enumerate(s.reduced.tolist()):
        assert torch.equal(s.x[i], best[i] if red else old_x[i])
        assert torch.equal(s.grad[i], best_grad[i] if red else old_grad[i])
    assert torch.equal(s.check_loss, s.best_loss) and not s.wins.any()


# ----------------------------------------------------------------------------- agreement with torchattacks
@pytest.mark.parametrize("norm,eps", [("Linf", 0.06), ("L2", 0.6)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_agrees_with_torchattacks(norm, eps, loss):
    torchattacks = pytest.importorskip("torchattacks")
    model = conv_model()
    x, y = correct_data(model)
    ours = robust_acc(model, AP.apgd(model, x, y, eps, steps=20, norm=norm, loss=loss, generator=gen()), y)
    theirs = robust_acc(model, torchattacks.APGD(model, norm=norm, eps=eps, steps=20, loss=loss, seed=0)(x, y), y)
    assert 0.05 < theirs < 0.95  # the comparison means something only away from 0% and 100%
    assert abs(ours - theirs) <= 2 / 64 + 1e-9, (ours, theirs)


def test_apgd_targeted_agrees_with_torchattacks():
    torchattacks = pytest.importorskip("torchattacks")
    model = conv_model()
    x, y = correct_data(model)
    ours = robust_acc(model, AP.apgd_targeted(model, x, y, 0.06, steps=20, generator=gen()), y)
    theirs = robust_acc(model, torchattacks.APGDT(model, eps=0.06, steps=20, n_classes=10, seed=0)(x, y), y)
    assert 0.05 < theirs < 0.95
    assert abs(ours - theirs) <= 2 / 64 + 1e-9, (ours, theirs)


def test_apgd_on_mixture_agrees_with_torchattacks_on_reference():
    torchattacks = pytest.importorskip("torchattacks")
    fast, ref = small_moe()
    x, y = correct_data(ref, b=16)
    # A random width-4 mixture barely reacts to small perturbations: a large radius makes it fall.
    ours = robust_acc(ref, AP.apgd(fast, x, y, 0.3, steps=8, generator=gen()), y)
    theirs = robust_acc(ref, torchattacks.APGD(ref, eps=0.3, steps=8, seed=0)(x, y), y)
    assert 0 < theirs < 1.0
    assert abs(ours - theirs) <= 2 / 16 + 1e-9, (ours, theirs)


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("norm,eps", [("Linf", 0.05), ("L2", 0.5)])
def test_results_in_ball_and_box_and_worst_case(norm, eps):
    model = conv_model(seed=2)
    x, y = correct_data(model, b=16, seed=3)
    y[:3] = (y[:3] + 1) % 10  # three points wrong before the attack: returned unchanged
    for out in (AP.apgd(model, x, y, eps, steps=6, norm=norm, restarts=2, generator=gen()),
                AP.apgd_targeted(model, x, y, eps, steps=6, n_targets=3, norm=norm, generator=gen()),
                AP.apgd(model, x, y, eps, steps=6, norm=norm, loss="dlr", generator=gen())):
        assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
        dist = (out - x).flatten(1).abs().amax(1) if norm == "Linf" else (out - x).flatten(1).norm(dim=1)
        assert (dist <= eps + 1e-5).all()
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out[:3], x[:3])
        assert robust_acc(model, out, y) <= 13 / 16  # never better than clean


def test_apgd_at_least_as_strong_as_its_start_and_eps_zero_is_identity():
    model = conv_model(seed=4)
    x, y = correct_data(model, b=16)
    assert torch.equal(AP.apgd(model, x, y, 0.0, steps=3), x)
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y, reduction="none")
        out = AP.apgd(model, x, y, 0.02, steps=5, generator=gen())
        adv_loss = F.cross_entropy(model(out), y, reduction="none")
    fooled = model(out).argmax(1) != y
    assert (adv_loss[~fooled] >= clean_loss[~fooled] - 1e-6).all()


def test_reproducible_with_generator():
    model = conv_model()
    x, y = correct_data(model, b=8)
    a = AP.apgd(model, x, y, 0.03, steps=4, generator=gen(3))
    assert torch.equal(a, AP.apgd(model, x, y, 0.03, steps=4, generator=gen(3)))


# ----------------------------------------------------------------------------- mixture losses
@pytest.mark.parametrize("loss", ["moe_ce", "moe_gate"])
def test_moe_losses_by_hand_and_fast_equals_reference(loss):
    fast, ref = small_moe()
    x, y = correct_data(ref, b=5)
    out = ref(x, return_details=True)
    ce_e = torch.stack([F.cross_entropy(out.expert_logits[:, e], y, reduction="none") for e in range(3)], 1)
    expected = (out.gate_weights * ce_e).sum(1)
    if loss == "moe_gate":
        expected = expected + F.cross_entropy(out.logits, y, reduction="none")
    got, logits = A.attack_loss(ref, x, y, loss)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    l_fast, _, g_fast = A.loss_and_grad(fast, x, y, loss)
    l_ref, _, g_ref = A.loss_and_grad(ref, x, y, loss)
    torch.testing.assert_close(l_fast, l_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-6, rtol=1e-4)
    adv = AP.apgd(fast, x, y, 0.03, steps=3, loss=loss, generator=gen())
    assert (adv - x).abs().max() <= 0.03 + 1e-6
    with torch.no_grad():
        assert A.attack_loss(ref, adv, y, loss)[0].sum() > got.sum()  # the attack raised its own loss


def test_moe_gate_gradient_moves_weight_to_the_weakest_expert():
    fast, _ = small_moe()
    x, y = correct_data(fast, b=4)
    with torch.enable_grad():
        xr = x.clone().requires_grad_(True)
        out = fast(xr, return_details=True)
        ce_e = torch.stack([F.cross_entropy(out.expert_logits[:, e], y, reduction="none") for e in range(3)], 1)
        weakest = ce_e.argmax(1)
        w_weak = out.gate_weights.gather(1, weakest[:, None]).sum()
        (g_weak,) = torch.autograd.grad(w_weak, xr, retain_graph=True)
        (g_loss,) = torch.autograd.grad(A.attack_loss(fast, xr, y, "moe_gate")[0].sum(), xr)
    # A small step up the loss's gradient also raises the weakest expert's gate weight.
    assert (g_weak * g_loss).sum() > 0


# ----------------------------------------------------------------------------- state, syncs, errors
def test_model_mode_and_parameter_grads_untouched():
    model = conv_model().train()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    x, y = correct_data(model.eval(), b=4)
    model.train()
    AP.apgd(model, x, y, 0.03, steps=2)
    AP.apgd_targeted(model, x, y, 0.03, steps=2, n_targets=2)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.5)) and params[1].grad is None


def test_no_host_sync_inside_the_step_loop():
    model = conv_model()
    x, y = correct_data(model, b=4)
    counts = {}
    for steps in (2, 9):
        with SyncCounter() as c:
            AP.apgd(model, x, y, 0.03, steps=steps, generator=gen())
            AP.apgd(model, x, y, 0.5, steps=steps, norm="L2", loss="dlr", generator=gen())
        counts[steps] = c.count
    assert counts[2] == counts[9], counts


@pytest.mark.parametrize("fn", [AP.apgd, AP.apgd_targeted])
def test_empty_batch(fn):
    model = conv_model()
    x = torch.rand(0, 3, 8, 8)
    out = fn(model, x, torch.zeros(0, dtype=torch.long), 0.03, steps=3)
    assert out.shape == (0, 3, 8, 8)


def test_errors():
    model = conv_model()
    x, y = correct_data(model, b=2)
    with pytest.raises(ValueError, match="norm"):
        AP.apgd(model, x, y, 0.03, norm="L1")
    with pytest.raises(ValueError, match="loss"):
        AP.apgd(model, x, y, 0.03, loss="hinge")
    with pytest.raises(ValueError, match="return_details"):
        AP.apgd(model, x, y, 0.03, loss="moe_ce")
    with pytest.raises(ValueError, match="n_targets"):
        AP.apgd_targeted(model, x, y, 0.03, n_targets=10)
    with pytest.raises(ValueError, match="eps"):
        AP.apgd(model, x, y, float("nan"))
    with pytest.raises(ValueError, match="rho"):
        AP.apgd(model, x, y, 0.03, rho=1.5)
    with pytest.raises(ValueError, match="steps"):
        AP.apgd(model, x, y, 0.03, steps=2.5)
    two = conv_model(k=3)
    with pytest.raises(ValueError, match="at least 4 classes"):
        AP.apgd_targeted(two, x, torch.zeros(2, dtype=torch.long), 0.03, n_targets=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AP.apgd(model, x + 1, y, 0.03)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(fm.kernels.interpreter_enabled(), reason="the Triton interpreter copies CUDA tensors to the "
                    "host; run with TRITON_INTERPRET=0 (as tests/test_kernels_cuda.py)")
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_step_loops_never_sync_on_cuda(norm):
    model = conv_model().cuda()
    x = torch.rand(8, 3, 8, 8, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call inside raises
    try:
        AP._apgd_run(model, x, y, 0.03, 12, norm, "ce", None, AP.APGD_RHO, AP.APGD_MOMENTUM, g)
        A._pgd_once(model, x, y, 0.03, 0.01, 5, True, g, norm, "dlr")
    finally:
        torch.cuda.set_sync_debug_mode(0)
