"""fastmoe_adv.attacks: FGSM / PGD (L-inf and L2) against plain-torch reference loops (and torchattacks
when installed), invariants, projections (hypothesis), losses, restored model state, restarts, the
one-pass per-expert attack, empty batches, host syncs in the step loops, errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import fastmoe_adv as fm
from fastmoe_adv import attacks as A

EXACT = dict(atol=1e-6, rtol=0)  # the fused step does the reference's fp32 ops: equal up to rounding


# ----------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    """A fast model on [B,3,8,8] with a BatchNorm and a Dropout (so eval mode matters)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 4 * 4, num_classes)

    def forward(self, x):
        h = F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(h.flatten(1)))


def small_cnn(seed=0):
    torch.manual_seed(seed)
    m = SmallCNN()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def small_moe(mix="logits", seed=0, executor="grouped"):
    torch.manual_seed(seed)
    ref = randomize_(fm.ReferenceSoftMoE(num_experts=5, num_classes=10, width=4, mix=mix,
                                         roles=["clean", "fgsm", "fgsm", "pgd", "pgd"]))
    return fm.FastSoftMoE.from_reference(ref, executor=executor).eval(), ref.eval()


def data(b=6, size=8, seed=1, k=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.randint(0, k, (b,), generator=g)


# ----------------------------------------------------------------------------- host syncs
class SyncCounter(TorchFunctionMode):
    """Counts the Python-level calls that force a host-device sync on an accelerator: ``.item()``,
    ``bool(t)``, ``int(t)``, ``.tolist()``, ``.nonzero()``, ``.cpu()``, boolean-mask indexing, ...
    On CPU there is nothing to wait for, so counting them is the honest check; on CUDA
    ``torch.cuda.set_sync_debug_mode`` checks the same (tests/test_kernels_cuda.py style)."""

    SYNCING = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
               torch.Tensor.numpy, torch.Tensor.cpu, torch.masked_select, torch.Tensor.masked_select,
               torch.unique, torch.Tensor.unique, torch.Tensor.any, torch.any, torch.Tensor.all, torch.all}

    def __init__(self):
        super().__init__()
        self.count, self.calls = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING or (func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__)
                                    and self._bool_index(args[1])):
            self.count += 1
            self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _bool_index(index):
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


# ----------------------------------------------------------------------------- references
def ref_fgsm(model, x, y, eps):
    x_req = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x_req), y), x_req)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def ref_pgd(model, x, y, eps, alpha, steps, x0=None):
    x_adv = x.clone() if x0 is None else x0.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + alpha * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def ref_random_start(x, eps, generator):
    u = torch.rand(x.shape, generator=generator)
    return (x + (u * 2 - 1) * eps).clamp(0, 1)


class SingleExpert(nn.Module):
    """Expert e of a ReferenceSoftMoE as a plain classifier on raw [0,1] images."""

    def __init__(self, ref, e):
        super().__init__()
        self.ref, self.e = ref, e

    def forward(self, x):
        return self.ref.experts[self.e](self.ref.normalize(x))


# ----------------------------------------------------------------------------- FGSM / PGD
@pytest.mark.parametrize("eps", [0.0, 4 / 255, 0.1])
def test_fgsm_matches_reference(eps):
    model = small_cnn().eval()
    x, y = data()
    torch.testing.assert_close(A.fgsm(model, x, y, eps), ref_fgsm(model, x, y, eps), **EXACT)


@pytest.mark.parametrize("eps,alpha,steps", [(8 / 255, 2 / 255, 5), (0.05, 0.02, 3), (8 / 255, 2 / 255, 0)])
def test_pgd_matches_reference_without_random_start(eps, alpha, steps):
    model = small_cnn().eval()
    x, y = data()
    out = A.pgd(model, x, y, eps, alpha, steps, random_start=False)
    torch.testing.assert_close(out, ref_pgd(model, x, y, eps, alpha, steps), **EXACT)


