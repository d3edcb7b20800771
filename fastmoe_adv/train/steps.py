"""One training step of each phase, the per-batch attack draws they use, and the schedule.

Phase 1: every expert attacked against itself on its own stream in one grouped pass
(``attacks.attack_experts``), then one grouped forward/backward with loss
``sum_e mean_b CE(z[b,e], y[b,e])``, so expert e's gradient comes only from its own stream.
Phase 2: an attack drawn per batch (FGSM with a random eps, or PGD with a random step count)
against the whole mixture, then cross-entropy of the mixture on the result.
Attacks run in eval mode (BN running statistics, no BN update); the training forward in train mode.

``graph=True`` (``TrainConfig.cuda_graphs``) captures the attack steps and the training
forward + gradients as CUDA graphs (``fastmoe_adv.graphs``); the optimizer step runs eagerly on
the captured gradients (a handful of multi-tensor kernels, and the learning rate stays a
Python float that the schedule may change every step). The same function as the plain step.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attacks, graphs
from ..moe import FastSoftMoE
from .config import SCHEDULES, TrainConfig

__all__ = ["LRSchedule", "Phase2Attack", "ExpertsNet", "draw_phase1_plan", "draw_phase2_attack", "phase1_step",
           "phase2_step", "autocast", "gate_regularizer", "optimizer_groups"]


class LRSchedule:
    """Learning rate as a pure function of the global step (so resuming needs only the step).

    cosine: ``lr * (1 + cos(pi * t / T)) / 2``; onecycle: linear from ``lr / 25`` to ``lr`` over
    ``warmup_frac * T`` steps, then linear to 0 at ``T``.
    """

    def __init__(self, kind: str, base_lr: float, total_steps: int, warmup_frac: float = 0.15):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {kind!r}")
        self.kind, self.base_lr = kind, float(base_lr)
        self.total_steps, self.warmup_frac = int(total_steps), float(warmup_frac)

    def lr_at(self, step: int) -> float:
        total = max(1, self.total_steps)
        t = min(step, total) / total
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
        w = self.warmup_frac
        if w > 0 and t < w:
            return self.base_lr * (1 / 25 + (1 - 1 / 25) * t / w)
        return self.base_lr * max(0.0, (1.0 - t) / max(1e-12, 1.0 - w))

    def apply(self, optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)   # a group's own multiple (the gate's, phase 2)
        return lr

    def state_dict(self) -> dict:
        return dict(kind=self.kind, base_lr=self.base_lr, total_steps=self.total_steps, warmup_frac=self.warmup_frac)

    def load_state_dict(self, d: dict) -> None:
        self.kind, self.base_lr = d["kind"], float(d["base_lr"])
        self.total_steps, self.warmup_frac = int(d["total_steps"]), float(d["warmup_frac"])


# ============================================================================ attack draws
def draw_phase1_plan(roles, cfg: TrainConfig, choice_gen: torch.Generator,
                     ramp: float = 1.0) -> attacks.ExpertAttackPlan:
    """This batch's per-expert attack: one eps per FGSM expert drawn from ``fgsm_eps_set``, one
    step count per PGD expert drawn from the (scaled) ``pgd_steps_set``; ``ramp`` (the
    ``eps_warmup`` factor) scales every eps and PGD step size."""
    n_fgsm, n_pgd = roles.count("fgsm"), roles.count("pgd")
    eps_set, steps_set = cfg.fgsm_eps_set, cfg.pgd_steps_scaled
    fi = torch.randint(len(eps_set), (n_fgsm,), generator=choice_gen).tolist()
    pi = torch.randint(len(steps_set), (n_pgd,), generator=choice_gen).tolist()
    return attacks.make_plan(roles, [eps_set[i] * ramp for i in fi], [steps_set[i] for i in pi],
                             pgd_eps=cfg.pgd_eps * ramp, pgd_alpha=cfg.pgd_alpha * ramp)


class Phase2Attack(NamedTuple):
    kind: str        # "fgsm" | "pgd"
    eps: float
    alpha: float     # PGD step size (FGSM: = eps)
    steps: int       # PGD iterations (FGSM: 1)


def draw_phase2_attack(cfg: TrainConfig, choice_gen: torch.Generator, ramp: float = 1.0) -> Phase2Attack:
    """FGSM with an eps from ``fgsm_eps_set`` (probability ``phase2_fgsm_prob``), else PGD with
    a step count from the (scaled) ``pgd_steps_set``; ``ramp`` scales eps and step size."""
    u, fi, pi = torch.rand(3, generator=choice_gen, dtype=torch.float64).tolist()
    if u < cfg.phase2_fgsm_prob:
        eps = cfg.fgsm_eps_set[min(int(fi * len(cfg.fgsm_eps_set)), len(cfg.fgsm_eps_set) - 1)] * ramp
        return Phase2Attack("fgsm", eps, eps, 1)
    steps = cfg.pgd_steps_scaled
    n_steps = steps[min(int(pi * len(steps)), len(steps) - 1)]
    return Phase2Attack("pgd", cfg.pgd_eps * ramp, cfg.pgd_alpha * ramp, n_steps)


# ============================================================================ steps
class ExpertsNet(nn.Module):
    """The experts of a mixture as one module: what phase 1 trains (and DDP wraps). It shares
    the mixture's expert parameters but not the gate's, so DDP syncs exactly what is trained."""

    def __init__(self, moe: FastSoftMoE):
        super().__init__()
        self.experts = moe.experts
        self._moe = (moe,)     # a tuple: the mixture is not registered as a submodule

    def forward(self, x):
        return self._moe[0].experts_forward(x)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; nothing otherwise (CPU runs stay in fp32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _update(net, optimizer, x, y, loss_fn, graph=False):
    """``loss, stats = loss_fn(x, y)``, then one optimizer step on its gradients; returns
    (loss, stats) detached. With ``graph``, the forward and the gradients are one captured CUDA
    graph over static copies of x and y, and the step runs on the captured gradients."""
    if not graph:
        loss, stats = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), stats
    return graphs.train_step(net, optimizer, x, y, loss_fn)


def phase1_step(model: FastSoftMoE, net: nn.Module, optimizer, x, y, plan, generator=None, bf16=False, graph=False):
    """One expert pre-training step.

    model: the plain mixture (attacked, in eval mode); net: what runs the training forward (the
    experts of ``model``, possibly DDP-wrapped). x: clean per-expert streams ``[B,E,3,H,W]``;
    y: ``[B,E]``. graph: CUDA graphs for the attack and the training pass (module docstring).
    Returns (loss, per-expert correct counts [E]) as detached tensors.
    """
    with autocast(x.device, bf16):
        x_adv = attacks.attack_experts(model, x, y, plan, generator=generator, graph=graph)
    net.train()

    def loss_fn(xb, yb):
        with autocast(xb.device, bf16):
            logits = net(xb)                                   # [B, E, K]
        b, e, k = logits.shape
        ce = F.cross_entropy(logits.float().reshape(b * e, k), yb.reshape(-1), reduction="none").view(b, e)
        # each expert's mean CE over its own stream, summed over experts
        return ce.mean(dim=0).sum(), (logits.detach().argmax(-1) == yb).sum(dim=0)

    return _update(net, optimizer, x_adv, y, loss_fn, graph)


def phase2_step(model: FastSoftMoE, net: nn.Module, optimizer, x, y, attack: Phase2Attack, cfg: TrainConfig,
                generator=None, graph=False):
    """One joint step: attack the whole mixture (``attack`` from ``draw_phase2_attack``), then
    train experts and gate on the result. graph: CUDA graphs for the attack steps and the
    training pass (module docstring). Returns (loss, correct count) detached."""
    with autocast(x.device, cfg.bf16):
        if attack.kind == "fgsm":
            x_adv = attacks.fgsm(model, x, y, attack.eps, graph=graph)
        else:
            x_adv = attacks.pgd(model, x, y, attack.eps, attack.alpha, int(attack.steps), random_start=True,
                                generator=generator, graph=graph)
    if cfg.channels_last and x.device.type == "cuda":
        x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    net.train()
    if not cfg.train_experts:
        model.experts.eval()     # frozen experts: their BatchNorm statistics stay phase 1's too
    regularized = bool(cfg.gate_entropy_weight or cfg.gate_balance_weight)

    def loss_fn(xb, yb):
        with autocast(xb.device, cfg.bf16):
            out = net(xb, return_details=True) if regularized else net(xb)
        logits = out.logits if regularized else out
        loss = F.cross_entropy(logits.float(), yb)
        if regularized:
            loss = loss + gate_regularizer(out.gate_weights.float(), cfg.gate_entropy_weight, cfg.gate_balance_weight)
        return loss, (logits.detach().argmax(-1) == yb).sum()

    return _update(net, optimizer, x_adv, y, loss_fn, graph)


def gate_regularizer(weights: torch.Tensor, entropy_weight: float, balance_weight: float) -> torch.Tensor:
    """``-entropy_weight * mean_b H(w_b) + balance_weight * KL(mean_b w || uniform)`` for gate
    weights ``[B, E]``. The entropy term keeps each input's weights soft (or, negative, sharp);
    the balance term keeps the average weight of every expert away from zero, which together
    with a negative entropy weight rewards weights that differ between inputs."""
    logw = weights.clamp_min(1e-30).log()
    entropy = -(weights * logw).sum(dim=1).mean()
    mean_w = weights.mean(dim=0)
    balance = (mean_w * (mean_w.clamp_min(1e-30).log() + math.log(weights.shape[1]))).sum()
    return -entropy_weight * entropy + balance_weight * balance


def optimizer_groups(model: FastSoftMoE, params, cfg: TrainConfig, phase: int) -> list:
    """SGD parameter groups. Phase 1, or phase 2 with the defaults: one group of ``params``.
    Phase 2 puts the gate in its own group (``lr_scale = gate_lr_scale``, read by
    ``LRSchedule.apply``) and, without ``train_experts``, leaves the experts out entirely (and
    stops their gradients, which no step would use)."""
    params = list(params)
    if phase != 2 or (cfg.train_experts and cfg.gate_lr_scale == 1.0):
        return [{"params": params}]
    gate_ids = {id(p) for p in model.gate.parameters()}
    gate = [p for p in params if id(p) in gate_ids]
    rest = [p for p in params if id(p) not in gate_ids]
    groups = [{"params": gate, "lr_scale": cfg.gate_lr_scale}]
    if cfg.train_experts:
        groups.append({"params": rest})
    else:
        model.experts.requires_grad_(False)
    return groups
