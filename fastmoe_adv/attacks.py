"""White-box attacks on raw [0, 1] images: FGSM, PGD (L-inf and L2), the one-pass per-expert
attack, the attack losses (CE, DLR, and mixture-aware ones) and the threat-model projections
that APGD (``fastmoe_adv.apgd``) and Square (``fastmoe_adv.square``) share.

Every attack is one small function with the signature ``(model, x, y, ...)``:
- ``fgsm(model, x, y, eps)``: ``clip(x + eps * sign(grad_x CE), 0, 1)``;
- ``pgd(model, x, y, eps, alpha, steps, random_start=True, restarts=1, generator=None, norm="Linf",
  loss="ce")``: ``x_{i+1} = Proj(x_i + alpha * d_i)`` with ``d_i = sign(grad)`` (L-inf) or
  ``grad / ||grad||_2`` (L2), from a random start in the eps-ball (or from x); with restarts,
  per sample the first restart that fools the model wins, else the highest-loss one;
- ``attack_experts(model, x, y, plan)``: every expert of a mixture attacked on its own input
  (its own eps, step size and step count) with ONE grouped forward/backward per step, as the
  expert pre-training needs.

The CE loss is the cross-entropy averaged over the batch (as torchattacks); with ``random_start=False``
``fgsm``/``pgd`` give torchattacks' FGSM/PGD examples. For a ``mix="probs"`` mixture the model
returns log-probabilities; cross-entropy on them is still the mixture's NLL (log_softmax of
log-probabilities is the identity). Other losses (``LOSSES``) are summed over the batch: the
step direction of each sample depends on its own loss only.

The model runs in eval mode during an attack and every module's mode is restored afterwards
(also on error). Gradients are taken w.r.t. the input only (``torch.autograd.grad``), so the
parameters' ``requires_grad`` and ``.grad`` are never touched. The L-inf update and projection
are the fused kernels ``fastmoe_adv.kernels.pgd_step`` / ``fgsm_step`` / ``pgd_random_start``.
Arguments are checked once per attack; the step loops never synchronize with the device (no
``.item()``, no ``bool(tensor)``), so a GPU attack queues its steps without stalls.

``graph=True`` (``fgsm``, ``pgd``, ``attack_experts``) runs each step as the replay of one
captured CUDA graph (``fastmoe_adv.graphs``): the same function, one launch per step instead of
hundreds. The random start stays outside the graph. Without CUDA the same graphed step code
runs uncaptured (what the CPU tests compare against the plain loops).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import graphs
from .constants import ATTACK_KINDS
from .grouped import _parse_experts
from .kernels import fgsm_step, pgd_random_start, pgd_step, pgd_step_

__all__ = ["fgsm", "pgd", "attack_experts", "ExpertAttackPlan", "make_plan", "eval_mode", "attack_mode",
           "ATTACK_KINDS", "NORMS", "LOSSES", "project", "attack_loss", "dlr_loss", "dlr_targeted_loss", "check_number",
           "check_images", "check_labels", "check_label_range", "check_norm", "check_loss", "logits_of",
           "num_classes_of", "input_grad"]

NORMS = ("Linf", "L2")
# "ce": cross-entropy; "dlr": difference of logits ratio (Croce & Hein, ICML 2020), invariant to
# shifts and scales of the logits; "moe_ce": gate-weighted sum of the experts' cross-entropies;
# "moe_gate": mixture CE + moe_ce, whose gradient through the gate also moves weight onto the
# experts with the highest loss (the least robust ones).
LOSSES = ("ce", "dlr", "moe_ce", "moe_gate")
MOE_LOSSES = ("moe_ce", "moe_gate")

# The attack families in their own modules, reachable from here too (``fm.attacks.apgd(...)``);
# loaded on first use because they import this module.
_FAMILIES = {"apgd": "apgd", "apgd_targeted": "apgd", "apgd_checkpoints": "apgd", "square": "square",
             "run_preset": "presets"}


def __getattr__(name):
    if name in _FAMILIES:
        return getattr(importlib.import_module(f".{_FAMILIES[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


@contextlib.contextmanager
def attack_mode(model: torch.nn.Module):
    """``eval_mode`` plus the models' own per-forward pixel-range check switched off
    (``check_inputs=False`` on every submodule that has the switch; restored on exit).

    The attack checks its images once; every iterate is then in the box by construction, and the
    model's check would read the device on every step (a host sync per forward)."""
    switched = [(m, m.check_inputs) for m in model.modules() if isinstance(getattr(m, "check_inputs", None), bool)]
    with eval_mode(model):
        try:
            for m, _ in switched:
                m.check_inputs = False
            yield model
        finally:
            for m, flag in switched:
                m.check_inputs = flag


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