def test_pgd_random_start_matches_reference_with_same_generator():
    model = small_cnn().eval()
    x, y = data()
    eps, alpha, steps = 8 / 255, 2 / 255, 3
    out = A.pgd(model, x, y, eps, alpha, steps, generator=torch.Generator().manual_seed(5))
    x0 = ref_random_start(x, eps, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref_pgd(model, x, y, eps, alpha, steps, x0=x0), **EXACT)
    again = A.pgd(model, x, y, eps, alpha, steps, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


@pytest.mark.parametrize("mix", ["logits", "probs"])
def test_attacks_on_mixture_match_reference(mix):
    moe, _ = small_moe(mix)
    x, y = data(b=3)
    torch.testing.assert_close(A.fgsm(moe, x, y, 8 / 255), ref_fgsm(moe, x, y, 8 / 255), **EXACT)
    torch.testing.assert_close(A.pgd(moe, x, y, 8 / 255, 2 / 255, 2, random_start=False),
                               ref_pgd(moe, x, y, 8 / 255, 2 / 255, 2), **EXACT)


def test_matches_torchattacks():
    torchattacks = pytest.importorskip("torchattacks")
    model = small_cnn().eval()
    x, y = data()
    theirs = torchattacks.FGSM(model, eps=8 / 255)(x, y)
    torch.testing.assert_close(A.fgsm(model, x, y, 8 / 255), theirs, atol=1e-6, rtol=0)
    theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)(x, y)
    # torchattacks projects as x + clamp(x_adv - x): the same point up to fp32 rounding.
    torch.testing.assert_close(A.pgd(model, x, y, 8 / 255, 2 / 255, 5, random_start=False), theirs,
                               atol=1e-6, rtol=0)


_PROPERTY_MODEL = small_cnn(seed=3).eval()


@settings(max_examples=8, deadline=None)
@given(eps=st.floats(0, 0.3), alpha=st.floats(0, 0.2), steps=st.integers(0, 3), random_start=st.booleans(),
       restarts=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_pgd_stays_in_ball_and_box(eps, alpha, steps, random_start, restarts, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 8, 8, generator=g)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the box edges
    y = torch.randint(0, 10, (4,), generator=g)
    for out in (A.pgd(_PROPERTY_MODEL, x, y, eps, alpha, steps, random_start, restarts, generator=g),
                A.fgsm(_PROPERTY_MODEL, x, y, eps)):
        assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
        assert (out - x).abs().max() <= eps + 1e-6
        assert out.min() >= 0 and out.max() <= 1


def test_eps_zero_gives_clean_examples_and_accuracy():
    model = small_cnn().eval()
    x, y = data(b=8)
    clean = model(x).argmax(-1)
    for out in (A.fgsm(model, x, y, 0.0), A.pgd(model, x, y, 0.0, 2 / 255, 3),
                A.pgd(model, x, y, 0.0, 2 / 255, 3, random_start=False, restarts=2)):
        assert torch.equal(out, x)
        assert torch.equal(model(out).argmax(-1), clean)


def test_attacks_work_under_no_grad_and_leave_inputs_alone():
    model = small_cnn().eval()
    x, y = data()
    x_copy = x.clone()
    with torch.no_grad():
        out = A.pgd(model, x, y, 8 / 255, 2 / 255, 2, random_start=False)
    torch.testing.assert_close(out, ref_pgd(model, x, y, 8 / 255, 2 / 255, 2), **EXACT)
    assert torch.equal(x, x_copy)


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


@pytest.mark.parametrize("which", ["fgsm", "pgd", "pgd_restarts", "experts"])
def test_model_mode_requires_grad_and_grads_restored(which):
    model = small_moe()[0] if which == "experts" else small_cnn()
    model.train()
    first = next(iter(model.children()))
    first.eval()  # mixed modes must come back module by module
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.full_like(params[1], 0.5)
    before = _state(model)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training)) for m in model.modules()]
    x, y = data(b=3)
    if which == "fgsm":
        A.fgsm(model, x, y, 0.03)
    elif which == "pgd":
        A.pgd(model, x, y, 0.03, 0.01, 2)
    elif which == "pgd_restarts":
        A.pgd(model, x, y, 0.03, 0.01, 1, restarts=2)
    else:
        A.attack_experts(model, x, y, A.make_plan(model.roles, 0.02, [1, 2]))
    for h in hooks:
        h.remove()
    assert seen and not any(seen)  # every module ran in eval mode during the attack
    after = _state(model)
    assert before[0] == after[0] and before[1] == after[1]
    for b, a in zip(before[2], after[2]):
        assert (b is None and a is None) or torch.equal(b, a)


