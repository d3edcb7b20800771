"""Honest white-box robustness evaluation: accuracies, eps curve, gradient-masking sanity checks.

``robustness(model, images, labels)`` runs clean / FGSM 8/255 / PGD-20 (alpha 2/255, random
start) by default, an accuracy-versus-eps PGD curve, and, with every evaluation, the sanity
checks below (in the spirit of auto-attack's ``checks.py``). ``write_report`` writes the result
as JSON and as a Markdown report with tables a paper can use.

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
      probabilities (cross-entropy on probabilities flattens the gradients).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import attacks as _attacks
from .attacks import ATTACK_KINDS, eval_mode
from .moe import FastSoftMoE, MoEOutput, ReferenceSoftMoE
from .reporting import atomic_write_text, hardware_info, json_safe

__all__ = ["robustness", "write_report", "AttackSpec", "default_attacks", "GradientMaskingWarning",
           "SANITY_THRESHOLDS", "DEFAULT_EPS_CURVE"]

DEFAULT_EPS_CURVE = (0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
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
        object.__setattr__(self, "eps", _attacks._check_number("AttackSpec.eps", self.eps))
        object.__setattr__(self, "alpha", _attacks._check_number("AttackSpec.alpha", self.alpha))
        object.__setattr__(self, "steps", _attacks._check_number("AttackSpec.steps", self.steps, integer=True))
        object.__setattr__(self, "restarts",
                           _attacks._check_number("AttackSpec.restarts", self.restarts, integer=True, minimum=1))
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
            AttackSpec("fgsm", "fgsm", eps=8 / 255),
            AttackSpec("pgd20", "pgd", eps=8 / 255, alpha=2 / 255, steps=20, random_start=True, restarts=restarts)]


def _curve_spec(kind, eps, steps):
    # Madry et al.'s rule: alpha = 2.5 * eps / steps (2/255 for eps 8/255 and 10 steps).
    alpha = 2.5 * eps / steps if steps else 0.0
    return AttackSpec(f"{kind}@{eps:.6g}", kind, eps=eps, alpha=alpha, steps=steps, random_start=True)


# ----------------------------------------------------------------------------- helpers
def _is_moe(model) -> bool:
    return isinstance(model, (FastSoftMoE, ReferenceSoftMoE))


def _model_device_dtype(model, device):
    p = next(iter(model.parameters()), None)
    if device is None:
        device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.device(device), dtype


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _prepare_data(images, labels):
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images: expected a torch.Tensor [N,C,H,W] (uint8 or float in [0, 1]), "
                         f"got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images: expected [N,C,H,W], got rank {images.dim()} shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        pass
    elif images.is_floating_point():
        _attacks._check_images(images, name="images")
    else:
        raise ValueError(f"images: expected uint8 (0..255) or float in [0, 1], got dtype {images.dtype}")
    labels = _attacks._check_labels(labels, [(images.shape[0],)], "cpu", name="labels")
    if images.shape[0] == 0:
        raise ValueError("images: expected at least one image, got N = 0")
    return images, labels


def _to_device(images, device, dtype):
    if images.dtype == torch.uint8:
        return images.to(device, non_blocking=True).to(dtype).div_(255)
    return images.to(device=device, dtype=dtype, non_blocking=True)


def _forward(model, x, moe):
    """No-grad eval forward -> (logits [B,K], gate weights [B,E] or None)."""
    with torch.no_grad():
        if moe:
            out = model(x, return_details=True)
            if isinstance(out, MoEOutput):
                return out.logits, out.gate_weights
            return out[0], out[2]
        return _attacks._logits(model(x)), None


def _tolerance(n):
    return max(1.0 / n, SANITY_THRESHOLDS["noise_fraction"]) if n else 0.0


def _check(name, passed, measured, threshold, message, skipped=False):
    return {"name": name, "passed": bool(passed), "skipped": bool(skipped), "measured": measured,
            "threshold": threshold, "message": message}


class _Progress:
    def __init__(self, total, enabled):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="robustness", unit="batch")

    def update(self, label):
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _evaluate_spec(model, spec, images, labels, batch_size, device, dtype, seed, moe, progress, limit=None):
    """Accuracy (and gate weights, per-class counts, throughput) of one attack over the data."""
    n = images.shape[0] if limit is None else min(limit, images.shape[0])
    gen = _generator(device, seed)
    correct = 0
    class_correct = class_total = gate_sum = None
    seconds = 0.0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = _to_device(images[start:stop], device, dtype)
        y = labels[start:stop].to(device)
        _sync(device)
        t0 = time.perf_counter()
        x_adv = spec.run(model, x, y, generator=gen)
        logits, weights = _forward(model, x_adv, moe)
        _sync(device)
        seconds += time.perf_counter() - t0
        k = logits.shape[-1]
        _attacks._check_label_range(y, k, name="labels")
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
        "accuracy": correct / n, "correct": correct, "total": n,
        "per_class_accuracy": per_class,
        "per_class_total": [int(t) for t in class_total],
        "gate_weights": None if gate_sum is None else (gate_sum / n).tolist(),
        "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None,
    }


# ----------------------------------------------------------------------------- sanity checks
def _input_gradient_check(model, images, labels, batch_size, device, dtype, n):
    zero = 0
    finite = True
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = _to_device(images[start:stop], device, dtype)
        y = labels[start:stop].to(device)
        # Sum, not mean, of the per-image losses: each image's gradient is its own.
        grad = _attacks._input_grad(model, x, lambda out: F.cross_entropy(_attacks._logits(out), y, reduction="sum"))
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
        x = _to_device(images[start:min(start + batch_size, n)], device, dtype)
        a, _ = _forward(model, x, moe)
        b, _ = _forward(model, x, moe)
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


def _fgsm_pgd_pair(specs):
    """The first (FGSM, PGD) pair of specs with the same eps, or None."""
    return next(((f, p) for p in specs if p.kind == "pgd" for f in specs if f.kind == "fgsm" and f.eps == p.eps), None)


def _run_sanity(model, images, labels, batch_size, device, dtype, seed, moe, progress, results, curve, curve_steps,
                specs):
    n = min(images.shape[0], SANITY_THRESHOLDS["sanity_batches"] * batch_size)
    tol_sub = _tolerance(n)
    checks = []

    # (a) curve monotone in eps (full data, already computed).
    if len(curve) >= 2:
        tol = _tolerance(curve[0]["total"])
        rises = [(p["eps"], q["eps"], q["accuracy"] - p["accuracy"]) for p, q in zip(curve, curve[1:])
                 if q["accuracy"] > p["accuracy"] + tol]
        checks.append(_check(
            "curve_monotone", not rises,
            {"eps": [p["eps"] for p in curve], "accuracy": [p["accuracy"] for p in curve]},
            {"max_rise": tol},
            "accuracy is non-increasing in eps (within noise)" if not rises else
            "accuracy RISES with eps: " + ", ".join(f"{a:.4g} -> {b:.4g}: +{d:.2%}" for a, b, d in rises)
            + " (a stronger attack should never help the defender)"))
    else:
        checks.append(_check("curve_monotone", True, None, None, "skipped: fewer than 2 curve points", skipped=True))

    # (b) PGD at a huge eps must win.
    big = SANITY_THRESHOLDS["large_eps"]
    steps = max(curve_steps, 1)
    r = _evaluate_spec(model, _curve_spec("pgd", big, steps), images, labels, batch_size, device, dtype, seed, moe,
                       progress, limit=n)
    limit = SANITY_THRESHOLDS["large_eps_max_accuracy"]
    checks.append(_check(
        "large_eps_pgd", r["accuracy"] <= limit, {"eps": big, "steps": steps, "accuracy": r["accuracy"],
                                                  "correct": r["correct"], "total": r["total"]},
        {"max_accuracy": limit},
        f"PGD-{steps} at eps {big} leaves {r['accuracy']:.2%} accuracy"
        + ("" if r["accuracy"] <= limit else f" (> {limit:.0%}): the attack fails where it cannot fail; "
                                             "gradients are masked or obfuscated")))

    # (c) PGD not weaker than FGSM at the same eps: reuse the full-data results when both exist.
    pgd_specs = [s for s in specs if s.kind == "pgd"]
    check_eps = pgd_specs[0].eps if pgd_specs else 8 / 255
    pair = _fgsm_pgd_pair(specs)
    if pair is not None:
        f_res, p_res = results[pair[0].name], results[pair[1].name]
    else:
        f_res = _evaluate_spec(model, AttackSpec("fgsm", "fgsm", eps=check_eps), images, labels, batch_size, device,
                               dtype, seed, moe, progress, limit=n)
        p_res = _evaluate_spec(model, _curve_spec("pgd", check_eps, steps), images, labels, batch_size, device, dtype,
                               seed, moe, progress, limit=n)
    tol = _tolerance(p_res["total"])
    ok = p_res["accuracy"] <= f_res["accuracy"] + tol
    checks.append(_check(
        "pgd_vs_fgsm", ok, {"eps": p_res["eps"], "pgd": p_res["name"], "pgd_accuracy": p_res["accuracy"],
                            "fgsm_accuracy": f_res["accuracy"], "total": p_res["total"]},
        {"max_excess": tol},
        f"PGD {p_res['accuracy']:.2%} vs FGSM {f_res['accuracy']:.2%} at eps {p_res['eps']:.4g}"
        + ("" if ok else ": the iterative attack is WEAKER than one step (gradient masking / bad step size?)")))

    # (d) more steps never help the defender (same alpha, same random start).
    alpha = 2.5 * check_eps / steps
    one = _evaluate_spec(model, AttackSpec(f"pgd{steps}", "pgd", check_eps, alpha, steps), images, labels, batch_size,
                         device, dtype, seed, moe, progress, limit=n)
    two = _evaluate_spec(model, AttackSpec(f"pgd{2 * steps}", "pgd", check_eps, alpha, 2 * steps), images, labels,
                         batch_size, device, dtype, seed, moe, progress, limit=n)
    ok = two["accuracy"] <= one["accuracy"] + tol_sub
    checks.append(_check(
        "more_steps", ok, {"eps": check_eps, "alpha": alpha, f"pgd{steps}_accuracy": one["accuracy"],
                           f"pgd{2 * steps}_accuracy": two["accuracy"], "total": n},
        {"max_excess": tol_sub},
        f"PGD-{steps} {one['accuracy']:.2%} vs PGD-{2 * steps} {two['accuracy']:.2%}"
        + ("" if ok else ": more attack steps HELP the defender (gradient masking?)")))

    # (e)-(g) gradients, determinism, output type.
    checks.append(_input_gradient_check(model, images, labels, batch_size, device, dtype, n))
    checks.extend(_determinism_and_output_checks(model, images, labels, batch_size, device, dtype, n, moe))
    return {"all_passed": all(c["passed"] for c in checks), "subset_size": n,
            "failed": [c["name"] for c in checks if not c["passed"]],
            "thresholds": dict(SANITY_THRESHOLDS), "checks": checks}


# ----------------------------------------------------------------------------- environment
def _versions():
    import fastmoe_adv

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "fastmoe_adv": fastmoe_adv.__version__}


# ----------------------------------------------------------------------------- entry point
def robustness(model, images, labels, attacks=None, batch_size=256, device=None, eps_curve=DEFAULT_EPS_CURVE,
               curve_attack="pgd", curve_steps=10, restarts=1, seed=0, progress=True, sanity=True) -> dict:
    """White-box robustness of ``model`` on (images, labels), with gradient-masking sanity checks.

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K] (a ``FastSoftMoE`` /
            ``ReferenceSoftMoE`` also gets its mean gate weights reported per attack).
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
        progress: tqdm bar over batches (only on a terminal).
        sanity: run the gradient-masking sanity checks (see the module docstring).
    Returns:
        the report dict (see ``write_report``).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    batch_size = _attacks._check_number("batch_size", batch_size, integer=True, minimum=1)
    curve_steps = _attacks._check_number("curve_steps", curve_steps, integer=True, minimum=1)
    restarts = _attacks._check_number("restarts", restarts, integer=True, minimum=1)
    if curve_attack not in ("pgd", "fgsm"):
        raise ValueError(f"curve_attack must be 'pgd' or 'fgsm', got {curve_attack!r}")
    eps_curve = sorted({_attacks._check_number("eps_curve value", e) for e in (eps_curve or ())})
    specs = default_attacks(restarts) if attacks is None else list(attacks)
    for s in specs:
        if not isinstance(s, AttackSpec):
            raise ValueError(f"attacks: expected AttackSpec entries, got {type(s).__name__}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks: names must be unique, got {names}")
    images, labels = _prepare_data(images, labels)
    device, dtype = _model_device_dtype(model, device)
    moe = _is_moe(model)
    n = images.shape[0]
    n_batches = -(-n // batch_size)
    n_sub_batches = -(-min(n, SANITY_THRESHOLDS["sanity_batches"] * batch_size) // batch_size)
    sanity_evals = 3 + (0 if _fgsm_pgd_pair(specs) else 2)  # attack runs on the subset: (b), (c), (d)
    total = n_batches * (len(specs) + len(eps_curve)) + (sanity_evals * n_sub_batches if sanity else 0)
    bar = _Progress(total, progress)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        with eval_mode(model):
            results = {}
            for s in specs:
                results[s.name] = _evaluate_spec(model, s, images, labels, batch_size, device, dtype, seed, moe, bar)
            curve = []
            for eps in eps_curve:
                r = _evaluate_spec(model, _curve_spec(curve_attack, eps, curve_steps), images, labels, batch_size,
                                   device, dtype, seed, moe, bar)
                curve.append({k: r[k] for k in ("eps", "alpha", "steps", "accuracy", "correct", "total")})
            checks = None
            if sanity:
                checks = _run_sanity(model, images, labels, batch_size, device, dtype, seed, moe, bar, results,
                                     curve, curve_steps, specs)
    finally:
        bar.close()
    report = {
        "model": {"class": type(model).__name__,
                  "config": model.config() if hasattr(model, "config") and callable(model.config) else None,
                  "roles": list(model.roles) if moe else None,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "data": {"images": n, "shape": list(images.shape[1:]), "dtype": str(images.dtype).replace("torch.", "")},
        "attacks": results,
        "curve": {"attack": curve_attack, "steps": curve_steps if curve_attack == "pgd" else 1,
                  "alpha_rule": "2.5 * eps / steps" if curve_attack == "pgd" else None,
                  "random_start": curve_attack == "pgd", "points": curve},
        "sanity": checks if sanity else {"all_passed": None, "skipped": True, "checks": [], "failed": []},
        "settings": {"attacks": [asdict(s) for s in specs], "batch_size": batch_size, "device": str(device),
                     "dtype": str(dtype).replace("torch.", ""), "eps_curve": eps_curve, "curve_attack": curve_attack,
                     "curve_steps": curve_steps, "restarts": restarts, "seed": seed, "sanity": sanity},
        "versions": _versions(),
        "hardware": hardware_info(device),
        "timestamp": started.isoformat(timespec="seconds"),
    }
    if sanity and not checks["all_passed"]:
        failed = [c for c in checks["checks"] if not c["passed"]]
        warnings.warn(f"robustness: {len(failed)} sanity check(s) FAILED, the reported accuracies may be inflated "
                      "by gradient masking: " + "; ".join(f"{c['name']}: {c['message']}" for c in failed),
                      GradientMaskingWarning, stacklevel=2)
    return report


# ----------------------------------------------------------------------------- report files
def _fmt_eps(eps):
    if eps is None:
        return "-"
    if eps == 0:
        return "0"
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


def _fmt_acc(acc):
    return "-" if acc is None else f"{100 * acc:.2f}%"


def _fmt_value(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(report) -> str:
    lines = [f"# Robustness report: {report['model']['class']}", ""]
    sanity = report.get("sanity") or {}
    checks = sanity.get("checks") or []
    failed = [c for c in checks if not c["passed"]]
    if failed:
        lines += [f"> **WARNING: {len(failed)} of {len(checks)} sanity checks FAILED. The accuracies below may be "
                  "inflated by gradient masking; do not report them without investigating.**", ">"]
        lines += [f"> - **{c['name']}**: {_cell(c['message'])}" for c in failed]
        lines.append("")
    elif checks:
        lines += [f"All {len(checks)} gradient-masking sanity checks passed "
                  f"(on the first {sanity.get('subset_size')} images; see below).", ""]
    else:
        lines += ["Sanity checks were not run.", ""]

    data = report["data"]
    lines += [f"{data['images']} images of shape {'x'.join(map(str, data['shape']))}, L-inf threat model, "
              "pixel scale [0, 1].", "", "## Accuracy", "",
              "| attack | eps | steps | accuracy | correct/total |", "|---|---|---|---|---|"]
    for r in report["attacks"].values():
        steps = "-" if r["kind"] == "clean" else str(r["steps"])
        extra = ""
        if r["kind"] == "pgd":
            extra = f" (alpha {_fmt_eps(r['alpha'])}{', random start' if r['random_start'] else ''}"
            extra += f", {r['restarts']} restarts)" if r["restarts"] > 1 else ")"
        eps = "-" if r["kind"] == "clean" else _fmt_eps(r["eps"])
        lines.append(f"| {_cell(r['name'] + extra)} | {eps} | {steps} | {_fmt_acc(r['accuracy'])} | "
                     f"{r['correct']}/{r['total']} |")

    curve = report.get("curve") or {}
    if curve.get("points"):
        name = f"PGD-{curve['steps']}" if curve["attack"] == "pgd" else "FGSM"
        rule = f", alpha = {curve['alpha_rule']}, random start" if curve["attack"] == "pgd" else ""
        lines += ["", f"## Accuracy versus eps ({name}{rule})", "", "| eps | accuracy | correct/total |",
                  "|---|---|---|"]
        lines += [f"| {_fmt_eps(p['eps'])} | {_fmt_acc(p['accuracy'])} | {p['correct']}/{p['total']} |"
                  for p in curve["points"]]

    gated = [r for r in report["attacks"].values() if r.get("gate_weights")]
    if gated:
        roles = report["model"].get("roles") or [""] * len(gated[0]["gate_weights"])
        heads = [f"e{i} ({r})" if r else f"e{i}" for i, r in enumerate(roles)]
        lines += ["", "## Mean gate weight per expert", "", "| attack | " + " | ".join(heads) + " |",
                  "|---|" + "---|" * len(heads)]
        lines += [f"| {_cell(r['name'])} | " + " | ".join(f"{w:.3f}" for w in r["gate_weights"]) + " |" for r in gated]

    lines += ["", "## Throughput", "", "| attack | images/s | seconds |", "|---|---|---|"]
    for r in report["attacks"].values():
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        lines.append(f"| {_cell(r['name'])} | {ips} | {r['seconds']:.2f} |")

    if checks:
        lines += ["", f"## Sanity checks (gradient masking; first {sanity.get('subset_size')} images)", "",
                  "| check | result | measured | threshold | message |", "|---|---|---|---|---|"]
        for c in checks:
            result = "SKIP" if c.get("skipped") else ("PASS" if c["passed"] else "**FAIL**")
            lines.append(f"| {c['name']} | {result} | {_cell(_fmt_value(c['measured']))} | "
                         f"{_cell(_fmt_value(c['threshold']))} | {_cell(c['message'])} |")

    lines += ["", "## Settings", ""]
    s = report["settings"]
    lines += [f"- {k}: {_cell(_fmt_value(v))}" for k, v in s.items() if k != "attacks"]
    lines += [f"- model: {report['model']['class']}, {report['model']['parameters']:,} parameters"]
    if report["model"].get("config"):
        lines.append(f"- model config: {_cell(_fmt_value(report['model']['config']))}")
    lines += ["", "## Hardware and versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["hardware"].items()]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    lines += [f"- timestamp (UTC): {report['timestamp']}", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir, name: str = "report") -> tuple:
    """Write ``report`` as ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md`` (atomic writes:
    a temp file then ``os.replace``). Returns ``(json_path, md_path)``."""
    if not isinstance(report, dict) or "attacks" not in report:
        raise ValueError("report: expected the dict returned by robustness()")
    if not isinstance(name, str) or not name or os.sep in name:
        raise ValueError(f"name: expected a file stem without path separators, got {name!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    atomic_write_text(json_path, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, _markdown(report))
    return json_path, md_path
