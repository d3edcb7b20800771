"""``TrainConfig``: every knob of the recipe in one readable object.

Each field carries its help text (the CLI's ``--help`` is built from it) and its resume rule in
``dataclasses.field(metadata=...)``: ``resume="free"`` fields may change when a run resumes
(they do not change the training trajectory); ``resume="phase1"`` / ``"phase2"`` fields are used
by that phase only, so the other phase may resume with a different value; every other field
must match the checkpoint's.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

from ..constants import (
    BACKENDS,
    DEFAULT_ALPHA,
    DEFAULT_EPS,
    DEFAULT_FGSM_EPS_SET,
    DEFAULT_PGD_STEPS_SET,
    EXECUTORS,
    MAX_EXPERTS,
    MIX_MODES,
    ROLES,
)
from ..errors import ConfigError

__all__ = ["TrainConfig", "SCHEDULES", "ARCHITECTURE_FIELDS", "scaled_steps", "resume_relevant_fields"]

SCHEDULES = ("cosine", "onecycle")
RECIPES = ("paper", "fast")
# What a phase-2 run takes from its phase-1 checkpoint unless the user restates it.
ARCHITECTURE_FIELDS = ("dataset", "width", "num_experts", "roles", "gate_hidden")
_MAX_SEED = 2 ** 63 - 1


def _f(default, help: str, resume: str | None = None):
    """A config field with its help text and resume rule (None: must match when resuming)."""
    meta = {"help": help, "resume": resume}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Defaults follow the paper where it states a value (9 experts, 1 clean / 4 FGSM / 4 PGD,
    FGSM eps 0.01..0.09, PGD steps 10..50, ResNet-18 width 64); where it does not, they are this
    library's choices (README, "Design choices the paper leaves open")."""

    # -- data
    dataset: str = _f("cifar10", "cifar10 | svhn | synthetic | npz")
    data_dir: str | None = _f(None, "dataset root, or the .npz file for --dataset npz", "free")
    download: bool = _f(False, "fetch the dataset files if missing (needs torchvision)", "free")
    train_size: int | None = _f(None, "training images used, after the holdout is set aside (None: all)")
    holdout: int = _f(0, "training images set aside (seeded) as a validation split that training never sees; "
                         "periodic evaluation then uses it instead of the test split")
    augment: bool = _f(True, "random crop (+ flip where the dataset allows it)")
    # -- model
    width: int = _f(64, "ResNet-18 base width (64 = the real model)")
    num_experts: int = _f(9, "number of experts E")
    roles: tuple | None = _f(None, "comma-separated role per expert (clean,fgsm,pgd); default 1 clean, then FGSM, "
                                   "then PGD")
    mix: str = _f("logits", "logits | probs: weighted sum of expert logits or log of the mixed probabilities",
                  "phase2")
    temperature: float = _f(1.0, "gate softmax temperature", "phase2")
    gate_hidden: int = _f(16, "gate CNN width")
    backend: str = _f("auto", "mixing kernels: auto | triton | torch", "free")
    executor: str = _f("auto", "experts: auto | grouped | loop (resuming under another is not bit-exact)", "free")
    bn_backend: str = _f("torch", "experts' BatchNorm + add + ReLU: torch | triton (the fused kernel, CUDA) | auto "
                                  "(the faster, measured on CUDA)",
                         "free")
    # -- optimisation
    batch_size: int = _f(128, "images per step, global over ranks (phase 1: per expert)")
    pretrain_epochs: int = _f(30, "phase 1 epochs (passes of each expert's stream)", "phase1")
    train_epochs: int = _f(30, "phase 2 epochs", "phase2")
    lr: float = _f(0.1, "peak learning rate (SGD)")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay on every trained parameter")
    schedule: str = _f("cosine", "per step: cosine (lr -> 0) | onecycle (linear up, linear down)")
    warmup_frac: float = _f(0.15, "onecycle: fraction of the steps spent warming up")
    train_experts: bool = _f(True, "phase 2: train experts and gate jointly (False: only the gate; the experts' "
                                   "weights and BatchNorm statistics stay as phase 1 left them)", "phase2")
    gate_lr_scale: float = _f(1.0, "phase 2: the gate's learning rate as a multiple of lr", "phase2")
    gate_entropy_weight: float = _f(0.0, "phase 2: minus this times the mean per-input gate entropy is added to the "
                                         "loss (> 0 keeps the gate soft, < 0 sharpens it); 0 = the paper's loss",
                                    "phase2")
    gate_balance_weight: float = _f(0.0, "phase 2: this times KL(batch-mean gate weights || uniform) is added to the "
                                         "loss (keeps every expert in use on average); 0 = the paper's loss",
                                    "phase2")
    # -- attacks (pixel scale [0, 1])
    fgsm_eps_set: tuple = _f(DEFAULT_FGSM_EPS_SET, "comma-separated FGSM eps drawn per batch (per expert in "
                                                   "phase 1)")
    pgd_steps_set: tuple = _f(DEFAULT_PGD_STEPS_SET, "comma-separated PGD step counts drawn per batch (before "
                                                     "steps_scale)")
    pgd_eps: float = _f(DEFAULT_EPS, "PGD L-inf radius")
    pgd_alpha: float = _f(DEFAULT_ALPHA, "PGD step size")
    steps_scale: float = _f(1.0, "multiplies every PGD step count (0.1: {10..50} -> {1..5})")
    phase2_fgsm_prob: float = _f(0.5, "phase 2: probability of FGSM per batch, else PGD", "phase2")
    eps_warmup: float = _f(0.0, "fraction of each phase's steps over which every attack's eps (and PGD step size) "
                                "ramps linearly from 0 to full; 0 = the paper's recipe")
    # -- speed (CUDA only; ignored on CPU)
    bf16: bool = _f(False, "bf16 autocast for the forward passes (CUDA)")
    channels_last: bool = _f(False, "channels_last weights and 4-D inputs (CUDA)")
    cuda_graphs: bool = _f(False, "capture the attack steps (also those of the periodic evaluation) and the "
                                  "training pass as CUDA graphs (CUDA, one process)", "free")
    # -- evaluation, logging, checkpoints
    eval_every: int = _f(0, "steps between held-out evaluations (0: end of each epoch; <0: never)", "free")
    eval_limit: int = _f(512, "held-out images per periodic evaluation", "free")
    eval_batch_size: int = _f(256, "images per evaluation batch", "free")
    eval_pgd_steps: int = _f(20, "PGD steps of the periodic evaluation (before steps_scale)", "free")
    log_every: int = _f(20, "steps between metrics lines (also how often divergence and, under torchrun, "
                            "the stop signal are checked)", "free")
    checkpoint_every: int = _f(200, "steps between checkpoints (a SIGKILL loses at most this many)", "free")
    seed: int = _f(0, "seed of every random stream")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", "free")

    def __post_init__(self):
        if self.roles is not None and not isinstance(self.roles, str):
            self.roles = tuple(self.roles)
        for name in ("fgsm_eps_set", "pgd_steps_set"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Raise ConfigError (a ValueError) naming the field, what it expects and what it got."""
        self._check_data()
        self._check_model()
        self._check_optimisation()
        self._check_attacks()
        for name in ("eval_every",):
            self._int(name)
        for name, minimum in (("eval_limit", 1), ("eval_batch_size", 1), ("eval_pgd_steps", 0), ("log_every", 1),
                              ("checkpoint_every", 1), ("seed", 0)):
            self._int(name, minimum)
        if self.seed > _MAX_SEED:
            self._bad("seed", f"an int in [0, {_MAX_SEED}] (64-bit)")
        if not isinstance(self.device, str):
            self._bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        return self

    def _check_data(self):
        from ..data import DATASETS
        if not isinstance(self.dataset, str) or self.dataset not in DATASETS:
            self._bad("dataset", f"one of {tuple(DATASETS)}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            self._bad("data_dir", "a path or None")
        for name in ("download", "augment", "nesterov", "bf16", "channels_last", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                self._bad(name, "a bool")
        self._int("train_size", 1, allow_none=True)
        self._int("holdout", 0)

    def _check_model(self):
        self._int("width", 1)
        self._int("num_experts", 1)
        if self.num_experts > MAX_EXPERTS:
            self._bad("num_experts", f"at most {MAX_EXPERTS} (the fused gated_mix kernel's limit, needed by "
                                     "phase 2 and evaluation)")
        if self.roles is not None and (isinstance(self.roles, str) or len(self.roles) != self.num_experts
                                       or any(r not in ROLES for r in self.roles)):
            self._bad("roles", f"None or {self.num_experts} roles (num_experts), each one of {ROLES}")
        self._choice("mix", MIX_MODES)
        self._float("temperature", 0.0, lo_open=True)
        self._int("gate_hidden", 1)
        self._choice("backend", BACKENDS)
        self._choice("executor", EXECUTORS)
        self._choice("bn_backend", BACKENDS)

    def _check_optimisation(self):
        self._int("batch_size", 1)
        self._int("pretrain_epochs", 0)
        self._int("train_epochs", 0)
        self._float("lr", 0.0, lo_open=True)
        self._float("momentum", 0.0, 1.0)
        self._float("weight_decay", 0.0)
        self._choice("schedule", SCHEDULES)
        self._float("warmup_frac", 0.0, 1.0)
        if not isinstance(self.train_experts, bool):
            self._bad("train_experts", "a bool")
        self._float("gate_lr_scale", 0.0)
        self._float("gate_entropy_weight")
        self._float("gate_balance_weight", 0.0)

    def _check_attacks(self):
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

    def _bad(self, name, expected):
        raise ConfigError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

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

    # ------------------------------------------------------------------ derived values
    @property
    def expert_roles(self) -> list[str]:
        from ..moe import default_roles
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

    # ------------------------------------------------------------------ conversion
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
        if not isinstance(d, dict):
            raise ConfigError(f"TrainConfig: expected a dict of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown fields {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "TrainConfig", phase: int) -> list[str]:
        """The fields that change phase ``phase``'s trajectory and differ between the two configs."""
        return [f"{k}: checkpoint {getattr(other, k)!r}, given {getattr(self, k)!r}"
                for k in resume_relevant_fields(phase) if getattr(other, k) != getattr(self, k)]


def resume_relevant_fields(phase: int) -> list[str]:
    """Fields that must match a checkpoint of phase ``phase`` when resuming it."""
    skip = {"free", f"phase{3 - phase}"}     # the other phase's own fields may differ
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume") not in skip]


def scaled_steps(steps: Sequence[int], scale: float) -> list[int]:
    """PGD step counts times ``scale``, rounded half up, at least 1 (``{10..50} * 0.1 -> {1..5}``)."""
    return [max(1, int(math.floor(s * scale + 0.5))) for s in steps]