def test_mode_restored_on_error():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom")
            return self.fc(x.flatten(1))

    model = Boom().train()
    x, y = data(b=2)
    with pytest.raises(RuntimeError, match="boom"):
        A.pgd(model, x, y, 0.03, 0.01, 3)
    assert model.training and model.fc.training


def test_restarts_keep_first_fooling_example_else_highest_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    x = torch.rand(24, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)  # every image correct before the attack
    eps, restarts = 0.35, 4
    # steps=0: each restart is its random start, so which restart fools which image is pure chance.
    g = torch.Generator().manual_seed(11)
    runs = [A.pgd(model, x, y, eps, 0.0, 0, generator=g) for _ in range(restarts)]
    out = A.pgd(model, x, y, eps, 0.0, 0, restarts=restarts, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        wrong = torch.stack([model(r).argmax(-1) != y for r in runs])           # [R, B]
        loss = torch.stack([F.cross_entropy(model(r), y, reduction="none") for r in runs])
    expected = torch.empty_like(x)
    for i in range(x.shape[0]):
        fooled = wrong[:, i].nonzero().flatten()
        r = int(fooled[0]) if len(fooled) else int(loss[:, i].argmax())
        expected[i] = runs[r][i]
    assert torch.equal(out, expected)
    first_fooled = wrong.float().argmax(0)
    assert wrong.any(0).any() and (~wrong.any(0)).any()  # both branches are exercised
    assert ((first_fooled > 0) & wrong.any(0)).any()     # some image is fooled only by a later restart
    with torch.no_grad():
        assert (model(out).argmax(-1) != y).sum() == wrong.any(0).sum()


# ----------------------------------------------------------------------------- per-expert attack
# Plan kinds need not follow the model's roles. This order leaves finished experts (2: FGSM,
# 3: PGD-1) inside the span of running ones (1: PGD-4, 4: PGD-3), so they must be frozen there.
# FGSM ignores alpha and steps (one step of size eps): the odd values here must not matter.
PLAN_KW = dict(kinds=["clean", "pgd", "fgsm", "pgd", "pgd"], eps=[0.0, 0.02, 0.03, 8 / 255, 0.02],
               alpha=[0.0, 0.01, 0.005, 2 / 255, 0.01], steps=[0, 4, 5, 1, 3])


def _expected_per_expert(ref, x_e, y_e, plan, starts=None):
    outs = []
    for e, kind in enumerate(plan.kinds):
        expert = SingleExpert(ref, e)
        xe, ye = x_e[:, e], y_e[:, e]
        if kind == "clean":
            outs.append(xe.clone())
        elif kind == "fgsm":
            outs.append(ref_fgsm(expert, xe, ye, plan.eps[e]))
        else:
            x0 = None if starts is None else starts[:, e]
            outs.append(ref_pgd(expert, xe, ye, plan.eps[e], plan.alpha[e], plan.steps[e], x0=x0))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("per_expert_input", [False, True])
def test_attack_experts_equals_attacking_each_expert_alone(per_expert_input):
    moe, ref = small_moe()
    b, n = 3, 5
    if per_expert_input:  # every expert its own data stream and labels
        g = torch.Generator().manual_seed(2)
        x, y = torch.rand(b, n, 3, 8, 8, generator=g), torch.randint(0, 10, (b, n), generator=g)
        x_e, y_e = x, y
    else:
        x, y = data(b=b)
        x_e, y_e = x.unsqueeze(1).expand(b, n, 3, 8, 8), y.unsqueeze(1).expand(b, n)
    plan = A.ExpertAttackPlan(**PLAN_KW, random_start=False)
    out = A.attack_experts(moe, x, y, plan)
    assert out.shape == (b, n, 3, 8, 8)
    torch.testing.assert_close(out, _expected_per_expert(ref, x_e, y_e, plan), atol=1e-5, rtol=0)
    assert torch.equal(out[:, 0], x_e[:, 0])  # the clean expert's input is untouched
    if per_expert_input:  # the readable twin runs the same per-expert attack
        torch.testing.assert_close(A.attack_experts(ref, x, y, plan), out, atol=1e-5, rtol=0)


def test_attack_experts_random_start_and_frozen_experts():
    moe, ref = small_moe()
    x, y = data(b=3)
    b, n = 3, 5
    plan = A.ExpertAttackPlan(**PLAN_KW, random_start=True)
    out = A.attack_experts(moe, x, y, plan, generator=torch.Generator().manual_seed(9))
    # The start: one draw over [B,E,3,H,W]; non-PGD experts get eps 0 (exactly x).
    x_e, y_e = x.unsqueeze(1).expand(b, n, 3, 8, 8), y.unsqueeze(1).expand(b, n)
    start_eps = torch.tensor([e if k == "pgd" else 0.0 for k, e in zip(plan.kinds, plan.eps)]).view(1, n, 1, 1, 1)
    u = torch.rand(x_e.shape, generator=torch.Generator().manual_seed(9))
    starts = (x_e + (u * 2 - 1) * start_eps).clamp(0, 1)
    torch.testing.assert_close(out, _expected_per_expert(ref, x_e, y_e, plan, starts=starts), atol=1e-5, rtol=0)
    for e in range(n):
        assert (out[:, e] - x).abs().max() <= plan.eps[e] + 1e-6
    # The FGSM expert froze after its one step: every pixel moved by exactly 0 or eps (or hit the box).
    for e in (2,):
        d = (out[:, e] - x).abs()
        at_box = (out[:, e] == 0) | (out[:, e] == 1)
        assert ((d < 1e-7) | ((d - plan.eps[e]).abs() < 1e-6) | at_box).all()


def test_attack_experts_sub_range_and_make_plan():
    moe, ref = small_moe()
    x, y = data(b=2)
    plan = A.make_plan(["pgd", "pgd"], fgsm_eps=[], pgd_steps=[1, 3], experts="pgd")
    assert plan.kinds == ["pgd", "pgd"] and plan.steps == [1, 3]
    assert plan.eps == [8 / 255] * 2 and plan.alpha == [2 / 255] * 2
    plan.random_start = False
    out = A.attack_experts(moe, x, y, plan)
    assert out.shape == (2, 2, 3, 8, 8)
    for i, e in enumerate((3, 4)):
        expected = ref_pgd(SingleExpert(ref, e), x, y, 8 / 255, 2 / 255, plan.steps[i])
        torch.testing.assert_close(out[:, i], expected, atol=1e-5, rtol=0)

    full = A.make_plan(moe.roles, fgsm_eps=[0.01, 0.05], pgd_steps=7, pgd_alpha=[0.01, 0.02])
    assert full.kinds == moe.roles
    assert full.eps[:3] == [0.0, 0.01, 0.05] and full.alpha[:3] == [0.0, 0.01, 0.05]
    assert full.steps == [0, 1, 1, 7, 7] and full.alpha[3:] == [0.01, 0.02]


def test_attack_experts_all_clean_or_zero_steps_is_identity():
    moe, _ = small_moe()
    x, y = data(b=2)
    plan = A.ExpertAttackPlan(["clean", "fgsm", "fgsm", "pgd", "pgd"], [0, 0, 0, 0.03, 0.03],
                              [0, 0, 0, 0.01, 0.01], [0, 1, 1, 0, 0], random_start=False)
    assert torch.equal(A.attack_experts(moe, x, y, plan), x.unsqueeze(1).expand(2, 5, 3, 8, 8))


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_value_error():
    model = small_cnn().eval()
    x, y = data(b=4)
    bad_calls = {
        "eps < 0": lambda: A.fgsm(model, x, y, -0.1),
        "pgd eps < 0": lambda: A.pgd(model, x, y, -0.1, 0.01, 1),
        "alpha < 0": lambda: A.pgd(model, x, y, 0.1, -0.01, 1),
        "steps < 0": lambda: A.pgd(model, x, y, 0.1, 0.01, -1),
        "steps not int": lambda: A.pgd(model, x, y, 0.1, 0.01, 2.5),
        "restarts < 1": lambda: A.pgd(model, x, y, 0.1, 0.01, 1, restarts=0),
        "eps nan": lambda: A.fgsm(model, x, y, float("nan")),
        "label too big": lambda: A.fgsm(model, x, torch.tensor([0, 1, 2, 10]), 0.1),
        "label negative": lambda: A.pgd(model, x, torch.tensor([0, -1, 2, 3]), 0.1, 0.01, 1),
        "float labels": lambda: A.fgsm(model, x, y.float(), 0.1),
        "x > 1": lambda: A.fgsm(model, x * 1.5, y, 0.1),
        "x < 0": lambda: A.pgd(model, x - 0.5, y, 0.1, 0.01, 1),
        "x nan": lambda: A.fgsm(model, torch.full_like(x, float("nan")), y, 0.1),
        "batch mismatch": lambda: A.fgsm(model, x, y[:3], 0.1),
        "uint8 x": lambda: A.fgsm(model, (x * 255).to(torch.uint8), y, 0.1),
        "rank 3": lambda: A.fgsm(model, x[0], y, 0.1),
        "rank 5": lambda: A.pgd(model, x.unsqueeze(1), y, 0.1, 0.01, 1),
        "not a tensor": lambda: A.fgsm(model, x.tolist(), y, 0.1),
    }
    for what, call in bad_calls.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"no ValueError for {what}")