# ----------------------------------------------------------------------------- public checks
def check_norm(norm) -> str:
    """``"Linf"`` or ``"L2"`` (case-insensitive); anything else is a ValueError."""
    names = {n.lower(): n for n in NORMS}
    if not isinstance(norm, str) or norm.lower() not in names:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    return names[norm.lower()]


def supports_details(model) -> bool:
    """Whether ``model(x, return_details=True)`` exists (FastSoftMoE / ReferenceSoftMoE)."""
    forward = getattr(model, "forward", None)
    try:
        return forward is not None and "return_details" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def check_loss(loss, model=None, allowed=LOSSES) -> str:
    """A loss name from ``allowed``; the mixture losses also need ``model(x, return_details=True)``."""
    if loss not in allowed:
        raise ValueError(f"loss: expected one of {tuple(allowed)}, got {loss!r}")
    if loss in MOE_LOSSES and model is not None and not supports_details(model):
        raise ValueError(f"loss={loss!r} needs a mixture whose forward takes return_details=True "
                         f"(FastSoftMoE / ReferenceSoftMoE), got {type(model).__name__}")
    return loss


# Public names for the validators (evaluation code imports the underscored ones too).
check_number, check_images, check_labels, check_label_range = (_check_number, _check_images, _check_labels,
                                                               _check_label_range)
logits_of, num_classes_of, input_grad = _logits, _num_classes, _input_grad


# ----------------------------------------------------------------------------- losses
def dlr_loss(logits, y):
    """Per-sample DLR loss (Croce & Hein, ICML 2020, eq. 4): ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)``,
    z sorted decreasingly as z_pi1 >= z_pi2 >= ...; needs K >= 3. Maximized by the attack."""
    z = logits.float()
    top = z.sort(dim=1, descending=True).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    y_is_top = z.argmax(dim=1) == y
    other = torch.where(y_is_top, top[:, 1], top[:, 0])
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """Per-sample targeted DLR (Croce & Hein, ICML 2020, eq. 5):
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; needs K >= 4. Maximized by the attack."""
    z = logits.float()
    top = z.sort(dim=1, descending=True).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _moe_ce(out, y):
    """sum_e w_e * CE(expert e): the gate-weighted per-expert cross-entropy, per sample."""
    b, e, k = out.expert_logits.shape
    ce = F.cross_entropy(out.expert_logits.float().reshape(b * e, k), y.repeat_interleave(e), reduction="none")
    return (out.gate_weights.float() * ce.view(b, e)).sum(dim=1)


def attack_loss(model, x, y, loss="ce", target=None):
    """(per-sample loss [B] to maximize, logits [B, K]) of ``model`` at ``x``, with graph.

    ``loss`` is one of ``LOSSES`` or ``"dlr-t"`` (targeted DLR towards ``target``, for APGD-T).
    """
    if loss in MOE_LOSSES:
        out = model(x, return_details=True)
        logits = _logits(out.logits)
        per_sample = _moe_ce(out, y)
        if loss == "moe_gate":
            per_sample = per_sample + F.cross_entropy(logits.float(), y, reduction="none")
        return per_sample, logits
    logits = _logits(model(x))
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="none"), logits
    if loss == "dlr":
        return dlr_loss(logits, y), logits
    if loss == "dlr-t":
        return dlr_targeted_loss(logits, y, target), logits
    raise ValueError(f"loss: expected one of {LOSSES + ('dlr-t',)}, got {loss!r}")


