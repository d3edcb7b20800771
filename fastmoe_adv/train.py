"""The training recipe: expert pre-training (phase 1), then joint randomized adversarial
training of experts and gate (phase 2).

Phase 1, ``pretrain``: all E experts train at once in the grouped engine, each on its OWN data
stream (expert e draws its own batch from its own seeded loader, so the step's input is
``x [B,E,3,H,W]``, ``y [B,E]``). Per batch and per expert, by role: the clean expert trains on
its clean batch; an FGSM expert on FGSM examples with eps drawn from ``fgsm_eps_set``; a PGD
expert on PGD examples (eps ``pgd_eps``, step ``pgd_alpha``, random start) with the step count
drawn from ``pgd_steps_set``. Every expert is attacked against itself in one grouped pass
(``attacks.attack_experts``); then one grouped forward/backward on the per-expert adversarial
input with loss ``sum_e mean_b CE(z[b,e], y[b,e])``: expert e's gradient comes only from its
own stream, exactly as if it were trained alone. The gate is not trained in phase 1.

Phase 2, ``train``: experts and gate jointly. Each batch draws an attack against the WHOLE
mixture: FGSM with an eps from ``fgsm_eps_set`` (probability ``phase2_fgsm_prob``) or PGD with
a step count from ``pgd_steps_set``; the mixture is trained on the result (CE on its output).

Attacks run on the plain module in eval mode (BN running statistics, no BN update); the
training forward runs in train mode.

Everything random comes from seeded generators whose state is checkpointed (the data loaders,
a CPU generator for the per-batch attack draws, a generator on the device for the PGD random
starts, and torch's global RNG), and the position inside the epoch is saved, so ``resume=True``
ends where an uninterrupted run would: bit-identical weights on CPU.

Multi-GPU: under ``torchrun`` (``WORLD_SIZE > 1``) both phases run DDP (NCCL on CUDA, gloo on
CPU). ``batch_size`` is the GLOBAL batch; every rank takes its disjoint slice of each global
batch. DDP averages gradients over ranks, and each rank's loss is a mean over its (equal-size)
slice, so the update is the gradient of the mean over the global batch, with one exception:
BatchNorm normalizes with per-rank batch statistics (``GroupedBatchNorm2d`` is not a
SyncBatchNorm), and DDP broadcasts rank 0's running statistics. So a W-rank run equals a
single-process run whose BN sees the W slices separately (ghost batches), not the plain
single-process run with the global batch. Each rank's PGD random starts come from its own
generator (seeded with the rank). Only rank 0 writes checkpoints, logs and reports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attacks
from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed as distd
from .grouped import EXECUTORS
from .moe import BACKENDS, MIX_MODES, ROLES, FastSoftMoE, default_roles

__all__ = ["TrainConfig", "TrainingInterrupted", "LRSchedule", "build_model", "load_model", "pretrain", "train",
           "phase1_step", "phase2_step", "draw_phase1_plan", "draw_phase2_attack", "Phase2Attack",
           "expert_robustness",
           "mixture_robustness", "model_from_payload", "scaled_steps", "environment_info", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "fastmoe_adv.train/1"
SCHEDULES = ("cosine", "onecycle")
_DEFAULT_FGSM_EPS = tuple(round(0.01 * i, 2) for i in range(1, 10))   # 0.01 .. 0.09
_DEFAULT_PGD_STEPS = (10, 20, 30, 40, 50)

# Fields that do not change the training trajectory: they may differ when resuming.
_RESUME_FREE = {"device", "data_dir", "download", "backend", "executor", "eval_every", "eval_limit",
                "eval_batch_size", "eval_pgd_steps", "log_every", "checkpoint_every"}
# ... and, per phase, the other phase's fields.
_RESUME_FREE_PHASE = {1: {"train_epochs", "phase2_fgsm_prob", "mix", "temperature"}, 2: {"pretrain_epochs"}}


# ============================================================================ configuration
@dataclass
class TrainConfig:
    """Every knob of the recipe. Defaults follow the paper where it states a value (9 experts,
    1 clean / 4 FGSM / 4 PGD, FGSM eps 0.01..0.09, PGD steps 10..50, ResNet-18 width 64, SGD);
    where it does not, they are our choices (see DESIGN.md)."""

    # -- data
    dataset: str = "cifar10"            # "cifar10" | "svhn" | "synthetic"
    data_dir: str | None = None         # dataset root (None: the loader's default)
    download: bool = False              # fetch the dataset files if missing
    train_size: int | None = None       # images of the train split used (None: all)
    augment: bool = True                # random crop (+ flip where the dataset allows it)
    # -- model
    width: int = 64                     # ResNet-18 base width (64 = the real model)
    num_experts: int = 9                # E
    roles: tuple | None = None          # per-expert roles; None: 1 clean, then FGSM, then PGD
    mix: str = "logits"                 # "logits" | "probs" (see moe.py)
    temperature: float = 1.0            # gate softmax temperature
    gate_hidden: int = 16               # gate CNN width
    backend: str = "auto"               # mixing kernels: "auto" | "triton" | "torch"
    executor: str = "auto"              # experts: "auto" | "grouped" | "loop"
    # -- optimisation
    batch_size: int = 128               # images per step, global over ranks (phase 1: per expert)
    pretrain_epochs: int = 30           # phase 1 epochs (passes of each expert's stream)
    train_epochs: int = 30              # phase 2 epochs
    lr: float = 0.1                     # peak learning rate (SGD)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4          # L2, on every trained parameter
    schedule: str = "cosine"            # per step: "cosine" (lr -> 0) | "onecycle" (linear up, linear down)
    warmup_frac: float = 0.15           # onecycle: fraction of the steps spent warming up
    # -- attacks (pixel scale [0, 1])
    fgsm_eps_set: tuple = _DEFAULT_FGSM_EPS      # FGSM eps drawn per batch (per expert in phase 1)
    pgd_steps_set: tuple = _DEFAULT_PGD_STEPS    # PGD step counts drawn per batch (before steps_scale)
    pgd_eps: float = 8 / 255            # PGD L-inf radius
    pgd_alpha: float = 2 / 255          # PGD step size
    steps_scale: float = 1.0            # multiplies every PGD step count (0.1: {10..50} -> {1..5})
    phase2_fgsm_prob: float = 0.5       # phase 2: P(FGSM) per batch, else PGD
    eps_warmup: float = 0.0             # fraction of each phase's steps over which every attack's eps
                                        # (and PGD step size) ramps linearly from 0 to full; 0 = the
                                        # paper's recipe (full strength from the first step)
    # -- speed (CUDA only; ignored on CPU)
    bf16: bool = False                  # bf16 autocast for the forward passes
    channels_last: bool = False         # channels_last weights and 4-D inputs
    # -- evaluation, logging, checkpoints
    eval_every: int = 0                 # steps between held-out evaluations (0: end of each epoch; <0: never)
    eval_limit: int = 512               # held-out images per evaluation (test split)
    eval_batch_size: int = 256
    eval_pgd_steps: int = 20            # PGD steps of the periodic evaluation (before steps_scale)
    log_every: int = 20                 # steps between metrics lines
    checkpoint_every: int = 200         # steps between checkpoints (a SIGKILL loses at most this many)
    seed: int = 0
    device: str = "auto"                # "auto" | "cpu" | "cuda" | "cuda:N"

    def __post_init__(self):
        if self.roles is not None and not isinstance(self.roles, str):
            self.roles = tuple(self.roles)
        for name in ("fgsm_eps_set", "pgd_steps_set"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))
        self.validate()

    # ------------------------------------------------------------------ validation
    def _bad(self, name, expected):
        raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

    def _int(self, name, minimum=None, allow_none=False):
        v = getattr(self, name)
        if allow_none and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            self._bad(name, f"an int >= {minimum}" if minimum is not None else "an int")

    def _float(self, name, lo=None, hi=None, lo_open=False):
        v = getattr(self, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v <= hi
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]" if lo is not None else "any"
            self._bad(name, f"a finite float in {rng}")
        setattr(self, name, float(v))

    def _choice(self, name, choices):
        if getattr(self, name) not in choices:
            self._bad(name, f"one of {tuple(choices)}")

    def _bool(self, name):
        if not isinstance(getattr(self, name), bool):
            self._bad(name, "a bool")

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the field, what it expects and what it got."""
        known = tuple(getattr(data_mod, "DATASET_INFO", {}))
        if not isinstance(self.dataset, str) or self.dataset not in known:
            self._bad("dataset", f"one of {known}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            self._bad("data_dir", "a path or None")
        for name in ("download", "augment", "nesterov", "bf16", "channels_last"):
            self._bool(name)
        self._int("train_size", 1, allow_none=True)
        self._int("width", 1)
        self._int("num_experts", 1)
        if self.roles is not None:
            if isinstance(self.roles, str) or len(self.roles) != self.num_experts or \
                    any(r not in ROLES for r in self.roles):
                self._bad("roles", f"None or {self.num_experts} roles (num_experts), each one of {ROLES}")
        self._choice("mix", MIX_MODES)
        self._float("temperature", 0.0, lo_open=True)
        self._int("gate_hidden", 1)
        self._choice("backend", BACKENDS)
        self._choice("executor", EXECUTORS)
        self._int("batch_size", 1)
        self._int("pretrain_epochs", 0)
        self._int("train_epochs", 0)
        self._float("lr", 0.0, lo_open=True)
        self._float("momentum", 0.0, 1.0)
        self._float("weight_decay", 0.0)
        self._choice("schedule", SCHEDULES)
        self._float("warmup_frac", 0.0, 1.0)
        eps_set = self.fgsm_eps_set
        if not isinstance(eps_set, tuple) or not eps_set or any(
                isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e <= 1 for e in eps_set):
            self._bad("fgsm_eps_set", "a non-empty list of floats in [0, 1]")
        self.fgsm_eps_set = tuple(float(e) for e in eps_set)
        st_set = self.pgd_steps_set
        if not isinstance(st_set, tuple) or not st_set or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in st_set):
            self._bad("pgd_steps_set", "a non-empty list of ints >= 1")
        self._float("pgd_eps", 0.0, 1.0)
        self._float("pgd_alpha", 0.0, 1.0)
        self._float("steps_scale", 0.0, lo_open=True)
        self._float("phase2_fgsm_prob", 0.0, 1.0)
        self._float("eps_warmup", 0.0, 1.0)
        self._int("eval_every")
        self._int("eval_limit", 1)
        self._int("eval_batch_size", 1)
        self._int("eval_pgd_steps", 0)
        self._int("log_every", 1)
        self._int("checkpoint_every", 1)
        self._int("seed", 0)
        if not isinstance(self.device, str):
            self._bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def expert_roles(self) -> list[str]:
        return list(self.roles) if self.roles is not None else default_roles(self.num_experts)

    @property
    def pgd_steps_scaled(self) -> list[int]:
        return scaled_steps(self.pgd_steps_set, self.steps_scale)

    @property
    def eval_pgd_steps_scaled(self) -> int:
        return scaled_steps([self.eval_pgd_steps], self.steps_scale)[0] if self.eval_pgd_steps else 0

    def eps_ramp(self, step: int, total_steps: int) -> float:
        """Attack-strength factor at a phase's ``step`` (0-based): 1 without ``eps_warmup``."""
        if self.eps_warmup <= 0:
            return 1.0
        return min(1.0, (step + 1) / max(1.0, self.eps_warmup * total_steps))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
            elif isinstance(v, os.PathLike):
                d[k] = os.fspath(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def scaled_steps(steps: Sequence[int], scale: float) -> list[int]:
    """PGD step counts times ``scale``, rounded half up, at least 1 (``{10..50} * 0.1 -> {1..5}``)."""
    return [max(1, int(math.floor(s * scale + 0.5))) for s in steps]


# ============================================================================ schedule
class LRSchedule:
    """Learning rate as a pure function of the global step (so resuming needs only the step).

    cosine: ``lr * (1 + cos(pi * t / T)) / 2``; onecycle: linear from ``lr / 25`` to ``lr`` over
    ``warmup_frac * T`` steps, then linear to 0 at ``T``.
    """

    def __init__(self, kind: str, base_lr: float, total_steps: int, warmup_frac: float = 0.15):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {kind!r}")
        self.kind, self.base_lr, self.total_steps, self.warmup_frac = kind, float(base_lr), int(total_steps), \
            float(warmup_frac)
        self.step_count = 0

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
            group["lr"] = lr
        self.step_count = step
        return lr

    def state_dict(self) -> dict:
        return dict(kind=self.kind, base_lr=self.base_lr, total_steps=self.total_steps,
                    warmup_frac=self.warmup_frac, step_count=self.step_count)

    def load_state_dict(self, d: dict) -> None:
        self.kind, self.base_lr = d["kind"], float(d["base_lr"])
        self.total_steps, self.warmup_frac, self.step_count = int(d["total_steps"]), float(d["warmup_frac"]), \
            int(d["step_count"])


# ============================================================================ model
def _dataset_info(name: str) -> dict:
    info = getattr(data_mod, "DATASET_INFO", {})
    if name not in info:
        raise ValueError(f"TrainConfig.dataset: expected one of {tuple(info)}, got {name!r}")
    return info[name]


def build_model(cfg: TrainConfig, device=None) -> FastSoftMoE:
    """A fresh ``FastSoftMoE`` for ``cfg`` (dataset mean/std and class count from DATASET_INFO)."""
    info = _dataset_info(cfg.dataset)
    model = FastSoftMoE(num_experts=cfg.num_experts, num_classes=int(info["num_classes"]), width=cfg.width,
                        mean=tuple(info["mean"]), std=tuple(info["std"]), mix=cfg.mix, backend=cfg.backend,
                        executor=cfg.executor, temperature=cfg.temperature, roles=cfg.expert_roles,
                        gate_hidden=cfg.gate_hidden)
    return model.to(device) if device is not None else model


def model_from_payload(payload, where, map_location="cpu", backend="auto", executor="auto") -> FastSoftMoE:
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{where}: not a fastmoe_adv training checkpoint (expected keys 'model' and "
                         f"'model_config', got {keys})")
    config = dict(payload["model_config"])
    model = FastSoftMoE(**config, backend=backend, executor=executor)
    model.load_state_dict(payload["model"])
    return model.to(map_location) if map_location is not None else model


def load_model(checkpoint_path, map_location="cpu", backend: str = "auto", executor: str = "auto") -> FastSoftMoE:
    """The ``FastSoftMoE`` saved in a training checkpoint (loaded with ``weights_only=True``:
    a file that needs arbitrary code to unpickle is refused with ``UnsafeCheckpointError``)."""
    payload = ckpt.load_checkpoint(checkpoint_path, map_location=map_location)
    model = model_from_payload(payload, str(checkpoint_path), map_location, backend, executor)
    return model.eval()


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
class _ExpertsNet(nn.Module):
    """The experts of a mixture as one module: what phase 1 trains (and DDP wraps). It shares
    the mixture's expert parameters but not the gate's, so DDP syncs exactly what is trained."""

    def __init__(self, moe: FastSoftMoE):
        super().__init__()
        self.experts = moe.experts
        self._moe = (moe,)     # a tuple: the mixture is not registered as a submodule

    def forward(self, x):
        return self._moe[0].experts_forward(x)


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def phase1_step(model: FastSoftMoE, net: nn.Module, optimizer, x, y, plan, generator=None, bf16=False):
    """One expert pre-training step.

    model: the plain mixture (attacked, in eval mode); net: what runs the training forward (the
    experts of ``model``, possibly DDP-wrapped). x: clean per-expert streams ``[B,E,3,H,W]``;
    y: ``[B,E]``. Returns (loss, per-expert correct counts [E]) as detached tensors.
    """
    with _autocast(x.device, bf16):
        x_adv = attacks.attack_experts(model, x, y, plan, generator=generator)
    net.train()
    with _autocast(x.device, bf16):
        logits = net(x_adv)                                   # [B, E, K]
    b, e, k = logits.shape
    ce = F.cross_entropy(logits.float().reshape(b * e, k), y.reshape(-1), reduction="none").view(b, e)
    loss = ce.mean(dim=0).sum()    # each expert's mean CE over its own stream, summed over experts
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (logits.detach().argmax(-1) == y).sum(dim=0)
    return loss.detach(), correct


def phase2_step(model: FastSoftMoE, net: nn.Module, optimizer, x, y, attack: Phase2Attack, cfg: TrainConfig,
                generator=None):
    """One joint step: attack the whole mixture (``attack`` from ``draw_phase2_attack``), then
    train experts and gate on the result. Returns (loss, correct count) detached."""
    with _autocast(x.device, cfg.bf16):
        if attack.kind == "fgsm":
            x_adv = attacks.fgsm(model, x, y, attack.eps)
        else:
            x_adv = attacks.pgd(model, x, y, attack.eps, attack.alpha, int(attack.steps), random_start=True,
                                generator=generator)
    if cfg.channels_last and x.device.type == "cuda":
        x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    net.train()
    with _autocast(x.device, cfg.bf16):
        logits = net(x_adv)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(-1) == y).sum()