def test_label_range_checked_without_num_classes_attribute():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x, _ = data(b=2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        A.pgd(model, x, torch.tensor([0, 4]), 0.1, 0.01, 0)


def test_bad_plans_raise_value_error():
    moe, _ = small_moe()
    x, y = data(b=2)
    with pytest.raises(ValueError, match="equal lengths"):
        A.ExpertAttackPlan(["clean", "pgd"], [0.0], [0.0, 0.1], [0, 1])
    with pytest.raises(ValueError, match="kinds"):
        A.ExpertAttackPlan(["clean", "cw"], [0.0, 0.1], [0.0, 0.1], [0, 1])
    with pytest.raises(ValueError, match="eps"):
        A.ExpertAttackPlan(["clean", "pgd"], [0.0, -0.1], [0.0, 0.1], [0, 1])
    with pytest.raises(ValueError, match="alpha"):
        A.ExpertAttackPlan(["clean", "pgd"], [0.0, 0.1], [0.0, -0.1], [0, 1])
    with pytest.raises(ValueError, match="steps"):
        A.ExpertAttackPlan(["clean", "pgd"], [0.0, 0.1], [0.0, 0.1], [0, -1])
    with pytest.raises(ValueError, match="steps"):
        A.ExpertAttackPlan(["clean", "pgd"], [0.0, 0.1], [0.0, 0.1], [0, 1.5])
    with pytest.raises(ValueError, match="at least one"):
        A.ExpertAttackPlan([], [], [], [])
    with pytest.raises(ValueError, match="list"):
        A.ExpertAttackPlan("pgd", [0.1], [0.1], [1])
    two = A.ExpertAttackPlan(["clean", "pgd"], [0.0, 0.1], [0.0, 0.1], [0, 1])
    with pytest.raises(ValueError, match="covers 2 experts"):
        A.attack_experts(moe, x, y, two)  # the plan covers 2 experts, the model has 5
    with pytest.raises(ValueError, match=r"\[B,2,C,H,W\]"):
        two.experts = (3, 5)
        A.attack_experts(moe, torch.rand(2, 3, 3, 8, 8), y, two)
    with pytest.raises(ValueError):
        A.attack_experts(moe, x, y, {"kinds": ["pgd"]})
    with pytest.raises(ValueError):
        A.attack_experts(small_cnn(), x, y, two)  # not a mixture
    with pytest.raises(ValueError):
        A.attack_experts(moe, x, torch.tensor([0, 10]), two)
    with pytest.raises(ValueError):
        A.make_plan(["clean", "fgsm", "pgd"], fgsm_eps=[0.1, 0.2], pgd_steps=3)
    with pytest.raises(ValueError):
        A.make_plan(["clean", "adv"], fgsm_eps=0.1, pgd_steps=3)
    with pytest.raises(ValueError, match="steps"):
        A.make_plan(["pgd"], fgsm_eps=0.1, pgd_steps=2.5)  # never silently truncated
    with pytest.raises(ValueError, match="eps"):
        A.make_plan(["fgsm"], fgsm_eps=[-0.1], pgd_steps=3)


# ----------------------------------------------------------------------------- L2 and the projections
def test_pgd_l2_matches_torchattacks():
    torchattacks = pytest.importorskip("torchattacks")
    model = small_cnn().eval()
    x, y = data()
    theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=5, random_start=False)(x, y)
    # torchattacks divides by ||g|| + 1e-10, we by max(||g||, 1e-12): equal up to fp32 rounding.
    torch.testing.assert_close(A.pgd(model, x, y, 0.5, 0.1, 5, random_start=False, norm="L2"), theirs,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.03), ("L2", 0.4)])
