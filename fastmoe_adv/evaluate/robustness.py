"""Accuracy of a model under a list of attacks, an accuracy-versus-eps curve, and the report
that gathers them with the gradient-masking sanity checks (sanity.py) and, for a mixture, the
gate diagnostics (gate.py).

``robustness(model, images, labels)`` runs clean / FGSM 8/255 / PGD-20 (alpha 2/255, random
start) by default. Every accuracy comes with its 95% Wilson interval.
"""
from __future__ import annotations

import datetime
import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from .. import attacks as _attacks
from ..attacks import eval_mode
from ..constants import ATTACK_KINDS, DEFAULT_ALPHA, DEFAULT_EPS
from ..reporting import environment
from . import preset as preset_mod
from .common import Progress, forward, generator, is_moe, model_device_dtype, prepare_data, sync, to_device
from .sanity import SANITY_THRESHOLDS, GradientMaskingWarning, fgsm_pgd_pair, run_sanity

__all__ = ["robustness", "AttackSpec", "default_attacks", "evaluate_spec", "curve_spec", "wilson_interval",
           "DEFAULT_EPS_CURVE"]

DEFAULT_EPS_CURVE = tuple(k / 255 for k in (0, 1, 2, 4, 8, 16))   # pixel scale


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> list:
    """95% Wilson score interval of a binomial proportion (better than the normal one near 0
    and 1, where robust accuracies live)."""
    if total <= 0:
        return [None, None]
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation.

    name: unique label in the report.  kind: "clean", "fgsm" or "pgd".
    eps: L-inf radius (pixel scale).  alpha: PGD step size.  steps: PGD iterations.
    random_start / restarts: PGD only. FGSM uses eps only; "clean" uses nothing.
    """

    name: str
    kind: str
    eps: float = 0.0
    alpha: float = 0.0
    steps: int = 0
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"AttackSpec.name must be a non-empty str, got {self.name!r}")
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"AttackSpec.kind must be one of {ATTACK_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "eps", _attacks.check_number("AttackSpec.eps", self.eps))
        object.__setattr__(self, "alpha", _attacks.check_number("AttackSpec.alpha", self.alpha))
        object.__setattr__(self, "steps", _attacks.check_number("AttackSpec.steps", self.steps, integer=True))
        object.__setattr__(self, "restarts",
                           _attacks.check_number("AttackSpec.restarts", self.restarts, integer=True, minimum=1))
        if not isinstance(self.random_start, bool):
            raise ValueError(f"AttackSpec.random_start must be a bool, got {self.random_start!r}")

    @property
    def effective_steps(self) -> int:
        return {"clean": 0, "fgsm": 1}.get(self.kind, self.steps)

    def run(self, model, x, y, generator=None):
        """Adversarial examples for (x, y) (x itself for "clean")."""
        if self.kind == "clean":
            return x
        if self.kind == "fgsm":
            return _attacks.fgsm(model, x, y, self.eps)
        return _attacks.pgd(model, x, y, self.eps, self.alpha, self.steps, random_start=self.random_start,
                            restarts=self.restarts, generator=generator)


def default_attacks(restarts: int = 1) -> list:
    """Clean, FGSM 8/255, PGD-20 (alpha 2/255, random start, ``restarts``)."""
    return [AttackSpec("clean", "clean"),
            AttackSpec("fgsm", "fgsm", eps=DEFAULT_EPS),
            AttackSpec("pgd20", "pgd", eps=DEFAULT_EPS, alpha=DEFAULT_ALPHA, steps=20, random_start=True,
                       restarts=restarts)]


def curve_spec(kind, eps, steps):
    # Madry et al.'s rule: alpha = 2.5 * eps / steps (2/255 for eps 8/255 and 10 steps).
    alpha = 2.5 * eps / steps if steps else 0.0
    return AttackSpec(f"{kind}@{eps:.6g}", kind, eps=eps, alpha=alpha, steps=steps, random_start=True)


def evaluate_spec(model, spec, images, labels, *, batch_size, device, dtype, seed, moe, progress, limit=None):
    """Accuracy (and gate weights, per-class counts, throughput) of one attack over the data."""
    n = images.shape[0] if limit is None else min(limit, images.shape[0])
    gen = generator(device, seed)
    correct = 0
    class_correct = class_total = gate_sum = None
    seconds = 0.0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = to_device(images[start:stop], device, dtype)
        y = labels[start:stop].to(device)
        sync(device)
        t0 = time.perf_counter()
        x_adv = spec.run(model, x, y, generator=gen)
        logits, weights = forward(model, x_adv, moe)
        sync(device)
        seconds += time.perf_counter() - t0
        k = logits.shape[-1]
        _attacks.check_label_range(y, k, name="labels")
        if class_correct is None:
            class_correct = torch.zeros(k, dtype=torch.long)
            class_total = torch.zeros(k, dtype=torch.long)
        hit = (logits.argmax(dim=-1) == y).cpu()
        y_cpu = y.cpu()
        correct += int(hit.sum())
        class_correct += torch.bincount(y_cpu[hit], minlength=k)
        class_total += torch.bincount(y_cpu, minlength=k)
        if weights is not None:
            w = weights.detach().double().sum(dim=0).cpu()
            gate_sum = w if gate_sum is None else gate_sum + w
        progress.update(spec.name)
    per_class = [None if int(t) == 0 else int(c) / int(t) for c, t in zip(class_correct, class_total)]
    return {
        "name": spec.name, "kind": spec.kind, "eps": spec.eps, "alpha": spec.alpha, "steps": spec.effective_steps,
        "random_start": spec.random_start if spec.kind == "pgd" else False,
        "restarts": spec.restarts if spec.kind == "pgd" else 1,
        "accuracy": correct / n, "correct": correct, "total": n, "ci95": wilson_interval(correct, n),
        "per_class_accuracy": per_class,
        "per_class_total": [int(t) for t in class_total],
        "gate_weights": None if gate_sum is None else (gate_sum / n).tolist(),
        "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None,
    }


def robustness(model, images, labels, attacks=None, batch_size=256, device=None, eps_curve=DEFAULT_EPS_CURVE,
               curve_attack="pgd", curve_steps=10, restarts=1, seed=0, progress=True, sanity=True,
               gate=True, preset=None) -> dict:
    """White-box robustness of ``model`` on (images, labels), with gradient-masking sanity checks.

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K] (a ``FastSoftMoE`` /
            ``ReferenceSoftMoE`` also gets its gate reported: mean weights per attack and the
            diagnostics of gate.py).
        images: [N,C,H,W] uint8 (divided by 255) or float in [0, 1]; may stay on the CPU.
        labels: [N] integer labels.
        attacks: list of ``AttackSpec``; default ``default_attacks(restarts)``: clean,
            FGSM 8/255, PGD-20 (alpha 2/255, random start).
        batch_size: images per attack batch.  device: default the model's.
        eps_curve: eps values of the accuracy-versus-eps curve (() for none); sorted ascending.
        curve_attack: "pgd" (curve_steps steps, alpha = 2.5 * eps / curve_steps, random start)
            or "fgsm".
        restarts: restarts of the default PGD attack (custom specs carry their own).
        seed: every attack's random starts come from a generator seeded with it.
        progress: a bar on a terminal, plain progress lines with time left elsewhere.
        sanity: run the gradient-masking sanity checks (sanity.py).
        gate: for a mixture, the gate diagnostics (gate.py) on clean, FGSM and PGD inputs.
        preset: None, "quick", "standard" or "full" (preset.py): an AutoAttack-grade sequence on
            every image, whose per-point worst case is the number to report; the report then
            states how much the PGD attacks overstate it and adds the checks only it allows.
    Returns:
        the report dict (see ``write_report``).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    batch_size = _attacks.check_number("batch_size", batch_size, integer=True, minimum=1)
    curve_steps = _attacks.check_number("curve_steps", curve_steps, integer=True, minimum=1)
    restarts = _attacks.check_number("restarts", restarts, integer=True, minimum=1)
    if curve_attack not in ("pgd", "fgsm"):
        raise ValueError(f"curve_attack must be 'pgd' or 'fgsm', got {curve_attack!r}")
    eps_curve = sorted({_attacks.check_number("eps_curve value", e) for e in (eps_curve or ())})
    specs = _check_specs(default_attacks(restarts) if attacks is None else list(attacks))
    images, labels = prepare_data(images, labels)
    device, dtype = model_device_dtype(model, device)
    ctx = dict(batch_size=batch_size, device=device, dtype=dtype, seed=seed, moe=is_moe(model))
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    if preset is not None and preset not in preset_mod.PRESETS:
        raise ValueError(f"preset: expected None or one of {tuple(preset_mod.PRESETS)}, got {preset!r}")
    eps = next((s.eps for s in specs if s.kind == "pgd"), DEFAULT_EPS)
    bar = Progress(_batch_count(images.shape[0], batch_size, specs, eps_curve, sanity)
                   + preset_mod.stage_count(preset), progress)
    try:
        with eval_mode(model):
            results = {s.name: evaluate_spec(model, s, images, labels, progress=bar, **ctx) for s in specs}
            curve = [_curve_point(evaluate_spec(model, curve_spec(curve_attack, eps, curve_steps), images, labels,
                                                progress=bar, **ctx)) for eps in eps_curve]
            robust = preset_mod.run(model, images, labels, preset, eps, seed, batch_size, device, dtype, bar) \
                if preset else None
            checks = run_sanity(model, images, labels, bar, results, curve, curve_steps, specs, preset=robust,
                                eps=eps, **ctx) if sanity else {"all_passed": None, "skipped": True, "checks": [],
                                                                "failed": []}
            gate_report = _gate_report(model, images, labels, ctx) if gate and ctx["moe"] else None
    finally:
        bar.close()
    settings = {"attacks": [asdict(s) for s in specs], "batch_size": batch_size, "device": str(device),
                "dtype": str(dtype).replace("torch.", ""), "eps_curve": eps_curve, "curve_attack": curve_attack,
                "curve_steps": curve_steps, "restarts": restarts, "seed": seed, "sanity": sanity, "preset": preset}
    report = _report(model, images, results, curve, checks, settings, started, ctx)
    report["gate"], report["preset"] = gate_report, robust
    report["pgd_gap"] = preset_mod.gap_statement(results, robust)
    report["wall_time_s"] = time.perf_counter() - t0
    _warn_failed(checks)
    return report


