"""The AutoAttack-grade part of an evaluation: a preset (presets.py) on every image, the
per-stage worst case with intervals, how much PGD-20 overstates robustness, and the checks that
only a preset can run (a black-box attack beating the white-box ones, convergence).

Preset names: ``quick`` (APGD-CE + APGD-T, 20 iterations: CPU), ``standard`` (APGD-CE, APGD-T,
Square: AutoAttack's standard sequence), ``full`` (standard plus APGD on the mixture-aware
``moe_gate`` loss: the adaptive attack for this defense).
"""
from __future__ import annotations

import torch

from .. import presets as _presets
from .common import to_device

__all__ = ["PRESETS", "run", "gap_statement", "blackbox_check", "convergence_check"]

PRESETS = {"quick": "quick", "standard": "standard", "full": "adaptive"}
CONVERGENCE_POINTS = 0.01   # a last stage that still lowers accuracy by more than this: not converged


def run(model, images, labels, preset, eps, seed, batch_size, device, dtype, progress=None) -> dict:
    """The preset on all images (attacked in chunks of ``batch_size``); a JSON-ready dict."""
    from .robustness import wilson_interval
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
    x, y = to_device(images, device, dtype), labels.to(device)

    def report_progress(stage, info):
        if progress is not None and info.get("event") == "done":
            progress.update(f"{preset}: {stage}")
    result = _presets.run_preset(model, x, y, preset=PRESETS[preset], eps=eps, seed=seed, batch_size=batch_size,
                                 progress=report_progress)
    out = result.to_dict()
    n = out["n"]
    out["name"] = preset
    out["robust_correct"] = int(result.robust.sum())
    out["ci95"] = wilson_interval(out["robust_correct"], n)
    for stage in out["stages"]:
        stage["ci95"] = wilson_interval(round(stage["robust_accuracy"] * n), n)
    return out


def stage_count(preset) -> int:
    return len(_presets.preset_stages(PRESETS[preset])) if preset in PRESETS else 0


def gap_statement(results: dict, preset: dict) -> dict | None:
    """How much the PGD attacks of the evaluation overstate robust accuracy against the preset."""
    pgd = [r for r in results.values() if r["kind"] == "pgd"]
    if not pgd or preset is None:
        return None
    worst = min(pgd, key=lambda r: r["accuracy"])
    points = 100 * (worst["accuracy"] - preset["robust_accuracy"])
    text = (f"{worst['name']} overstates robust accuracy by {points:.1f} points "
            f"({100 * worst['accuracy']:.1f}% vs {100 * preset['robust_accuracy']:.1f}% under the {preset['name']} "
            f"preset); report the preset's number")
    return {"attack": worst["name"], "attack_accuracy": worst["accuracy"],
            "preset_accuracy": preset["robust_accuracy"], "points": points, "statement": text}


def blackbox_check(preset: dict, check) -> dict:
    """AutoAttack's check: a score-based attack that fools points every gradient attack missed is
    a sign of masked gradients."""
    stages = {s["name"]: s for s in preset["stages"]}
    sq = stages.get("square")
    if sq is None or sq.get("skipped"):
        return check("blackbox_vs_whitebox", True, None, None, "skipped: the preset has no black-box stage",
                     skipped=True)
    limit = max(1, round(0.01 * preset["n"]))
    ok = sq["fooled"] <= limit
    return check("blackbox_vs_whitebox", ok, {"square_fooled": sq["fooled"], "attacked": sq["attacked"]},
                 {"max_fooled": limit},
                 f"Square fooled {sq['fooled']} of the {sq['attacked']} points the gradient attacks left"
                 + ("" if ok else ": a black-box attack beats the white-box ones (gradient masking?)"))


def convergence_check(preset: dict | None, more_steps: dict | None, check) -> dict:
    """Warn when accuracy still falls by more than a point between the two largest budgets: the
    last two cumulative preset stages, else PGD-k vs PGD-2k of the sanity checks."""
    if preset is not None and len([s for s in preset["stages"] if not s.get("skipped")]) >= 2:
        run = [s for s in preset["stages"] if not s.get("skipped")]
        a, b = run[-2], run[-1]
        labels, drop = (f"after {a['name']}", f"after {b['name']}"), a["robust_accuracy"] - b["robust_accuracy"]
        values = (a["robust_accuracy"], b["robust_accuracy"])
    elif more_steps is not None and not more_steps.get("skipped"):
        m = more_steps["measured"]
        (la, va), (lb, vb) = [(k, v) for k, v in m.items() if k.endswith("_accuracy")]
        labels, values, drop = (la, lb), (va, vb), va - vb
    else:
        return check("convergence", True, None, None, "skipped: fewer than two attack budgets", skipped=True)
    ok = drop <= CONVERGENCE_POINTS
    return check("convergence", ok, {labels[0]: values[0], labels[1]: values[1]}, {"max_drop": CONVERGENCE_POINTS},
                 f"accuracy {100 * values[0]:.1f}% {labels[0]} -> {100 * values[1]:.1f}% {labels[1]}"
                 + ("" if ok else ": still falling by more than a point: the attack has not converged, the "
                                  "robust accuracy is an overestimate (more iterations or restarts)"))


def zero_loss_gradients(model, images, labels, eps, n, batch_size, device, dtype, seed, check) -> dict:
    """AutoAttack's check: gradients of CE and DLR at a random start in the eps-ball must not be
    zero (a flat loss surface stops every gradient attack)."""
    from .. import attacks as _attacks
    g = torch.Generator(device=device).manual_seed(int(seed))
    zero = {"ce": 0, "dlr": 0}
    k = None
    for start in range(0, n, batch_size):
        x = to_device(images[start:min(n, start + batch_size)], device, dtype)
        y = labels[start:min(n, start + batch_size)].to(device)
        noise = (torch.rand(x.shape, generator=g, device=device, dtype=x.dtype) * 2 - 1) * eps
        x0 = (x + noise).clamp(0, 1)
        for loss in zero:
            if loss == "dlr" and k is not None and k < 3:
                continue          # DLR is undefined below 3 classes (check number_of_classes says so)
            _, logits, grad = _attacks.loss_and_grad(model, x0, y, loss=loss)
            k = logits.shape[-1]
            zero[loss] += int((grad.flatten(1) == 0).all(dim=1).sum())
    limit = max(1, round(0.01 * n))
    ok = all(v <= limit for v in zero.values())
    return check("zero_loss_gradients", ok, {"ce_zero": zero["ce"], "dlr_zero": zero["dlr"], "images": n,
                                             "classes": k}, {"max_zero": limit},
                 f"all-zero input gradients at the random start: CE {zero['ce']}/{n}, DLR {zero['dlr']}/{n}"
                 + ("" if ok else ": the loss is flat where attacks start (gradient masking?)"))


def classes_check(num_classes: int, check) -> dict:
    """DLR needs at least 3 classes and the targeted DLR of APGD-T at least 4 (AutoAttack's checks;
    presets skip APGD-T below 4 and say so)."""
    ok = num_classes >= 3
    return check("number_of_classes", ok, {"classes": num_classes}, {"min_classes": 3},
                 f"{num_classes} classes" + ("" if ok else ": the DLR loss is undefined below 3 classes (the "
                                                           "targeted DLR of APGD-T below 4): those attacks cannot run"))