def test_pgd_norms_stay_in_ball_and_raise_the_loss(norm, eps):
    model = small_cnn().eval()
    x, y = data(b=8)
    out = A.pgd(model, x, y, eps, eps / 4, 5, norm=norm, restarts=2, generator=torch.Generator().manual_seed(1))
    d = (out - x).flatten(1)
    dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert (dist <= eps + 1e-5).all() and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(out), y) > F.cross_entropy(model(x), y)


@settings(max_examples=40, deadline=None)
@given(norm=st.sampled_from(["Linf", "L2"]), eps=st.floats(0, 2), scale=st.floats(0, 3), per_sample=st.booleans(),
       seed=st.integers(0, 2**16))
def test_projection_properties(norm, eps, scale, per_sample, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, 4, 4, generator=g)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the box edges
    radius = torch.rand(3, generator=g) * eps if per_sample else eps
    r = radius if per_sample else torch.full((3,), eps)
    z = x + scale * torch.randn(x.shape, generator=g)  # anywhere, also outside the box
    p = A.project(z, x, radius, norm)

    def dist(a):
        d = (a - x).flatten(1)
        return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)

    assert (dist(p) <= r * (1 + 1e-5) + 1e-6).all()
    assert p.min() >= 0 and p.max() <= 1
    torch.testing.assert_close(A.project(p, x, radius, norm), p, atol=1e-6, rtol=0)  # idempotent
    # A point already inside the ball and the box stays where it is.
    direction = torch.randn(x.shape, generator=g)
    size = direction.flatten(1).abs().amax(1) if norm == "Linf" else direction.flatten(1).norm(dim=1)
    inside = (x + direction * (0.5 * r / size.clamp_min(1e-12)).view(-1, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(A.project(inside, x, radius, norm), inside, atol=1e-6, rtol=0)
    if norm == "Linf":
        assert torch.equal(A.project(inside, x, radius, norm), inside)


# ----------------------------------------------------------------------------- losses
def test_dlr_losses_by_hand():
    z = torch.tensor([[1.0, 5.0, 3.0, 2.0], [1.0, 5.0, 3.0, 2.0]])
    y = torch.tensor([0, 1])
    # y=0 is not the top class: -(1 - 5) / (5 - 2); y=1 is: -(5 - 3) / (5 - 2).
    torch.testing.assert_close(A.dlr_loss(z, y), torch.tensor([4 / 3, -2 / 3]))
    # targeted, y=1 towards t=2: -(5 - 3) / (5 - (2 + 1) / 2)
    torch.testing.assert_close(A.dlr_targeted_loss(z[1:], y[1:], torch.tensor([2])), torch.tensor([-2 / 3.5]))


@pytest.mark.parametrize("loss", ["dlr", "moe_ce", "moe_gate"])
def test_pgd_other_losses_on_mixture_fast_equals_reference(loss):
    moe, ref = small_moe()
    x, y = data(b=3)
    ours = A.pgd(moe, x, y, 0.03, 0.01, 3, random_start=False, loss=loss)
    torch.testing.assert_close(ours, A.pgd(ref, x, y, 0.03, 0.01, 3, random_start=False, loss=loss),
                               atol=1e-5, rtol=0)
    assert (ours - x).abs().max() <= 0.03 + 1e-6
    with torch.no_grad():
        assert A.attack_loss(ref, ours, y, loss)[0].sum() > A.attack_loss(ref, x, y, loss)[0].sum()


def test_moe_losses_refused_on_plain_models():
    x, y = data(b=2)
    for loss in ("moe_ce", "moe_gate"):
        with pytest.raises(ValueError, match="return_details"):
            A.pgd(small_cnn(), x, y, 0.03, 0.01, 1, loss=loss)
    with pytest.raises(ValueError, match="loss"):
        A.pgd(small_cnn(), x, y, 0.03, 0.01, 1, loss="cw")
    with pytest.raises(ValueError, match="norm"):
        A.pgd(small_cnn(), x, y, 0.03, 0.01, 1, norm="L1")


# ----------------------------------------------------------------------------- empty batches, host syncs
def test_empty_batch_gives_empty_result():
    moe, _ = small_moe()
    x, y = torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)
    assert A.fgsm(moe, x, y, 0.03).shape == (0, 3, 8, 8)
    for kw in ({}, {"restarts": 2}, {"norm": "L2"}, {"loss": "moe_gate"}):
        assert A.pgd(moe, x, y, 0.03, 0.01, 2, **kw).shape == (0, 3, 8, 8)
    plan = A.make_plan(moe.roles, 0.02, [1, 2])
    assert A.attack_experts(moe, x, y, plan).shape == (0, 5, 3, 8, 8)
    assert A.attack_experts(moe, torch.rand(0, 5, 3, 8, 8), torch.zeros(0, 5, dtype=torch.long), plan).shape == \
        (0, 5, 3, 8, 8)


def test_sync_counter_sees_a_per_step_sync():
    class Syncing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_cnn().eval()

        def forward(self, x):
            out = self.inner(x)
            if out.abs().sum().item() < 0:  # a host sync on every call
                raise AssertionError
            return out

    x, y = data(b=2)
    counts = []
    for steps in (1, 4):
        with SyncCounter() as c:
            A.pgd(Syncing(), x, y, 0.03, 0.01, steps)
        counts.append(c.count)
    assert counts[1] == counts[0] + 3


@pytest.mark.parametrize("which", ["pgd", "pgd_l2_dlr", "pgd_moe_restarts", "experts"])
def test_no_host_sync_inside_attack_loops(which):
    moe, _ = small_moe()
    x, y = data(b=2)

    def attack(steps):
        if which == "pgd":
            A.pgd(moe, x, y, 0.03, 0.01, steps)
        elif which == "pgd_l2_dlr":
            A.pgd(moe, x, y, 0.3, 0.1, steps, norm="L2", loss="dlr")
        elif which == "pgd_moe_restarts":
            A.pgd(moe, x, y, 0.03, 0.01, steps, loss="moe_gate", restarts=2)
        else:
            A.attack_experts(moe, x, y, A.make_plan(moe.roles, 0.02, steps))

    counts = []
    for steps in (1, 4):
        with SyncCounter() as c:
            attack(steps)
        counts.append((c.count, c.calls))
    assert counts[0][0] == counts[1][0], counts


def test_attack_mode_switches_the_models_pixel_check_off_and_back_on():
    moe, _ = small_moe()
    assert moe.check_inputs
    seen = []
    hook = moe.register_forward_pre_hook(lambda mod, inp: seen.append(mod.check_inputs))
    x, y = data(b=2)
    A.pgd(moe, x, y, 0.03, 0.01, 2)
    hook.remove()
    assert seen and not any(seen) and moe.check_inputs
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # the attack's own one-time check still refuses
        A.pgd(moe, x * 2, y, 0.03, 0.01, 2)
    assert moe.check_inputs
