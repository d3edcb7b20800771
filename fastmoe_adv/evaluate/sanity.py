"""Gradient-masking sanity checks, in the spirit of auto-attack's ``checks.py``: signs that an
evaluation's accuracies are overestimates because the attacks could not do their work.

Sanity checks (on the first two batches, except (a) which reads the full curve). A failed check
is never hidden: ``warnings.warn(GradientMaskingWarning)``, a banner at the top of the Markdown
report, and ``report["sanity"]["all_passed"] = False``. "Noise" below is
``max(1 sample, 1%)`` of the images the check ran on.
  (a) curve_monotone: accuracy does not increase with eps along the curve, up to noise;
  (b) large_eps_pgd: PGD at eps = 0.5 (mid-grey is reachable from every image) leaves at most
      10% accuracy; an L-inf ball that large contains images of every class, so higher
      accuracy means the attack is not finding them (masked or obfuscated gradients);
  (c) pgd_vs_fgsm: PGD accuracy <= FGSM accuracy at the same eps, up to noise;
  (d) more_steps: PGD with 2x the steps (same step size, same random start) is not weaker
      than PGD with 1x, up to noise;
  (e) input_gradients: input gradients of the loss are finite, and at most 1% of the images
      have an all-zero gradient;
  (f) deterministic_forward: two eval-mode forwards agree (same predictions, L2-normalized
      logits within 1e-4: auto-attack's rule); a random forward defeats gradient attacks;
  (g) outputs_not_probabilities: the model returns logits or log-probabilities, not
      probabilities (cross-entropy on probabilities flattens the gradients);
  (h) zero_loss_gradients: CE and DLR input gradients at a random start in the eps-ball are
      not all-zero for more than 1% of the images (AutoAttack's check);
  (i) number_of_classes: at least 3 (the DLR losses need them);
  (j) blackbox_vs_whitebox (with a preset holding Square): the black-box attack fools at most
      1% of the points every gradient attack missed (AutoAttack's check);
  (k) convergence: accuracy falls by at most a point between the two largest attack budgets
      (the last two preset stages, else PGD-k vs PGD-2k of check (d)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import attacks as _attacks
from ..constants import DEFAULT_EPS
from .common import forward, to_device

__all__ = ["SANITY_THRESHOLDS", "GradientMaskingWarning", "run_sanity", "fgsm_pgd_pair"]

SANITY_THRESHOLDS = {
    "noise_fraction": 0.01,          # tolerance: max(1 sample, this fraction of the images)
    "large_eps": 0.5,                # eps of check (b)
    "large_eps_max_accuracy": 0.10,  # (b) passes at or below this accuracy
    "max_zero_grad_fraction": 0.01,  # (e) at most this fraction of images with an all-zero gradient
    "determinism_tol": 1e-4,         # (f) max |difference| of L2-normalized logits
    "sanity_batches": 2,             # checks (b)-(g) run on the first this-many batches
}


class GradientMaskingWarning(UserWarning):
    """A robustness sanity check failed: the reported accuracies may be overestimates."""


def _tolerance(n):
    return max(1.0 / n, SANITY_THRESHOLDS["noise_fraction"]) if n else 0.0


def _check(name, passed, measured, threshold, message, skipped=False):
    return {"name": name, "passed": bool(passed), "skipped": bool(skipped), "measured": measured,
            "threshold": threshold, "message": message}


def _input_gradient_check(model, images, labels, batch_size, device, dtype, n):
    zero = 0
    finite = True
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = to_device(images[start:stop], device, dtype)
        y = labels[start:stop].to(device)
        # Sum, not mean, of the per-image losses: each image's gradient is its own.
        grad = _attacks.input_grad(model, x, lambda out: F.cross_entropy(_attacks.logits_of(out), y, reduction="sum"))
        finite &= bool(torch.isfinite(grad).all())
        zero += int((grad.flatten(1) == 0).all(dim=1).sum())
    frac = zero / n
    limit = SANITY_THRESHOLDS["max_zero_grad_fraction"]
    passed = finite and frac <= limit
    msg = (f"{zero}/{n} images have an all-zero input gradient, gradients "
           f"{'finite' if finite else 'NOT finite (NaN/inf)'}")
    if not passed:
        msg += ": gradient-based attacks cannot move these inputs (gradient masking?)"
    return _check("input_gradients", passed, {"zero_grad_fraction": frac, "zero_grad_images": zero,
                                              "all_finite": finite, "images": n},
                  {"max_zero_grad_fraction": limit, "all_finite": True}, msg)


def _determinism_and_output_checks(model, images, labels, batch_size, device, dtype, n, moe):
    same_pred, max_diff, probs_like = True, 0.0, True
    for start in range(0, n, batch_size):
        x = to_device(images[start:min(start + batch_size, n)], device, dtype)
        a, _ = forward(model, x, moe)
        b, _ = forward(model, x, moe)
        a, b = a.double(), b.double()
        same_pred &= bool((a.argmax(-1) == b.argmax(-1)).all())
        na = a / (a.norm(dim=-1, keepdim=True) + 1e-10)
        nb = b / (b.norm(dim=-1, keepdim=True) + 1e-10)
        diff = (na - nb).abs().max().item() if a.numel() else 0.0
        max_diff = max(max_diff, diff if math.isfinite(diff) else math.inf)
        probs_like &= bool(((a >= 0) & (a <= 1)).all()) and bool(((a.sum(-1) - 1).abs() <= 1e-4).all())
    tol = SANITY_THRESHOLDS["determinism_tol"]
    det_ok = same_pred and max_diff <= tol
    det = _check("deterministic_forward", det_ok,
                 {"same_predictions": same_pred, "max_normalized_logit_diff": max_diff},
                 {"max_normalized_logit_diff": tol},
                 "two eval-mode forwards agree" if det_ok else
                 f"two eval-mode forwards differ (max normalized logit difference {max_diff:.3g}, same predictions: "
                 f"{same_pred}): a randomized forward defeats gradient attacks; use EOT or fix the model")
    prob = _check("outputs_not_probabilities", not probs_like, {"rows_are_probabilities": probs_like},
                  {"rows_are_probabilities": False},
                  "outputs are logits / log-probabilities" if not probs_like else
                  "outputs are in [0, 1] and sum to 1 per row: the model returns probabilities; cross-entropy on them "
                  "flattens the gradients (return logits or log-probabilities)")
    return det, prob


def fgsm_pgd_pair(specs):
    """The first (FGSM, PGD) pair of specs with the same eps, or None."""
    return next(((f, p) for p in specs if p.kind == "pgd" for f in specs if f.kind == "fgsm" and f.eps == p.eps), None)


def run_sanity(model, images, labels, progress, results, curve, curve_steps, specs, *, batch_size, device, dtype,
               seed, moe, preset=None, eps=DEFAULT_EPS) -> dict:
    """All checks (a)-(k); ``results``/``curve``/``preset`` are the full-data evaluations already made."""
    from . import preset as preset_mod
    from .robustness import evaluate_spec
    ctx = dict(batch_size=batch_size, device=device, dtype=dtype, seed=seed, moe=moe)
    n = min(images.shape[0], SANITY_THRESHOLDS["sanity_batches"] * batch_size)

    def run(spec):
        return evaluate_spec(model, spec, images, labels, progress=progress, limit=n, **ctx)

    steps = max(curve_steps, 1)
    pgd_specs = [s for s in specs if s.kind == "pgd"]
    check_eps = pgd_specs[0].eps if pgd_specs else DEFAULT_EPS
    checks = [_curve_monotone(curve), _large_eps(run, steps), _pgd_vs_fgsm(run, results, specs, check_eps, steps),
              _more_steps(run, check_eps, steps, n),
              _input_gradient_check(model, images, labels, batch_size, device, dtype, n),
              *_determinism_and_output_checks(model, images, labels, batch_size, device, dtype, n, moe)]
    num_classes = len(next(iter(results.values()))["per_class_total"]) if results else 0
    checks += [preset_mod.zero_loss_gradients(model, images, labels, eps, n, batch_size, device, dtype, seed, _check),
               preset_mod.classes_check(num_classes, _check)]
    if preset is not None:
        checks.append(preset_mod.blackbox_check(preset, _check))
    checks.append(preset_mod.convergence_check(preset, checks[3], _check))
    return {"all_passed": all(c["passed"] for c in checks), "subset_size": n,
            "failed": [c["name"] for c in checks if not c["passed"]],
            "thresholds": dict(SANITY_THRESHOLDS), "checks": checks}


def _curve_monotone(curve):
    """(a) accuracy does not rise with eps along the full-data curve."""
    if len(curve) < 2:
        return _check("curve_monotone", True, None, None, "skipped: fewer than 2 curve points", skipped=True)
    tol = _tolerance(curve[0]["total"])
    rises = [(p["eps"], q["eps"], q["accuracy"] - p["accuracy"]) for p, q in zip(curve, curve[1:])
             if q["accuracy"] > p["accuracy"] + tol]
    return _check(
        "curve_monotone", not rises,
        {"eps": [p["eps"] for p in curve], "accuracy": [p["accuracy"] for p in curve]}, {"max_rise": tol},
        "accuracy is non-increasing in eps (within noise)" if not rises else
        "accuracy RISES with eps: " + ", ".join(f"{a:.4g} -> {b:.4g}: +{d:.2%}" for a, b, d in rises)
        + " (a stronger attack should never help the defender)")


def _large_eps(run, steps):
    """(b) PGD at a huge eps must win."""
    from .robustness import curve_spec
    big, limit = SANITY_THRESHOLDS["large_eps"], SANITY_THRESHOLDS["large_eps_max_accuracy"]
    r = run(curve_spec("pgd", big, steps))
    return _check(
        "large_eps_pgd", r["accuracy"] <= limit, {"eps": big, "steps": steps, "accuracy": r["accuracy"],
                                                  "correct": r["correct"], "total": r["total"]},
        {"max_accuracy": limit},
        f"PGD-{steps} at eps {big} leaves {r['accuracy']:.2%} accuracy"
        + ("" if r["accuracy"] <= limit else f" (> {limit:.0%}): the attack fails where it cannot fail; "
                                             "gradients are masked or obfuscated"))


def _pgd_vs_fgsm(run, results, specs, check_eps, steps):
    """(c) PGD not weaker than FGSM at the same eps (the full-data results when both exist)."""
    from .robustness import AttackSpec, curve_spec
    pair = fgsm_pgd_pair(specs)
    if pair is not None:
        f_res, p_res = results[pair[0].name], results[pair[1].name]
    else:
        f_res, p_res = run(AttackSpec("fgsm", "fgsm", eps=check_eps)), run(curve_spec("pgd", check_eps, steps))
    tol = _tolerance(p_res["total"])
    ok = p_res["accuracy"] <= f_res["accuracy"] + tol
    return _check(
        "pgd_vs_fgsm", ok, {"eps": p_res["eps"], "pgd": p_res["name"], "pgd_accuracy": p_res["accuracy"],
                            "fgsm_accuracy": f_res["accuracy"], "total": p_res["total"]},
        {"max_excess": tol},
        f"PGD {p_res['accuracy']:.2%} vs FGSM {f_res['accuracy']:.2%} at eps {p_res['eps']:.4g}"
        + ("" if ok else ": the iterative attack is WEAKER than one step (gradient masking / bad step size?)"))


def _more_steps(run, check_eps, steps, n):
    """(d) more steps never help the defender (same alpha, same random start)."""
    from .robustness import AttackSpec
    alpha, tol = 2.5 * check_eps / steps, _tolerance(n)
    one = run(AttackSpec(f"pgd{steps}", "pgd", check_eps, alpha, steps))
    two = run(AttackSpec(f"pgd{2 * steps}", "pgd", check_eps, alpha, 2 * steps))
    ok = two["accuracy"] <= one["accuracy"] + tol
    return _check(
        "more_steps", ok, {"eps": check_eps, "alpha": alpha, f"pgd{steps}_accuracy": one["accuracy"],
                           f"pgd{2 * steps}_accuracy": two["accuracy"], "total": n},
        {"max_excess": tol},
        f"PGD-{steps} {one['accuracy']:.2%} vs PGD-{2 * steps} {two['accuracy']:.2%}"
        + ("" if ok else ": more attack steps HELP the defender (gradient masking?)"))