# ============================================================================ evaluation
def _batches(n, bs):
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


def _to_float(images, device):
    x = images.to(device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def _no_grad_logits(fn, x):
    return fn(x)


def expert_robustness(model: FastSoftMoE, images, labels, fgsm_eps: float | None = 8 / 255,
                      pgd_eps: float = 8 / 255, pgd_alpha: float = 2 / 255, pgd_steps: int = 20,
                      batch_size: int = 256, device=None, seed: int = 0, random_start: bool = True) -> dict:
    """Accuracy of every expert as a stand-alone model (white-box: each attacked against itself,
    all experts in one grouped pass): ``{"clean": [E], "fgsm": [E], "pgd": [E]}`` in [0, 1].
    ``fgsm_eps=None`` / ``pgd_steps=0`` skip that attack."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    E = model.num_experts
    correct = {"clean": torch.zeros(E, dtype=torch.long)}
    if fgsm_eps is not None:
        correct["fgsm"] = torch.zeros(E, dtype=torch.long)
    if pgd_steps:
        correct["pgd"] = torch.zeros(E, dtype=torch.long)
    n = len(labels)
    with attacks.eval_mode(model):
        for s in _batches(n, batch_size):
            x, y = _to_float(images[s], device), labels[s].to(device)
            correct["clean"] += (_no_grad_logits(model.experts_forward, x).argmax(-1) == y[:, None]).sum(0).cpu()
            if fgsm_eps is not None:
                plan = attacks.ExpertAttackPlan(["fgsm"] * E, [fgsm_eps] * E, [fgsm_eps] * E, [1] * E)
                xa = attacks.attack_experts(model, x, y, plan)
                correct["fgsm"] += (_no_grad_logits(model.experts_forward, xa).argmax(-1) == y[:, None]).sum(0).cpu()
            if pgd_steps:
                plan = attacks.ExpertAttackPlan(["pgd"] * E, [pgd_eps] * E, [pgd_alpha] * E, [pgd_steps] * E,
                                                random_start=random_start)
                xa = attacks.attack_experts(model, x, y, plan, generator=gen)
                correct["pgd"] += (_no_grad_logits(model.experts_forward, xa).argmax(-1) == y[:, None]).sum(0).cpu()
    return {k: (v.double() / max(1, n)).tolist() for k, v in correct.items()}


def mixture_robustness(model: FastSoftMoE, images, labels, pgd_eps=8 / 255, pgd_alpha=2 / 255, pgd_steps=20,
                       batch_size=256, device=None, seed=0) -> dict:
    """Quick held-out check of the whole mixture: clean and PGD accuracy in [0, 1]."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    clean = adv = 0
    n = len(labels)
    with attacks.eval_mode(model):
        for s in _batches(n, batch_size):
            x, y = _to_float(images[s], device), labels[s].to(device)
            clean += int((_no_grad_logits(model, x).argmax(-1) == y).sum())
            if pgd_steps:
                xa = attacks.pgd(model, x, y, pgd_eps, pgd_alpha, pgd_steps, generator=gen)
                adv += int((_no_grad_logits(model, xa).argmax(-1) == y).sum())
    out = {"clean": clean / max(1, n)}
    if pgd_steps:
        out["pgd"] = adv / max(1, n)
    return out


# ============================================================================ environment
def environment_info(device=None) -> dict:
    """Versions and hardware, for reports."""
    import numpy

    from .reporting import cpu_model
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # triton is optional
        info["triton"] = None
    from . import __version__
    info["fastmoe_adv"] = __version__
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if device is not None:
        info["device"] = str(device)
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return info


# ============================================================================ signals
class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived: a checkpoint was written (``checkpoint``) and training stopped."""

    def __init__(self, signum: int, checkpoint: str | None):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name if signum else "interrupt"
        super().__init__(f"training stopped by {name}; checkpoint {checkpoint} (continue with --resume)")


class _StopFlag:
    """SIGTERM/SIGINT set a flag that the loop checks between steps (so the checkpoint it then
    writes is a consistent step boundary); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        return False


# ============================================================================ the loop
class _Timer:
    """Training wall time, excluding evaluation and checkpoint writes (device synchronized)."""

    def __init__(self, device, elapsed=0.0):
        self.device, self.elapsed, self._t0 = device, float(elapsed), None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self._t0 = time.perf_counter()

    def pause(self):
        if self._t0 is not None:
            self._sync()
            self.elapsed += time.perf_counter() - self._t0
            self._t0 = None

    def now(self):
        if self._t0 is None:
            return self.elapsed
        self._sync()
        return self.elapsed + time.perf_counter() - self._t0


class _Streams:
    """One or several ``DeviceLoader`` advanced together (phase 1: one per expert)."""

    def __init__(self, loaders, stack: bool):
        self.loaders, self.stack = list(loaders), stack
        lengths = {len(loader) for loader in self.loaders}
        if len(lengths) != 1:
            raise ValueError(f"the expert streams must have the same number of batches, got {sorted(lengths)}")
        self.steps_per_epoch = lengths.pop()

    def __iter__(self):
        for batches in zip(*self.loaders):
            if self.stack:
                yield torch.stack([b[0] for b in batches], dim=1), torch.stack([b[1] for b in batches], dim=1)
            else:
                yield batches[0]

    def state_dict(self):
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, states):
        if len(states) != len(self.loaders):
            raise ValueError(f"checkpoint has {len(states)} loader states, expected {len(self.loaders)}")
        for loader, s in zip(self.loaders, states):
            loader.load_state_dict(s)


