"""Robustness presets in the spirit of AutoAttack (Croce & Hein, ICML 2020): a fixed sequence of
diverse attacks, each run only on the points that every earlier attack failed to fool, so the
result is the per-point worst case over the whole sequence.

``standard``: APGD-CE (100 it.), APGD-T (100 it., 9 targets), Square (5000 queries), as AutoAttack's
standard version. ``quick``: APGD-CE and APGD-T (20 it., 3 targets), for CPU smoke runs.
``adaptive``: ``standard`` plus APGD on the mixture-aware ``moe_gate`` loss (mixtures only).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .apgd import apgd, apgd_targeted
from .attacks import _check_inputs, _check_number, attack_mode, check_norm, logits_of, supports_details
from .constants import DEFAULT_EPS
from .square import square

__all__ = ["run_preset", "Stage", "StageResult", "PresetResult", "PRESETS", "preset_stages",
           "STANDARD_STEPS", "STANDARD_TARGETS", "STANDARD_QUERIES", "QUICK_STEPS", "QUICK_TARGETS", "L2_EPS"]

STANDARD_STEPS = 100     # APGD iterations (AutoAttack standard)
STANDARD_TARGETS = 9     # APGD-T target classes (AutoAttack standard, 10 classes)
STANDARD_QUERIES = 5000  # Square queries (AutoAttack standard)
QUICK_STEPS = 20
QUICK_TARGETS = 3
# Default L2 radius (pixel scale [0, 1]): the CIFAR-10 L2 threat model of RobustBench (Croce et al. 2021).
L2_EPS = 0.5


@dataclass(frozen=True)
class Stage:
    """One attack of a preset: ``attack(model, x, y, eps, norm, generator) -> x_adv``."""

    name: str
    attack: Callable
    settings: dict = field(default_factory=dict)
    linf_only: bool = False
    needs_details: bool = False
    min_classes: int = 0     # the DLR-targeted loss needs the true class, a target and two more


@dataclass
class StageResult:
    name: str
    robust_accuracy: float  # over all points, after this stage (worst case so far)
    seconds: float          # wall time of this stage
    attacked: int           # points this stage ran on (those still robust before it)
    fooled: int             # of those, points it fooled
    settings: dict
    skipped: str = ""       # why the stage did not run, if it did not


@dataclass
class PresetResult:
    preset: str
    norm: str
    eps: float
    seed: int
    clean_accuracy: float
    robust_accuracy: float
    robust: torch.Tensor     # bool [B]: correct under every stage (per-point worst case)
    x_adv: torch.Tensor      # [B,...]: a misclassified point where not robust, else the clean image
    stages: list
    autoattack: dict | None = None  # the original AutoAttack's figures, when it was run

    def to_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        return {"preset": self.preset, "norm": self.norm, "eps": self.eps, "seed": self.seed,
                "n": int(self.robust.numel()), "clean_accuracy": self.clean_accuracy,
                "robust_accuracy": self.robust_accuracy, "stages": [vars(s) for s in self.stages],
                "autoattack": self.autoattack}


def preset_stages(preset: str) -> list:
    """The stages of a named preset."""
    steps, targets = (QUICK_STEPS, QUICK_TARGETS) if preset == "quick" else (STANDARD_STEPS, STANDARD_TARGETS)
    ce = Stage("apgd-ce", lambda m, x, y, eps, norm, g: apgd(m, x, y, eps, steps, norm=norm, generator=g),
               {"steps": steps, "loss": "ce"})
    t = Stage("apgd-t", lambda m, x, y, eps, norm, g: apgd_targeted(m, x, y, eps, steps, n_targets=min(
        targets, _classes(m, x) - 1), norm=norm, generator=g), {"steps": steps, "n_targets": targets, "loss": "dlr-t"},
        min_classes=4)
    sq = Stage("square", lambda m, x, y, eps, norm, g: square(m, x, y, eps, STANDARD_QUERIES, generator=g),
               {"n_queries": STANDARD_QUERIES, "p_init": 0.8}, linf_only=True)
    moe = Stage("apgd-moe", lambda m, x, y, eps, norm, g: apgd(m, x, y, eps, steps, norm=norm, loss="moe_gate",
                                                              generator=g),
                {"steps": steps, "loss": "moe_gate"}, needs_details=True)
    table = {"quick": [ce, t], "standard": [ce, t, sq], "adaptive": [ce, t, moe, sq]}
    if preset not in table:
        raise ValueError(f"preset: expected one of {tuple(table)}, got {preset!r}")
    return table[preset]


PRESETS = ("standard", "quick", "adaptive")


def _classes(model, x):
    with torch.no_grad():
        return logits_of(model(x[:1])).shape[1]


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # stage boundaries only: time the work, not its queueing
    return time.perf_counter()


def _skip_reason(stage, model, norm, x):
    if stage.linf_only and norm != "Linf":
        return f"{stage.name} is implemented for Linf only"
    if stage.needs_details and not supports_details(model):
        return f"{stage.name} needs a mixture with return_details"
    if stage.min_classes and x.shape[0] and _classes(model, x) < stage.min_classes:
        return f"{stage.name} needs at least {stage.min_classes} classes, the model has {_classes(model, x)}"
    return ""


def _run_stage(stage, model, x, y, robust, x_adv, eps, norm, generator, batch_size):
    """Attack the still-robust points in chunks; update robust / x_adv in place; returns (attacked, fooled)."""
    idx = robust.nonzero().flatten()
    fooled_total = 0
    for chunk in idx.split(batch_size or max(1, idx.numel())):
        adv = stage.attack(model, x[chunk], y[chunk], eps, norm, generator)
        _check_in_ball(stage.name, adv, x[chunk], eps, norm)
        with torch.no_grad():
            fooled = logits_of(model(adv)).argmax(dim=1) != y[chunk]
        x_adv[chunk[fooled]] = adv[fooled]
        robust[chunk[fooled]] = False
        fooled_total += int(fooled.sum())
    return int(idx.numel()), fooled_total


def _check_in_ball(name, adv, x, eps, norm):
    """A stage that leaves the threat model would overstate the attack: refuse its result."""
    if adv.shape != x.shape:
        raise RuntimeError(f"stage {name}: expected adversarial images of shape {tuple(x.shape)}, "
                           f"got {tuple(adv.shape)}")
    if adv.numel() == 0:
        return
    d = (adv - x).flatten(1)
    dist = d.abs().amax(dim=1) if norm == "Linf" else d.norm(dim=1)
    if float(dist.max()) > eps * (1 + 1e-4) + 1e-6 or float(adv.min()) < 0 or float(adv.max()) > 1:
        raise RuntimeError(f"stage {name}: result leaves the {norm} ball of radius {eps} or the [0, 1] box "
                           f"(max distance {float(dist.max())})")


def run_preset(model, x, y, preset="standard", eps=None, norm="Linf", seed=0, progress=None,
               batch_size=None, stages=None, compare_autoattack=False) -> PresetResult:
    """Run a preset's attacks in sequence, each on the points still robust; the per-point worst case.

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K].
        x, y: images in [0, 1] and integer labels (B may be 0).
        preset: "standard", "quick" or "adaptive" (see the module docstring).
        eps: radius of the ``norm`` ball; None: ``DEFAULT_EPS`` (8/255) for Linf, ``L2_EPS`` (0.5) for L2.
        norm: "Linf" or "L2" (Square runs for Linf only).
        seed: seeds one torch.Generator on x's device that every stage draws from.
        progress: optional callable ``progress(stage_name, info_dict)``, called with
            ``info["event"] == "start"`` (with ``attacked``) and ``"done"`` (with the StageResult fields).
        batch_size: attack the robust points in chunks of this size (None: all at once).
        stages: a list of ``Stage`` to run instead of the preset's (for custom sequences).
        compare_autoattack: also run the original ``autoattack`` package (ImportError if absent)
            with the same eps/norm and report its robust accuracy in ``result.autoattack``.
    Returns:
        a ``PresetResult``.
    """
    norm = check_norm(norm)
    eps = _check_number("eps", (DEFAULT_EPS if norm == "Linf" else L2_EPS) if eps is None else eps)
    seed = _check_number("seed", seed, integer=True)
    if batch_size is not None:
        batch_size = _check_number("batch_size", batch_size, integer=True, minimum=1)
    stage_list = preset_stages(preset) if stages is None else list(stages)
    generator = torch.Generator(device=x.device if isinstance(x, torch.Tensor) else "cpu").manual_seed(seed)
    with attack_mode(model):
        x, y = _check_inputs(model, x, y)
        with torch.no_grad():
            robust = (logits_of(model(x)).argmax(dim=1) == y if x.shape[0]
                      else torch.zeros(0, dtype=torch.bool, device=x.device))
        n = max(1, x.shape[0])
        clean = float(robust.sum()) / n
        x_adv = x.clone()
        results = [_stage(s, model, x, y, robust, x_adv, eps, norm, generator, batch_size, progress, n)
                   for s in stage_list]
    result = PresetResult(preset if stages is None else "custom", norm, eps, seed, clean, float(robust.sum()) / n,
                          robust, x_adv, results)
    if compare_autoattack:
        result.autoattack = _run_autoattack(model, x, y, eps, norm, preset, seed, batch_size)
    return result


def _stage(stage, model, x, y, robust, x_adv, eps, norm, generator, batch_size, progress, n):
    skipped = _skip_reason(stage, model, norm, x)
    attacked = 0 if skipped else int(robust.sum())
    if progress is not None:
        progress(stage.name, {"event": "start", "attacked": attacked, "skipped": skipped})
    start = _now(x.device)
    fooled = 0
    if not skipped and attacked:
        attacked, fooled = _run_stage(stage, model, x, y, robust, x_adv, eps, norm, generator, batch_size)
    res = StageResult(stage.name, float(robust.sum()) / n, _now(x.device) - start, attacked, fooled,
                      dict(stage.settings), skipped)
    if progress is not None:
        progress(stage.name, {"event": "done", **vars(res)})
    return res


def _run_autoattack(model, x, y, eps, norm, preset, seed, batch_size):
    """The original AutoAttack (github.com/fra31/auto-attack) on the same points, for comparison."""
    try:
        from autoattack import AutoAttack
    except ImportError as exc:
        raise ImportError("compare_autoattack=True needs the original autoattack package "
                          "(pip install git+https://github.com/fra31/auto-attack)") from exc
    version = "standard" if preset == "standard" else "custom"
    kwargs = {} if version == "standard" else {"attacks_to_run": ["apgd-ce", "apgd-t"]}
    adversary = AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, verbose=False, **kwargs)
    if version == "custom":
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = QUICK_STEPS
        adversary.apgd_targeted.n_target_classes = QUICK_TARGETS
    start = time.perf_counter()
    with attack_mode(model):
        adv = adversary.run_standard_evaluation(x, y, bs=batch_size or max(1, x.shape[0]))
        with torch.no_grad():
            robust = logits_of(model(adv)).argmax(dim=1) == y
    return {"version": version, "robust_accuracy": float(robust.sum()) / max(1, x.shape[0]),
            "seconds": time.perf_counter() - start}
