"""Auto-PGD: the step-size-free PGD of Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks" (ICML 2020), untargeted (CE, DLR or a mixture
loss) and targeted (APGD-T, targeted DLR over the top classes), for the L-inf and L2 threat models.

Same conventions as ``fastmoe_adv.attacks.pgd``: raw [0, 1] images, eval mode restored, input
gradients only, arguments checked once, no device synchronization inside the step loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attacks import (
    _check_inputs,
    _check_loss_classes,
    _check_number,
    _num_classes,
    _per_sample,
    attack_mode,
    check_loss,
    check_norm,
    loss_and_grad,
    project,
)
from .kernels import pgd_step

__all__ = ["apgd", "apgd_targeted", "apgd_checkpoints", "APGD_RHO", "APGD_MOMENTUM"]

APGD_RHO = 0.75       # condition 1 threshold: fraction of loss-increasing steps (paper, Sec. 3.2)
APGD_MOMENTUM = 0.75  # weight of the new step against the previous displacement (paper, eq. 2)


def apgd_checkpoints(steps: int) -> list:
    """Iterations after which APGD may halve its step: ``w_j = ceil(p_j * steps)`` with p_0 = 0,
    p_1 = 0.22, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, for all p_j <= 1 (paper, Sec. 3.2).
    For 100 steps: [0, 22, 41, 57, 70, 80, 87, 93, 99]."""
    steps = _check_number("steps", steps, integer=True)
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0 + 1e-9:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # round() first: 0.22 + 0.19 is 0.41000000000000003 in floats, and ceil must not see the tail.
    out = [math.ceil(round(q * steps, 6)) for q in p]
    return sorted(set(out))


@dataclass
class _State:
    """Per-sample APGD state; every field is a tensor with a leading batch dimension."""

    x: torch.Tensor          # current iterate x^(k)
    x_prev: torch.Tensor     # previous iterate x^(k-1) (momentum)
    grad: torch.Tensor       # gradient at x
    loss: torch.Tensor       # loss at x
    best: torch.Tensor       # highest-loss point so far (x_max)
    best_loss: torch.Tensor
    best_grad: torch.Tensor
    adv: torch.Tensor        # the last point seen misclassified (valid where fooled)
    fooled: torch.Tensor     # misclassified at some point
    eta: torch.Tensor        # step size [B]
    wins: torch.Tensor       # loss-increasing steps since the last checkpoint
    check_loss: torch.Tensor  # best loss at the last checkpoint
    reduced: torch.Tensor    # step halved at the last checkpoint


def _where(mask, a, b):
    return torch.where(_per_sample(mask, a), a, b)


def _apgd_start(x, eps, norm, generator):
    """The reference implementation's start: a random direction scaled to the sphere of radius eps
    (L-inf: uniform noise divided by its max; L2: Gaussian noise divided by its norm), box-clipped."""
    if norm == "Linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        t = t / _per_sample(t.flatten(1).abs().amax(dim=1).clamp_min(1e-12), t)
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = t / _per_sample(t.flatten(1).norm(dim=1).clamp_min(1e-12), t)
    return (x + eps * t).clamp(0.0, 1.0)


def _move(s, x_nat, eps, a, norm):
    """z = P(x + eta * d); x_next = P(x + a (z - x) + (1 - a)(x - x_prev)) (paper, eq. 2)."""
    if norm == "Linf":
        z = pgd_step(s.x, s.grad, x_nat, s.eta, eps, validate=False)  # fused step + projection
    else:
        g = s.grad / _per_sample(s.grad.flatten(1).norm(dim=1).clamp_min(1e-12), s.grad)
        z = project(s.x + _per_sample(s.eta, s.x) * g, x_nat, eps, "L2")
    return project(s.x + a * (z - s.x) + (1 - a) * (s.x - s.x_prev), x_nat, eps, norm)


def _checkpoint(s, threshold):
    """Halve eta where (1) fewer than ``threshold`` steps raised the loss since the last checkpoint,
    or (2) eta was not halved at the last checkpoint and the best loss did not improve since;
    those samples restart from their best point (paper, Sec. 3.2)."""
    reduce = (s.wins < threshold) | (~s.reduced & (s.check_loss >= s.best_loss))
    s.eta = torch.where(reduce, s.eta / 2, s.eta)
    s.x = _where(reduce, s.best, s.x)
    s.grad = _where(reduce, s.best_grad, s.grad)
    # s.loss stays the last iterate's loss: condition 1 counts increases between consecutive
    # iterates, as the reference implementation does, also across a restart from the best point.
    s.reduced = reduce
    s.check_loss = s.best_loss.clone()
    s.wins = torch.zeros_like(s.wins)


def _observe(s, x_new, y, loss, logits, grad):
    """Record the new iterate: misclassification, loss increase, best point."""
    wrong = logits.argmax(dim=1) != y
    s.adv = _where(wrong, x_new, s.adv)
    s.fooled = s.fooled | wrong
    s.wins = s.wins + (loss > s.loss).to(s.wins.dtype)
    s.x, s.loss, s.grad = x_new, loss, grad
    better = loss > s.best_loss
    s.best = _where(better, x_new, s.best)
    s.best_grad = _where(better, grad, s.best_grad)
    s.best_loss = torch.where(better, loss, s.best_loss)


def _apgd_run(model, x, y, eps, steps, norm, loss, target, rho, momentum, generator):
    """One APGD run on every sample of x; returns (worst-case point, fooled, its loss)."""
    x0 = _apgd_start(x, eps, norm, generator)
    loss0, logits, grad = loss_and_grad(model, x0, y, loss, target)
    fooled = logits.argmax(dim=1) != y
    s = _State(x=x0, x_prev=x0, grad=grad, loss=loss0, best=x0, best_loss=loss0, best_grad=grad, adv=x0,
               fooled=fooled, eta=torch.full((x.shape[0],), 2.0 * eps, device=x.device, dtype=x.dtype),
               wins=torch.zeros_like(loss0), check_loss=loss0.clone(),
               reduced=torch.ones_like(fooled))  # as the reference: condition 2 is off at the first checkpoint
    checkpoints = [w for w in apgd_checkpoints(steps) if 0 < w < steps]
    last = 0
    for i in range(steps):
        x_new = _move(s, x, eps, 1.0 if i == 0 else momentum, norm)  # no momentum on the first step
        s.x_prev = s.x
        _observe(s, x_new, y, *loss_and_grad(model, x_new, y, loss, target))
        if i + 1 in checkpoints:
            _checkpoint(s, rho * (i + 1 - last))
            last = i + 1
    return _where(s.fooled, s.adv, s.best), s.fooled, s.best_loss


def _check_common(model, x, y, eps, steps, restarts, norm, rho, momentum):
    eps = _check_number("eps", eps)
    steps = _check_number("steps", steps, integer=True)
    restarts = _check_number("restarts", restarts, integer=True, minimum=1)
    rho = _check_number("rho", rho)
    momentum = _check_number("momentum", momentum)
    if not 0 < rho <= 1 or momentum > 1:
        raise ValueError(f"expected 0 < rho <= 1 and 0 <= momentum <= 1, got rho={rho}, momentum={momentum}")
    return eps, steps, restarts, check_norm(norm), rho, momentum


def _run_on_robust(model, x, y, runs, run_one):
    """Run ``run_one(x_sub, y_sub, run_index)`` on the points not yet fooled, once per run; keep per
    point the first fooling example, else the highest-loss one. Syncs once per run (the subset)."""
    with torch.no_grad():
        fooled = model(x).argmax(dim=1) != y  # a misclassified clean point is its own worst case
    out = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
    for r in range(runs):
        idx = (~fooled).nonzero().flatten()
        if idx.numel() == 0:
            break
        x_r, fooled_r, loss_r = run_one(x[idx], y[idx], r, idx)
        take = fooled_r | (loss_r.float() > best_loss[idx])
        out[idx] = _where(take, x_r, out[idx])
        best_loss[idx] = torch.where(take, loss_r.float(), best_loss[idx])
        fooled[idx] = fooled_r
    return out


def apgd(model, x, y, eps, steps=100, restarts=1, norm="Linf", loss="ce", rho=APGD_RHO, momentum=APGD_MOMENTUM,
         generator=None):
    """Untargeted APGD (Croce & Hein, ICML 2020): APGD-CE with ``loss="ce"``, APGD-DLR with "dlr".

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K].
        x: float images [B,C,H,W] in [0, 1] (B may be 0).  y: integer labels [B].
        eps: radius (>= 0) of the ``norm`` ball.  steps: iterations per restart (100 in AutoAttack).
        restarts: runs from new random starts, each on the points still classified correctly.
        norm: "Linf" or "L2".  loss: "ce", "dlr" (K >= 3), "moe_ce" or "moe_gate" (mixtures only).
        rho, momentum: the paper's 0.75 and 0.75.
        generator: torch.Generator for the random starts (None: the global RNG).
    Returns:
        adversarial images like x, detached: per point the first example found misclassified,
        else the highest-loss point (a clean misclassified point is returned unchanged).
    """
    eps, steps, restarts, norm, rho, momentum = _check_common(model, x, y, eps, steps, restarts, norm, rho,
                                                              momentum)
    loss = check_loss(loss, model)
    with attack_mode(model):
        x, y = _check_inputs(model, x, y)
        if x.shape[0] == 0:
            return x.clone()
        _check_loss_classes(loss, _num_classes(model, x[:1]))

        def run_one(xs, ys, r, idx):
            return _apgd_run(model, xs, ys, eps, steps, norm, loss, None, rho, momentum, generator)

        return _run_on_robust(model, x, y, restarts, run_one)


def apgd_targeted(model, x, y, eps, steps=100, n_targets=9, restarts=1, norm="Linf", rho=APGD_RHO,
                  momentum=APGD_MOMENTUM, generator=None):
    """APGD-T (Croce & Hein, ICML 2020): targeted DLR loss towards each of the ``n_targets`` classes
    ranked 2nd, 3rd, ... by the clean logits, one APGD run per target (and restart) on the points
    still classified correctly. Needs K >= 4; ``n_targets`` <= K - 1 (9 for 10 classes, AutoAttack).

    Arguments and return value as ``apgd``.
    """
    eps, steps, restarts, norm, rho, momentum = _check_common(model, x, y, eps, steps, restarts, norm, rho,
                                                              momentum)
    n_targets = _check_number("n_targets", n_targets, integer=True, minimum=1)
    with attack_mode(model):
        x, y = _check_inputs(model, x, y)
        if x.shape[0] == 0:
            return x.clone()
        k = _num_classes(model, x[:1])
        _check_loss_classes("dlr-t", k)
        if n_targets > k - 1:
            raise ValueError(f"n_targets: expected at most K - 1 = {k - 1} target classes, got {n_targets}")
        with torch.no_grad():
            ranked = model(x).argsort(dim=1, descending=True)  # targets from the clean logits

        def run_one(xs, ys, r, idx):
            target = ranked[idx, 1 + r // restarts]
            return _apgd_run(model, xs, ys, eps, steps, norm, "dlr-t", target, rho, momentum, generator)

        return _run_on_robust(model, x, y, n_targets * restarts, run_one)
