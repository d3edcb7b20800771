"""White-box L-inf attacks on raw [0, 1] images: FGSM, PGD, and the one-pass per-expert attack.

Every attack is one small function with the signature ``(model, x, y, ...)``:
- ``fgsm(model, x, y, eps)``: ``clip(x + eps * sign(grad_x CE), 0, 1)``;
- ``pgd(model, x, y, eps, alpha, steps, random_start=True, restarts=1, generator=None)``:
  ``x_{i+1} = clip(Proj_{x,eps}(x_i + alpha * sign(grad_x CE)), 0, 1)`` from a uniform random
  start in the eps-ball (or from x); with restarts, per sample the first restart that fools the
  model wins, else the highest-loss one;
- ``attack_experts(model, x, y, plan)``: every expert of a mixture attacked on its own input
  (its own eps, step size and step count) with ONE grouped forward/backward per step, as the
  expert pre-training needs.

The loss is the cross-entropy averaged over the batch (as torchattacks); with ``random_start=False``
``fgsm``/``pgd`` give torchattacks' FGSM/PGD examples. For a ``mix="probs"`` mixture the model
returns log-probabilities; cross-entropy on them is still the mixture's NLL (log_softmax of
log-probabilities is the identity).

The model runs in eval mode during an attack and every module's mode is restored afterwards
(also on error). Gradients are taken w.r.t. the input only (``torch.autograd.grad``), so the
parameters' ``requires_grad`` and ``.grad`` are never touched. The update rules are the fused
kernels ``fastmoe_adv.kernels.pgd_step`` / ``fgsm_step`` / ``pgd_random_start``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .grouped import _parse_experts
from .kernels import fgsm_step, pgd_random_start, pgd_step, pgd_step_

__all__ = ["fgsm", "pgd", "attack_experts", "ExpertAttackPlan", "make_plan", "eval_mode", "ATTACK_KINDS"]

ATTACK_KINDS = ("clean", "fgsm", "pgd")


# ----------------------------------------------------------------------------- input checks
def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_number(name, value, integer=False, minimum=0):
    if integer:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not ok or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        return int(value)
    ok = _is_real(value)
    if not ok or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite float >= {minimum}, got {value!r}")
    return float(value)


def _check_images(x, ranks=(4,), name="x"):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of images in [0, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected float images in [0, 1], got dtype {x.dtype} "
                         f"(uint8 images: divide by 255 first)")
    if x.dim() not in ranks:
        want = " or ".join({4: "[B,C,H,W]", 5: "per-expert [B,E,C,H,W]"}[r] for r in ranks)
        raise ValueError(f"{name}: expected images {want}, got rank {x.dim()} shape {tuple(x.shape)}")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        finite = x[torch.isfinite(x)]
        rng = (finite.min().item(), finite.max().item()) if finite.numel() else (float("nan"),) * 2
        raise ValueError(f"{name}: expected pixel values in [0, 1] (no NaN), got range {rng} "
                         f"(values outside the box are an error, not clamped)")


def _check_labels(y, shape, device, name="y"):
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of integer class labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer class labels, got dtype {y.dtype}")
    if tuple(y.shape) not in [tuple(s) for s in shape]:
        raise ValueError(f"{name}: expected labels of shape {' or '.join(str(tuple(s)) for s in shape)} "
                         f"(one per image), got {tuple(y.shape)}")
    return y.to(device=device, dtype=torch.long)


def _check_label_range(y, num_classes, name="y"):
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: expected labels in [0, {num_classes}) (the model has {num_classes} outputs), "
                         f"got range [{lo}, {hi}]")


def _logits(out):
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"expected the model to return logits [B, K], got {got}")
    return out


def _num_classes(model, probe):
    """K from ``model.num_classes`` when present, else from one forward on ``probe``."""
    k = getattr(model, "num_classes", None)
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    with torch.no_grad():
        return _logits(model(probe)).shape[-1]


def _check_inputs(model, x, y):
    """Validate a plain attack's inputs; returns (x detached, y long on x's device)."""
    _check_images(x)
    y = _check_labels(y, [(x.shape[0],)], x.device)
    if x.shape[0]:
        _check_label_range(y, _num_classes(model, x[:1]))
    return x.detach(), y


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put ``model`` in eval mode; restore every module's own mode on exit (also on error)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _input_grad(forward, x, loss_fn):
    """d loss / d x for ``loss_fn(forward(x))``, w.r.t. the input only (parameters untouched).

    A model whose output does not depend differentiably on x gets a zero gradient (that is
    gradient masking, which the evaluation's sanity checks report), not an exception.
    """
    with torch.enable_grad():
        x_req = x.detach().requires_grad_(True)
        loss = loss_fn(forward(x_req))
        if not loss.requires_grad:
            return torch.zeros_like(x_req)
        (grad,) = torch.autograd.grad(loss, x_req, allow_unused=True)
    return torch.zeros_like(x_req) if grad is None else grad


def _ce_grad(model, x, y):
    return _input_grad(model, x, lambda out: F.cross_entropy(_logits(out), y))


# ----------------------------------------------------------------------------- FGSM and PGD
def fgsm(model, x, y, eps):
    """FGSM: ``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``.

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K].
        x: float images [B,C,H,W] in [0, 1].
        y: integer labels [B] in [0, K).
        eps: L-inf radius (pixel scale [0, 1]), >= 0.
    Returns:
        adversarial images, same shape/dtype as x, detached.
    """
    eps = _check_number("eps", eps)
    with eval_mode(model):
        x, y = _check_inputs(model, x, y)
        return fgsm_step(x, _ce_grad(model, x, y), eps)


def _pgd_once(model, x, y, eps, alpha, steps, random_start, generator):
    x_adv = pgd_random_start(x, eps, generator=generator) if random_start else x.clone()
    for _ in range(steps):
        pgd_step_(x_adv, _ce_grad(model, x_adv, y), x, alpha, eps)
    return x_adv


def pgd(model, x, y, eps, alpha, steps, random_start=True, restarts=1, generator=None):
    """L-inf PGD: ``x_{i+1} = clip(Proj_{x,eps}(x_i + alpha * sign(grad_x CE)), 0, 1)``.

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K].
        x: float images [B,C,H,W] in [0, 1].
        y: integer labels [B] in [0, K).
        eps: L-inf radius, >= 0.  alpha: step size, >= 0.  steps: iterations, >= 0.
        random_start: start from ``clip(x + U(-eps, eps), 0, 1)`` instead of x.
        restarts: independent runs (>= 1); per sample the first run's example that fools the
            model is kept, else the one with the highest loss.
        generator: torch.Generator (on x's device) for the random starts; None: the global RNG.
    Returns:
        adversarial images, same shape/dtype as x, detached.
    """
    eps = _check_number("eps", eps)
    alpha = _check_number("alpha", alpha)
    steps = _check_number("steps", steps, integer=True)
    restarts = _check_number("restarts", restarts, integer=True, minimum=1)
    with eval_mode(model):
        x, y = _check_inputs(model, x, y)
        if restarts == 1:
            return _pgd_once(model, x, y, eps, alpha, steps, random_start, generator)
        best = x.clone()
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            x_adv = _pgd_once(model, x, y, eps, alpha, steps, random_start, generator)
            with torch.no_grad():
                logits = _logits(model(x_adv))
                loss = F.cross_entropy(logits.float(), y, reduction="none")
                wrong = logits.argmax(dim=-1) != y
            take = ~fooled & (wrong | (loss > best_loss))
            best[take] = x_adv[take]
            best_loss = torch.where(take, loss, best_loss)
            fooled |= wrong
        return best


# ----------------------------------------------------------------------------- per-expert attack
@dataclass
class ExpertAttackPlan:
    """What ``attack_experts`` does to each active expert (lists have one entry per expert).

    kinds: ``"clean"`` (input unchanged), ``"fgsm"`` (one step of size eps; alpha and steps
        are not used), ``"pgd"`` (steps steps of size alpha in the eps-ball).
    eps, alpha: pixel-scale floats >= 0.  steps: ints >= 0.
    random_start: PGD experts start from a uniform random point in their eps-ball.
    experts: the contiguous range of experts attacked, as ``experts_forward`` takes it
        (None = all, a slice, range, (lo, hi), an int, or a role name).
    """

    kinds: list
    eps: list
    alpha: list
    steps: list
    random_start: bool = True
    experts: Any = None

    def __post_init__(self):
        self.validate()

    def validate(self, num_active: int | None = None) -> "ExpertAttackPlan":
        """Check the plan (and, given ``num_active``, that it has one entry per active expert)."""
        for name in ("kinds", "eps", "alpha", "steps"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"plan.{name} must be a list with one entry per expert, got {value!r}")
            setattr(self, name, list(value))
        lengths = {name: len(getattr(self, name)) for name in ("kinds", "eps", "alpha", "steps")}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"plan lists must have one entry per expert (equal lengths), got lengths {lengths}")
        if lengths["kinds"] == 0:
            raise ValueError("plan must cover at least one expert, got empty lists")
        if num_active is not None and lengths["kinds"] != num_active:
            raise ValueError(f"plan covers {lengths['kinds']} experts but the attacked range has {num_active} "
                             f"(plan.experts={self.experts!r})")
        for e, kind in enumerate(self.kinds):
            if kind not in ATTACK_KINDS:
                raise ValueError(f"plan.kinds[{e}] must be one of {ATTACK_KINDS}, got {kind!r}")
        self.eps = [_check_number(f"plan.eps[{e}]", v) for e, v in enumerate(self.eps)]
        self.alpha = [_check_number(f"plan.alpha[{e}]", v) for e, v in enumerate(self.alpha)]
        self.steps = [_check_number(f"plan.steps[{e}]", v, integer=True) for e, v in enumerate(self.steps)]
        if not isinstance(self.random_start, bool):
            raise ValueError(f"plan.random_start must be a bool, got {self.random_start!r}")
        return self


def _per_role(name, value, count):
    """A scalar for every expert of a role, or a sequence with one value per expert of the role
    (the plan validates the values themselves)."""
    if _is_real(value):
        return [value] * count
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count:
        raise ValueError(f"{name} must be a number or a sequence with one value per expert of its role "
                         f"({count}), got {value!r}")
    return list(value)


def make_plan(roles, fgsm_eps, pgd_steps, pgd_eps=8 / 255, pgd_alpha=2 / 255, experts=None,
              random_start=True) -> ExpertAttackPlan:
    """The plan for experts with these ``roles`` (e.g. ``moe.roles``): clean experts untouched,
    FGSM experts one step of ``fgsm_eps``, PGD experts ``pgd_steps`` steps of ``pgd_alpha``
    in the ``pgd_eps`` ball. ``fgsm_eps`` / ``pgd_*`` are a number or one value per expert of
    that role (e.g. eps drawn per FGSM expert, step counts drawn per PGD expert)."""
    roles = list(roles)
    for e, r in enumerate(roles):
        if r not in ATTACK_KINDS:
            raise ValueError(f"roles[{e}] must be one of {ATTACK_KINDS}, got {r!r}")
    n_fgsm, n_pgd = roles.count("fgsm"), roles.count("pgd")
    f_eps = iter(_per_role("fgsm_eps", fgsm_eps, n_fgsm))
    p_steps = iter(_per_role("pgd_steps", pgd_steps, n_pgd))
    p_eps = iter(_per_role("pgd_eps", pgd_eps, n_pgd))
    p_alpha = iter(_per_role("pgd_alpha", pgd_alpha, n_pgd))
    eps, alpha, steps = [], [], []
    for r in roles:
        if r == "clean":
            e, a, s = 0.0, 0.0, 0
        elif r == "fgsm":
            e = next(f_eps)
            a, s = e, 1
        else:
            e, a, s = next(p_eps), next(p_alpha), next(p_steps)
        eps.append(e)
        alpha.append(a)
        steps.append(s)
    return ExpertAttackPlan(roles, eps, alpha, steps, random_start=random_start, experts=experts)


def _expert_range(model, experts):
    if not hasattr(model, "experts_forward") or not hasattr(model, "num_experts"):
        raise ValueError(f"attack_experts needs a mixture with experts_forward() and num_experts "
                         f"(FastSoftMoE or ReferenceSoftMoE), got {type(model).__name__}")
    if isinstance(experts, str):
        experts = model.role_slice(experts)
    try:
        return _parse_experts(experts, model.num_experts)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def attack_experts(model, x, y, plan: ExpertAttackPlan, generator=None):
    """Attack each expert of a range on its own input, all experts in one grouped pass per step.

    Expert ``e`` gets ``x_adv[:, e]``: unchanged for "clean", FGSM with its eps, or PGD with its
    eps/alpha/steps, each against the expert alone (its own logits, its own mean cross-entropy;
    the loss of one pass is the sum over experts, so each input's gradient is its own expert's).
    Experts that are done (FGSM after step 0, PGD after its own step count) stay exactly frozen
    while the others run on; each step forwards only the span of experts still running.

    Args:
        model: a ``FastSoftMoE`` / ``ReferenceSoftMoE`` (anything with ``experts_forward``).
        x: images in [0, 1], ``[B,C,H,W]`` (every expert attacks the same images) or
            ``[B,E',C,H,W]`` (expert e its own stream ``x[:, e]``).
        y: labels ``[B]`` (shared) or ``[B,E']`` (per expert).
        plan: an ``ExpertAttackPlan`` covering the E' experts of ``plan.experts``.
        generator: torch.Generator for the PGD random starts.
    Returns:
        ``x_adv [B,E',C,H,W]``, detached.
    """
    if not isinstance(plan, ExpertAttackPlan):
        raise ValueError(f"plan must be an ExpertAttackPlan (see make_plan), got {type(plan).__name__}")
    lo, hi = _expert_range(model, plan.experts)
    n = hi - lo
    plan.validate(n)
    _check_images(x, ranks=(4, 5))
    if x.dim() == 5 and x.shape[1] != n:
        raise ValueError(f"x: expected per-expert images [B,{n},C,H,W] (one per attacked expert), "
                         f"got shape {tuple(x.shape)}")
    b = x.shape[0]
    y = _check_labels(y, [(b,), (b, n)], x.device)
    x = x.detach()
    x_nat = (x.unsqueeze(1).expand(b, n, *x.shape[1:]) if x.dim() == 4 else x).contiguous()
    y_e = (y.unsqueeze(1).expand(b, n) if y.dim() == 1 else y).contiguous()

    steps = [0 if k == "clean" else 1 if k == "fgsm" else s for k, s in zip(plan.kinds, plan.steps)]
    eps = [0.0 if k == "clean" else v for k, v in zip(plan.kinds, plan.eps)]
    alpha = [0.0 if k == "clean" else e if k == "fgsm" else a for k, e, a in zip(plan.kinds, eps, plan.alpha)]
    eps_t = torch.tensor(eps, dtype=torch.float32, device=x.device).expand(b, n).contiguous()
    alpha_t = torch.tensor(alpha, dtype=torch.float32, device=x.device).expand(b, n).contiguous()

    with eval_mode(model):
        if b:
            _check_label_range(y_e, _num_classes(model, x_nat[:1, 0]), name="y")
        if plan.random_start and "pgd" in plan.kinds:
            start_eps = torch.tensor([e if k == "pgd" else 0.0 for k, e in zip(plan.kinds, eps)],
                                     dtype=torch.float32, device=x.device).expand(b, n).contiguous()
            x_adv = pgd_random_start(x_nat, start_eps, generator=generator)  # eps 0: exactly x
        else:
            x_adv = x_nat.clone()
        for t in range(max(steps)):
            running = [s > t for s in steps]
            first = running.index(True)
            last = n - running[::-1].index(True)
            span = slice(first, last)
            xs = x_adv[:, span].contiguous()
            ys = y_e[:, span]
            weight = torch.tensor(running[span], dtype=xs.dtype, device=x.device)

            def loss_fn(logits):  # sum over running experts of each one's batch-mean CE
                m = logits.shape[1]
                ce = F.cross_entropy(logits.reshape(b * m, -1), ys.reshape(-1), reduction="none")
                return (ce.view(b, m).mean(dim=0) * weight).sum()

            grad = _input_grad(lambda z: model.experts_forward(z, experts=(lo + first, lo + last)), xs, loss_fn)
            stepped = pgd_step(xs, grad, x_nat[:, span], alpha_t[:, span], eps_t[:, span])
            x_adv[:, span] = torch.where(weight.bool().view(1, -1, *([1] * (xs.dim() - 2))), stepped, xs)
    return x_adv