def _check_specs(specs):
    for s in specs:
        if not isinstance(s, AttackSpec):
            raise ValueError(f"attacks: expected AttackSpec entries, got {type(s).__name__}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks: names must be unique, got {names}")
    return specs


def _batch_count(n, batch_size, specs, eps_curve, sanity):
    n_batches = -(-n // batch_size)
    n_sub_batches = -(-min(n, SANITY_THRESHOLDS["sanity_batches"] * batch_size) // batch_size)
    sanity_evals = 3 + (0 if fgsm_pgd_pair(specs) else 2)  # attack runs on the subset: (b), (c), (d)
    return n_batches * (len(specs) + len(eps_curve)) + (sanity_evals * n_sub_batches if sanity else 0)


def _curve_point(r):
    return {k: r[k] for k in ("eps", "alpha", "steps", "accuracy", "correct", "total", "ci95")}


def _gate_report(model, images, labels, ctx):
    from .gate import gate_diagnostics
    return gate_diagnostics(model, images, labels, batch_size=ctx["batch_size"], device=ctx["device"],
                            seed=ctx["seed"])


def _report(model, images, results, curve, checks, settings, started, ctx):
    moe = ctx["moe"]
    return {
        "model": {"class": type(model).__name__,
                  "config": model.config() if hasattr(model, "config") and callable(model.config) else None,
                  "roles": list(model.roles) if moe else None,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "data": {"images": images.shape[0], "shape": list(images.shape[1:]),
                 "dtype": str(images.dtype).replace("torch.", "")},
        "attacks": results,
        "curve": {"attack": settings["curve_attack"],
                  "steps": settings["curve_steps"] if settings["curve_attack"] == "pgd" else 1,
                  "alpha_rule": "2.5 * eps / steps" if settings["curve_attack"] == "pgd" else None,
                  "random_start": settings["curve_attack"] == "pgd", "points": curve},
        "sanity": checks,
        "settings": settings,
        "environment": environment(ctx["device"]),
        "timestamp": started.isoformat(timespec="seconds"),
    }


def _warn_failed(checks):
    if checks.get("all_passed") is False:
        failed = [c for c in checks["checks"] if not c["passed"]]
        warnings.warn(f"robustness: {len(failed)} sanity check(s) FAILED, the reported accuracies may be inflated "
                      "by gradient masking: " + "; ".join(f"{c['name']}: {c['message']}" for c in failed),
                      GradientMaskingWarning, stacklevel=3)