def _check_loss_classes(loss, num_classes):
    need = {"dlr": 3, "dlr-t": 4}.get(loss, 2 if loss != "ce" else 1)
    if num_classes < need:
        raise ValueError(f"loss={loss!r} needs at least {need} classes, the model has {num_classes}")


def loss_and_grad(model, x, y, loss="ce", target=None):
    """(per-sample loss [B], logits [B, K], grad of the summed loss w.r.t. x), all detached.

    Never synchronizes with the device; parameters' gradients are untouched.
    """
    with torch.enable_grad():
        x_req = x.detach().requires_grad_(True)
        per_sample, logits = attack_loss(model, x_req, y, loss, target)
        if per_sample.requires_grad:
            (grad,) = torch.autograd.grad(per_sample.sum(), x_req, allow_unused=True)
        else:  # no differentiable path to x: gradient masking, reported by the evaluation's checks
            grad = None
    grad = torch.zeros_like(x) if grad is None else grad
    return per_sample.detach(), logits.detach(), grad


# ----------------------------------------------------------------------------- threat models
def _per_sample(t, x):
    """A [B] tensor shaped to broadcast against x [B, ...]."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def _l2_norm(t):
    return t.flatten(1).norm(dim=1)


def project(x_adv, x_nat, eps, norm="Linf"):
    """Nearest point of the ``norm`` eps-ball around x_nat, then clipped to the [0, 1] box.

    L-inf: the fused ``pgd_step`` with step 0 (the exact projection onto ball and box). L2: the
    radial scaling onto the ball, then the box clip; the clip keeps the point in the ball
    because x_nat lies in the box. eps: float or a [B] tensor. Does not synchronize.
    """
    if check_norm(norm) == "Linf":
        return pgd_step(x_adv, x_adv, x_nat, 0.0, eps, validate=False)
    delta = x_adv - x_nat
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=x_adv.device)
    scale = torch.clamp(eps_t / _l2_norm(delta).float().clamp_min(1e-12), max=1.0)
    return (x_nat + delta * _per_sample(scale, x_nat).to(delta.dtype)).clamp(0.0, 1.0)


def _l2_direction(grad):
    return grad / _per_sample(_l2_norm(grad).clamp_min(1e-12), grad)


def _random_start(x, eps, norm, generator):
    """PGD start: L-inf uniform in the box-clipped ball (fused kernel); L2 a uniform direction at
    a uniform radius in [0, eps] (torchattacks' PGDL2 start), clipped to the box."""
    if norm == "Linf":
        return pgd_random_start(x, eps, generator=generator, validate=False)
    direction = _l2_direction(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) * eps
    return (x + direction * _per_sample(radius, x)).clamp(0.0, 1.0)


def _step(x_adv, grad, x_nat, alpha, eps, norm):
    """One projected steepest-ascent step of the threat model (new tensor, no sync)."""
    if norm == "Linf":
        return pgd_step(x_adv, grad, x_nat, alpha, eps, validate=False)
    return project(x_adv + alpha * _l2_direction(grad), x_nat, eps, "L2")


# ----------------------------------------------------------------------------- FGSM and PGD
def fgsm(model, x, y, eps, graph=False):
    """FGSM: ``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``.

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K].
        x: float images [B,C,H,W] in [0, 1] (B may be 0).
        y: integer labels [B] in [0, K).
        eps: L-inf radius (pixel scale [0, 1]), >= 0.
        graph: run the step as a captured CUDA graph (the PGD step graph with alpha = eps from x,
            which is exactly FGSM; see the module docstring).
    Returns:
        adversarial images, same shape/dtype as x, detached.
    """
    eps = _check_number("eps", eps)
    with attack_mode(model):
        x, y = _check_inputs(model, x, y)
        if x.shape[0] == 0:
            return x.clone()
        if graph:
            return _graphed_steps(model, x, x, y, eps, eps, 1, "Linf", "ce")
        return fgsm_step(x, _ce_grad(model, x, y), eps, validate=False)


def _pgd_iteration(model, x_adv, x, y, alpha, eps, norm, loss):
    """One PGD iteration, in place on x_adv; alpha/eps are floats or (graphed) 0-dim tensors."""
    if loss == "ce":  # the batch-mean CE, as torchattacks: the same examples bit for bit
        grad = _ce_grad(model, x_adv, y)
    else:
        grad = loss_and_grad(model, x_adv, y, loss)[2]
    if norm == "Linf":
        pgd_step_(x_adv, grad, x, alpha, eps, validate=False)
    else:
        x_adv.copy_(_step(x_adv, grad, x, alpha, eps, norm))


def _graphed_steps(model, x_adv, x, y, eps, alpha, steps, norm, loss):
    """``steps`` PGD iterations from x_adv, each the replay of one captured iteration; returns a
    new tensor (the set's static x_adv is rewritten by its next use)."""
    key = graphs.signature((model,), (x_adv, x, y), ("pgd", norm, loss))

    def buffers():
        scalar = dict(dtype=torch.float32, device=x.device)
        return dict(x_adv=torch.empty_like(x_adv), x_nat=torch.empty_like(x), y=torch.empty_like(y),
                    alpha=torch.zeros((), **scalar), eps=torch.zeros((), **scalar))

    gs = graphs.graph_set(model, key, buffers)
    gs.load(x_adv=x_adv, x_nat=x, y=y, alpha=float(alpha), eps=float(eps))
    b = gs.buf
    for _ in range(steps):
        gs.run("step", lambda: _pgd_iteration(model, b.x_adv, b.x_nat, b.y, b.alpha, b.eps, norm, loss))
    return b.x_adv.clone()


def _pgd_once(model, x, y, eps, alpha, steps, random_start, generator, norm, loss, graph=False):
    x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
    if graph and steps > 0:
        return _graphed_steps(model, x_adv, x, y, eps, alpha, steps, norm, loss)
    for _ in range(steps):
        _pgd_iteration(model, x_adv, x, y, alpha, eps, norm, loss)
    return x_adv


def pgd(model, x, y, eps, alpha, steps, random_start=True, restarts=1, generator=None, norm="Linf", loss="ce",
        graph=False):
    """PGD: ``x_{i+1} = Proj_{x,eps}(x_i + alpha * d_i)`` clipped to [0, 1].

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K].
        x: float images [B,C,H,W] in [0, 1] (B may be 0: an empty result).
        y: integer labels [B] in [0, K).
        eps: radius, >= 0.  alpha: step size, >= 0.  steps: iterations, >= 0.
        random_start: start from a random point of the eps-ball (clipped to the box) instead of x.
        restarts: independent runs (>= 1); per sample the first run's example that fools the
            model is kept, else the one with the highest loss.
        generator: torch.Generator (on x's device) for the random starts; None: the global RNG.
        norm: ``"Linf"`` (``d = sign(grad)``) or ``"L2"`` (``d = grad / ||grad||_2``).
        loss: one of ``LOSSES``; ``"moe_ce"`` / ``"moe_gate"`` need ``model(x, return_details=True)``.
        graph: run each iteration as the replay of one captured CUDA graph (module docstring).
    Returns:
        adversarial images, same shape/dtype as x, detached.
    """
    eps = _check_number("eps", eps)
    alpha = _check_number("alpha", alpha)
    steps = _check_number("steps", steps, integer=True)
    restarts = _check_number("restarts", restarts, integer=True, minimum=1)
    norm, loss = check_norm(norm), check_loss(loss, model)
    with attack_mode(model):
        x, y = _check_inputs(model, x, y)
        if x.shape[0] == 0:
            return x.clone()
        _check_loss_classes(loss, _num_classes(model, x[:1]))
        run = lambda: _pgd_once(model, x, y, eps, alpha, steps, random_start, generator, norm, loss,  # noqa: E731
                                bool(graph))
        if restarts == 1:
            return run()
        best = x.clone()
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            x_adv = run()
            with torch.no_grad():
                per_sample, logits = attack_loss(model, x_adv, y, loss)
                wrong = logits.argmax(dim=-1) != y
            take = ~fooled & (wrong | (per_sample.float() > best_loss))
            best = torch.where(_per_sample(take, x), x_adv, best)  # where, not masked copies: no sync
            best_loss = torch.where(take, per_sample.float(), best_loss)
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


def attack_experts(model, x, y, plan: ExpertAttackPlan, generator=None, graph=False):
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
        graph: run each step as the replay of a captured CUDA graph, one per span of running
            experts (module docstring).
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

    if b == 0:
        return x_nat.clone()
    with attack_mode(model):
        _check_label_range(y_e, _num_classes(model, x_nat[:1, 0]), name="y")
        if plan.random_start and "pgd" in plan.kinds:
            start_eps = torch.tensor([e if k == "pgd" else 0.0 for k, e in zip(plan.kinds, eps)],
                                     dtype=torch.float32, device=x.device).expand(b, n).contiguous()
            # eps 0: exactly x. The plan checked every eps, so the kernel needs no checks (no sync).
            x_adv = pgd_random_start(x_nat, start_eps, generator=generator, validate=False)
        else:
            x_adv = x_nat.clone()
        _expert_steps(model, lo, x_adv, x_nat, y_e, steps, alpha_t, eps_t, bool(graph))
    return x_adv


def _expert_steps(model, lo, x_adv, x_nat, y_e, steps, alpha_t, eps_t, graph=False):
    """attack_experts' step loop, in place on x_adv [B,E',...]: step t forwards only the span of
    experts that still run and freezes the finished ones inside it. With ``graph``, each step is
    the replay of the span's captured step; the step counter then lives on the device."""
    n = x_adv.shape[1]
    steps_t = torch.tensor(steps, device=x_adv.device)  # one copy to the device, not one per step
    if graph:
        key = graphs.signature((model,), (x_adv, x_nat, y_e, alpha_t, eps_t), ("experts", lo))
        gs = graphs.graph_set(model, key, lambda: dict(
            x_adv=torch.empty_like(x_adv), x_nat=torch.empty_like(x_nat), y=torch.empty_like(y_e),
            alpha=torch.empty_like(alpha_t), eps=torch.empty_like(eps_t), steps=torch.empty_like(steps_t),
            t=torch.zeros((), dtype=steps_t.dtype, device=x_adv.device)))
        gs.load(x_adv=x_adv, x_nat=x_nat, y=y_e, alpha=alpha_t, eps=eps_t, steps=steps_t, t=0)
        b = gs.buf
    for t in range(max(steps)):
        running = [s > t for s in steps]
        span = slice(running.index(True), n - running[::-1].index(True))
        if not graph:
            _expert_step(model, lo, span, x_adv, x_nat, y_e, steps_t, t, alpha_t, eps_t)
            continue

        def body(span=span):
            _expert_step(model, lo, span, b.x_adv, b.x_nat, b.y, b.steps, b.t, b.alpha, b.eps)
            b.t.add_(1)
        gs.run(("span", span.start, span.stop), body)
    if graph:
        x_adv.copy_(b.x_adv)


def _expert_step(model, lo, span, x_adv, x_nat, y_e, steps_t, t, alpha_t, eps_t):
    """One step of the experts in ``span`` (in place on x_adv); expert e moves while
    ``steps_t[e] > t`` (t: an int, or a 0-dim device tensor in the graphed loop)."""
    b = x_adv.shape[0]
    xs = x_adv[:, span].contiguous()
    ys = y_e[:, span]
    active = steps_t[span] > t
    weight = active.to(xs.dtype)

    def loss_fn(logits):  # sum over running experts of each one's batch-mean CE
        m = logits.shape[1]
        ce = F.cross_entropy(logits.reshape(b * m, -1), ys.reshape(-1), reduction="none")
        return (ce.view(b, m).mean(dim=0) * weight).sum()

    grad = _input_grad(lambda z: model.experts_forward(z, experts=(lo + span.start, lo + span.stop)), xs, loss_fn)
    stepped = pgd_step(xs, grad, x_nat[:, span], alpha_t[:, span], eps_t[:, span], validate=False)
    x_adv[:, span] = torch.where(active.view(1, -1, *([1] * (xs.dim() - 2))), stepped, xs)