def _stream_seed(seed: int, phase: int, stream: int) -> int:
    return (seed * 1_000_003 + phase * 10_007 + stream * 101) % (2 ** 62)


def _write_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def _checkpoint_paths(out_dir: Path, phase: int):
    return out_dir / f"phase{phase}.pt", out_dir / "last.pt"


class _Run:
    """The machinery both phases share: device, DDP, data, optimizer, schedule, RNG, resume,
    logging, evaluation, checkpoints, signals."""

    def __init__(self, cfg: TrainConfig, out_dir, phase: int, resume: bool, progress: bool, log=print):
        self.cfg, self.phase, self.progress, self.log = cfg, phase, progress, log
        self.out_dir = Path(out_dir)
        self.dist = distd.setup(cfg.device)
        try:
            if cfg.batch_size % self.dist.world_size:
                raise ValueError(f"TrainConfig.batch_size: expected a multiple of the world size "
                                 f"{self.dist.world_size} (it is the global batch), got {cfg.batch_size}")
            self.device = self.dist.device
            self.main = self.dist.is_main
            if self.main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            distd.barrier()
        except BaseException:
            distd.cleanup(self.dist)
            raise
        self.final_path, self.last_path = _checkpoint_paths(self.out_dir, phase)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.resume = resume

    # -------------------------------------------------------------- data
    def load_data(self):
        cfg = self.cfg
        info = _dataset_info(cfg.dataset)
        self.images, self.labels = data_mod.load_dataset(cfg.dataset, root=cfg.data_dir, split="train",
                                                         download=cfg.download, seed=cfg.seed, size=cfg.train_size)
        self.flip = bool(info.get("flip", False))
        self.eval_images = self.eval_labels = None
        if cfg.eval_every >= 0:
            self.eval_images, self.eval_labels = data_mod.load_dataset(
                cfg.dataset, root=cfg.data_dir, split="test", download=cfg.download, seed=cfg.seed,
                size=cfg.eval_limit)

    def make_streams(self, n_streams: int, stack: bool) -> _Streams:
        cfg = self.cfg
        if len(self.labels) < cfg.batch_size:
            raise ValueError(f"TrainConfig.batch_size: expected at most the {len(self.labels)} training images, "
                             f"got {cfg.batch_size}")
        per_rank = cfg.batch_size // self.dist.world_size   # DeviceLoader's batch_size is per rank
        loaders = [data_mod.DeviceLoader(self.images, self.labels, per_rank, self.device,
                                         seed=_stream_seed(cfg.seed, self.phase, s), augment=cfg.augment,
                                         flip=self.flip, drop_last=True, rank=self.dist.rank,
                                         world_size=self.dist.world_size)
                   for s in range(n_streams)]
        return _Streams(loaders, stack)

    # -------------------------------------------------------------- state
    def setup_state(self, model, params, streams):
        cfg = self.cfg
        self.model, self.streams = model, streams
        self.params = list(params)
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         weight_decay=cfg.weight_decay)
        epochs = cfg.pretrain_epochs if self.phase == 1 else cfg.train_epochs
        self.epochs = epochs
        self.total_steps = epochs * streams.steps_per_epoch
        self.schedule = LRSchedule(cfg.schedule, cfg.lr, self.total_steps, cfg.warmup_frac)
        self.choice_gen = torch.Generator().manual_seed(_stream_seed(cfg.seed, self.phase, 9_999))
        self.attack_gen = torch.Generator(device=self.device).manual_seed(
            _stream_seed(cfg.seed + self.dist.rank, self.phase, 7_777))
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.images_seen = 0
        self.timer = _Timer(self.device)
        self.history = []

    def payload(self, done: bool) -> dict:
        loaders = distd.all_gather_object(self.streams.state_dict())
        attack_states = distd.all_gather_object(self.attack_gen.get_state().cpu())
        return ckpt.to_plain({
            "format": CHECKPOINT_FORMAT,
            "phase": self.phase,
            "done": done,
            "model": self.model.state_dict(),
            "model_config": self.model.config(),
            "train_config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "rng": {"torch": ckpt.capture_rng_state(), "choice": self.choice_gen.get_state(),
                    "attack": attack_states},
            "loaders": loaders,
            "world_size": self.dist.world_size,
            "progress": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                         "total_steps": self.total_steps, "steps_per_epoch": self.streams.steps_per_epoch,
                         "images_seen": self.images_seen, "train_time_s": self.timer.now()},
        })

    def save(self, done=False):
        payload = self.payload(done)   # collective under DDP: every rank calls it
        if self.main:
            ckpt.save_checkpoint(self.last_path, payload)
            if done:
                ckpt.save_checkpoint(self.final_path, payload)
        distd.barrier()
        return str(self.last_path)

    def restore(self, payload):
        cfg = self.cfg
        saved = TrainConfig.from_dict(payload["train_config"])
        diffs = [f"{k}: checkpoint {getattr(saved, k)!r}, given {getattr(cfg, k)!r}"
                 for k in (f.name for f in dataclasses.fields(TrainConfig))
                 if k not in _RESUME_FREE | _RESUME_FREE_PHASE[self.phase] and getattr(saved, k) != getattr(cfg, k)]
        if diffs:
            raise ValueError("resume: the configuration differs from the checkpoint's in fields that change the "
                             "training trajectory (" + "; ".join(diffs) + ")")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["scheduler"])
        prog = payload["progress"]
        if int(prog["steps_per_epoch"]) != self.streams.steps_per_epoch:
            raise ValueError(f"resume: the checkpoint has {prog['steps_per_epoch']} steps per epoch, this run "
                             f"{self.streams.steps_per_epoch} (different data size, batch size or world size)")
        self.epoch, self.step_in_epoch = int(prog["epoch"]), int(prog["step_in_epoch"])
        self.global_step, self.images_seen = int(prog["global_step"]), int(prog["images_seen"])
        self.timer = _Timer(self.device, float(prog["train_time_s"]))
        rng = payload["rng"]
        ckpt.restore_rng_state(rng["torch"])
        self.choice_gen.set_state(rng["choice"])
        saved_world = int(payload.get("world_size", 1))
        if saved_world == self.dist.world_size:
            self.attack_gen.set_state(rng["attack"][self.dist.rank].to("cpu"))
            self.streams.load_state_dict(payload["loaders"][self.dist.rank])
        else:
            raise ValueError(f"resume: the checkpoint was written by a {saved_world}-process run, this run has "
                             f"{self.dist.world_size} processes (the data slices and RNG streams would differ)")

    def check_resume(self):
        """``("done", None)`` when this phase already finished, ``("resume", payload)`` when its
        last checkpoint should be restored, ``("fresh", None)`` otherwise."""
        if not self.resume:
            return "fresh", None
        if not self.last_path.exists():
            if self.main:
                self.log(f"resume: no checkpoint at {self.last_path}; starting phase {self.phase} from scratch")
            return "fresh", None
        payload = ckpt.load_checkpoint(self.last_path, map_location="cpu")
        phase = int(payload.get("phase", 0)) if isinstance(payload, dict) else 0
        if phase > self.phase or (phase == self.phase and payload.get("done")):
            return "done", None
        if phase < self.phase:
            return "fresh", None    # last.pt is the previous phase's: this one starts now
        return "resume", payload

    def resume_from(self, payload):
        if payload is None:
            return
        self.restore(payload)
        if self.main:
            self.log(f"resumed phase {self.phase} at epoch {self.epoch}, step {self.step_in_epoch}/"
                     f"{self.streams.steps_per_epoch} (global step {self.global_step}/{self.total_steps})")

    # -------------------------------------------------------------- logging/eval
    def record_start(self, resume: bool):
        if self.main:
            self.record({"event": "start", "resume": resume, "world_size": self.dist.world_size,
                         "device": str(self.device), "total_steps": self.total_steps,
                         "pgd_steps": self.cfg.pgd_steps_scaled, "steps_scale": self.cfg.steps_scale})

    def record(self, rec: dict):
        rec = {"phase": self.phase, "epoch": self.epoch, "global_step": self.global_step, **rec}
        self.history.append(rec)
        if self.main:
            _write_jsonl(self.metrics_path, rec)

    def evaluate(self, fn) -> dict | None:
        if self.eval_images is None or not self.main:
            return None
        self.timer.pause()
        t = time.perf_counter()
        result = fn(self.model, self.eval_images, self.eval_labels)
        self.record({"event": "eval", "eval_time_s": round(time.perf_counter() - t, 3), **result})
        self.timer.start()
        return result

    # -------------------------------------------------------------- loop
    def loop(self, step_fn, eval_fn, desc):
        """Run the remaining steps. ``step_fn(x, y) -> (loss, correct, n)``: ``correct`` a count
        (or one count per expert) over ``n`` predictions."""
        cfg = self.cfg
        spe = self.streams.steps_per_epoch
        if self.step_in_epoch >= spe:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        bar = None
        if self.progress and self.main:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.global_step, desc=desc, unit="step", dynamic_ncols=True,
                       leave=True)
        since_ckpt = 0
        win_loss = win_correct = win_n = 0.0
        win_steps = 0
        win_t0, win_images = self.timer.now(), 0
        with _StopFlag() as stop:
            self.timer.start()
            try:
                while self.epoch < self.epochs:
                    for x, y in self.streams:
                        self.schedule.apply(self.optimizer, self.global_step)
                        loss, correct, n_pred = step_fn(x, y)
                        self.global_step += 1
                        self.step_in_epoch += 1
                        since_ckpt += 1
                        n_img = x.shape[0] * self.dist.world_size
                        self.images_seen += n_img
                        win_images += n_img
                        win_loss = win_loss + loss.float()       # stays on the device: no sync per step
                        win_correct = win_correct + correct
                        win_n += n_pred
                        win_steps += 1
                        epoch_end = self.step_in_epoch >= spe
                        if epoch_end:
                            self.epoch, self.step_in_epoch = self.epoch + 1, 0
                        if self.global_step % cfg.log_every == 0 or epoch_end or self.global_step == self.total_steps:
                            t_now = self.timer.now()
                            ips = win_images / max(1e-9, t_now - win_t0)
                            acc = torch.as_tensor(win_correct).double().cpu() / max(1, win_n)
                            rec = {"event": "train", "loss": float(win_loss) / max(1, win_steps),
                                   "acc": float(acc.mean()),
                                   **({"expert_acc": [round(a, 4) for a in acc.tolist()]} if acc.dim() else {}),
                                   "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": ips, "train_time_s": t_now}
                            self.record(rec)
                            if bar is not None:
                                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{ips:.0f}")
                            win_loss = win_correct = win_n = 0.0
                            win_steps = 0
                            win_t0, win_images = t_now, 0
                        if bar is not None:
                            bar.update(1)
                        if cfg.eval_every >= 0 and ((cfg.eval_every == 0 and epoch_end) or
                                                    (cfg.eval_every > 0 and self.global_step % cfg.eval_every == 0)):
                            result = self.evaluate(eval_fn)
                            if result and bar is not None:
                                bar.write(f"[phase {self.phase}] step {self.global_step}: eval " +
                                          ", ".join(f"{k} {_fmt(v)}" for k, v in result.items()))
                        stopping = distd.any_true(stop.signum is not None, self.device)
                        if stopping:
                            self.timer.pause()
                            path = self.save(done=False)
                            raise TrainingInterrupted(stop.signum or signal.SIGTERM, path)
                        if since_ckpt >= cfg.checkpoint_every and self.global_step < self.total_steps:
                            self.timer.pause()
                            self.save(done=False)
                            self.timer.start()
                            since_ckpt = 0
                        if epoch_end:
                            break
            finally:
                self.timer.pause()
                if bar is not None:
                    bar.close()
        self.save(done=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "[" + " ".join(f"{x:.2f}" for x in v) + "]"
    return str(v)


def _prepare_model(model: FastSoftMoE, cfg: TrainConfig, device) -> FastSoftMoE:
    model = model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _wrap_ddp(net: nn.Module, info: distd.DistInfo) -> nn.Module:
    if not info.distributed:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(net, device_ids=ids)


def _already_done(run: _Run) -> dict:
    cfg = run.cfg
    model = load_model(run.final_path, map_location=run.device, backend=cfg.backend, executor=cfg.executor)
    if run.main:
        run.log(f"phase {run.phase} already complete: {run.final_path}")
    payload = ckpt.load_checkpoint(run.final_path, map_location="cpu")
    prog = payload.get("progress", {})
    return {"phase": run.phase, "checkpoint": str(run.final_path), "model": model, "history": [],
            "train_time_s": float(prog.get("train_time_s", 0.0)), "global_step": int(prog.get("global_step", 0)),
            "total_steps": int(prog.get("total_steps", 0)), "images_seen": int(prog.get("images_seen", 0)),
            "already_done": True, "world_size": run.dist.world_size, "rank": run.dist.rank, "device": str(run.device),
            "config": cfg.to_dict()}


def _summary(run: _Run, model, path, skipped=False) -> dict:
    return {"phase": run.phase, "checkpoint": str(path), "model": model, "history": run.history,
            "train_time_s": run.timer.elapsed, "global_step": run.global_step, "total_steps": run.total_steps,
            "images_seen": run.images_seen, "already_done": skipped, "world_size": run.dist.world_size,
            "rank": run.dist.rank,
            "device": str(run.device), "config": run.cfg.to_dict()}


# ============================================================================ phase 1
def pretrain(cfg: TrainConfig, out_dir, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Phase 1: every expert trained on its own stream per its role (see the module docstring).

    Writes ``OUT/phase1.pt`` at the end, ``OUT/last.pt`` every ``checkpoint_every`` steps, and
    ``OUT/metrics.jsonl``. Returns a summary dict (``model``, ``checkpoint``, ``history``,
    ``train_time_s``, ...).
    """
    cfg = cfg.validate()
    run = _Run(cfg, out_dir, 1, resume, progress, log)
    try:
        status, payload = run.check_resume()
        if status == "done":
            return _already_done(run)
        torch.manual_seed(cfg.seed)
        model = _prepare_model(build_model(cfg), cfg, run.device)
        run.load_data()
        roles = list(model.roles)
        streams = run.make_streams(cfg.num_experts, stack=True)
        run.setup_state(model, model.experts.parameters(), streams)   # the gate is not trained in phase 1
        run.resume_from(payload)
        net = _wrap_ddp(_ExpertsNet(model), run.dist)
        run.record_start(resume)

        def step_fn(x, y):
            plan = draw_phase1_plan(roles, cfg, run.choice_gen, cfg.eps_ramp(run.global_step, run.total_steps))
            loss, correct = phase1_step(model, net, run.optimizer, x, y, plan, run.attack_gen, cfg.bf16)
            return loss, correct, y.shape[0]     # per-expert correct counts, over B images each

        def eval_fn(m, images, labels):
            r = expert_robustness(m, images, labels, fgsm_eps=None, pgd_eps=cfg.pgd_eps, pgd_alpha=cfg.pgd_alpha,
                                  pgd_steps=cfg.eval_pgd_steps_scaled, batch_size=cfg.eval_batch_size,
                                  seed=cfg.seed + 12345)
            return {f"expert_{k}": v for k, v in r.items()}

        run.loop(step_fn, eval_fn, "phase 1 (experts)")
        return _summary(run, model.eval(), run.final_path)
    finally:
        distd.cleanup(run.dist)


# ============================================================================ phase 2
def train(cfg: TrainConfig, out_dir, init=None, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Phase 2: experts + gate trained jointly with randomized adversarial training against the
    whole mixture.

    init: the phase-1 checkpoint path (default ``OUT/phase1.pt``), or a ``FastSoftMoE`` to start
    from. Writes ``OUT/phase2.pt``, ``OUT/last.pt`` and ``OUT/metrics.jsonl``.
    """
    cfg = cfg.validate()
    run = _Run(cfg, out_dir, 2, resume, progress, log)
    try:
        status, payload = run.check_resume()
        if status == "done":
            return _already_done(run)
        if status == "resume":   # the architecture is the checkpoint's; its weights are restored below
            model = model_from_payload(payload, str(run.last_path), None, cfg.backend, cfg.executor)
        else:
            model = _init_model(cfg, init, run.out_dir)
        _check_compatible(model, cfg)
        model = _prepare_model(model, cfg, run.device)
        run.load_data()
        streams = run.make_streams(1, stack=False)
        run.setup_state(model, model.parameters(), streams)
        run.resume_from(payload)
        net = _wrap_ddp(model, run.dist)
        run.record_start(resume)

        def step_fn(x, y):
            attack = draw_phase2_attack(cfg, run.choice_gen, cfg.eps_ramp(run.global_step, run.total_steps))
            loss, correct = phase2_step(model, net, run.optimizer, x, y, attack, cfg, run.attack_gen)
            return loss, correct, y.numel()

        def eval_fn(m, images, labels):
            return mixture_robustness(m, images, labels, cfg.pgd_eps, cfg.pgd_alpha, cfg.eval_pgd_steps_scaled,
                                      cfg.eval_batch_size, seed=cfg.seed + 12345)

        run.loop(step_fn, eval_fn, "phase 2 (joint)")
        return _summary(run, model.eval(), run.final_path)
    finally:
        distd.cleanup(run.dist)


def _init_model(cfg: TrainConfig, init, out_dir: Path) -> FastSoftMoE:
    if isinstance(init, FastSoftMoE):
        model = FastSoftMoE(**init.config(), backend=cfg.backend, executor=cfg.executor)
        model.load_state_dict(init.state_dict())
        return model
    path = Path(init) if init is not None else out_dir / "phase1.pt"
    if not path.exists():
        raise FileNotFoundError(f"phase-2 init checkpoint not found: {path} (run pretrain first, or pass "
                                f"--init PATH / init=)")
    payload = ckpt.load_checkpoint(path, map_location="cpu")
    return model_from_payload(payload, str(path), None, cfg.backend, cfg.executor)


def _check_compatible(model: FastSoftMoE, cfg: TrainConfig):
    """The init model must have the configured architecture; the mixing rule and temperature
    are phase-2 choices (the gate is untrained before), so the config's are applied."""
    for name, want, got in (("width", cfg.width, model.width), ("num_experts", cfg.num_experts, model.num_experts),
                            ("roles", cfg.expert_roles, list(model.roles))):
        if want != got:
            raise ValueError(f"TrainConfig.{name}: the init model has {got!r}, the config says {want!r}")
    model.mix, model.temperature = cfg.mix, float(cfg.temperature)
