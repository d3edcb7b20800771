"""What the gate actually does: per-expert weights across inputs, their spread and entropy, how
much they depend on the input, how they move under attack and per class, and a warning when
the "soft, input-dependent" gate has collapsed to a constant or starves an expert.

Input dependence is the mean over experts of ``std_b(w[b,e]) / mean_b(w[b,e])`` (the
coefficient of variation across samples): 0 for a gate that ignores its input.
"""
from __future__ import annotations

import math

import torch

from .. import attacks as _attacks
from ..constants import DEFAULT_ALPHA, DEFAULT_EPS
from .common import batches, generator, model_device_dtype, prepare_data, to_device

__all__ = ["gate_diagnostics", "gate_statistics", "gate_markdown", "GATE_THRESHOLDS"]

GATE_THRESHOLDS = {
    "constant_input_dependence": 0.01,   # below this coefficient of variation the gate ignores its input
    "constant_attack_shift": 0.01,       # ... and if no expert's mean weight moves more than this under attack
    "starved_expert_weight": 0.01,       # an expert whose mean weight is below this is effectively off
}


@torch.no_grad()
def _weights(model, x):
    return model(x, return_details=True).gate_weights.double()


def gate_statistics(weights: torch.Tensor) -> dict:
    """Summary of gate weights ``[N, E]`` (rows sum to 1)."""
    w = weights.double()
    mean, std = w.mean(0), w.std(0, unbiased=False)
    entropy = -(w.clamp_min(1e-30).log() * w).sum(1)
    E = w.shape[1]
    return {"mean": mean.tolist(), "std": std.tolist(), "min": w.min(0).values.tolist(),
            "max": w.max(0).values.tolist(), "mean_entropy": float(entropy.mean()),
            "normalized_entropy": float(entropy.mean() / math.log(E)) if E > 1 else 1.0,
            "input_dependence": float((std / mean.clamp_min(1e-30)).mean()), "images": int(w.shape[0])}


def gate_diagnostics(model, images, labels, batch_size=256, device=None, seed=0, limit=512, eps=DEFAULT_EPS,
                     pgd_steps=10) -> dict:
    """Gate statistics on clean inputs, FGSM (``eps``) and PGD-``pgd_steps`` inputs against the
    whole mixture, per-class means on clean inputs, and the warnings of ``GATE_THRESHOLDS``."""
    images, labels = prepare_data(images, labels)
    n = min(limit, images.shape[0]) if limit else images.shape[0]
    device, dtype = model_device_dtype(model, device)
    gen = generator(device, seed)
    kinds = {"clean": [], "fgsm": [], "pgd": []}
    with _attacks.eval_mode(model):
        for s in batches(n, batch_size):
            x, y = to_device(images[s], device, dtype), labels[s].to(device)
            kinds["clean"].append(_weights(model, x).cpu())
            kinds["fgsm"].append(_weights(model, _attacks.fgsm(model, x, y, eps)).cpu())
            x_pgd = _attacks.pgd(model, x, y, eps, DEFAULT_ALPHA, pgd_steps, generator=gen)
            kinds["pgd"].append(_weights(model, x_pgd).cpu())
    stats = {k: gate_statistics(torch.cat(v)) for k, v in kinds.items()}
    clean, y_all = torch.cat(kinds["clean"]), labels[:n]
    per_class = {int(c): clean[y_all == c].mean(0).tolist() for c in torch.unique(y_all)}
    report = {"inputs": stats, "per_class_clean": per_class, "attack": {"eps": eps, "pgd_steps": pgd_steps},
              "thresholds": dict(GATE_THRESHOLDS)}
    report["warnings"] = _warnings(stats, list(getattr(model, "roles", [])))
    return report


def _warnings(stats: dict, roles: list) -> list:
    th = GATE_THRESHOLDS
    clean = stats["clean"]
    shift = max(abs(a - b) for k in ("fgsm", "pgd") for a, b in zip(stats[k]["mean"], clean["mean"]))
    out = []
    if max(s["input_dependence"] for s in stats.values()) < th["constant_input_dependence"] and \
            shift < th["constant_attack_shift"]:
        out.append(f"the gate is effectively constant: its weights vary across inputs by "
                   f"{clean['input_dependence']:.2%} of their mean and move by at most {shift:.3f} under attack; the "
                   "mixture is a fixed weighted ensemble, not an input-dependent one")
    for e, w in enumerate(clean["mean"]):
        if w < th["starved_expert_weight"]:
            role = f" ({roles[e]})" if e < len(roles) else ""
            out.append(f"expert e{e}{role} gets {w:.2%} of the gate weight on clean inputs (< "
                       f"{th['starved_expert_weight']:.0%}): it barely contributes")
    return out


def gate_markdown(gate: dict, roles: list) -> list:
    """Markdown lines: one row per input kind, per-expert mean ± spread, entropy, input dependence."""
    E = len(gate["inputs"]["clean"]["mean"])
    heads = [f"e{i} ({roles[i]})" if i < len(roles) and roles[i] else f"e{i}" for i in range(E)]
    lines = ["## Gate diagnostics", "",
             f"Gate weights on {gate['inputs']['clean']['images']} images: mean ± std across inputs; entropy "
             "normalized by log E (1 = uniform); input dependence = mean coefficient of variation across inputs "
             f"(0 = the gate ignores its input). Attacks: FGSM and PGD-{gate['attack']['pgd_steps']} at eps "
             f"{gate['attack']['eps']:.4g} against the whole mixture.", "",
             "| inputs | " + " | ".join(heads) + " | entropy | input dependence |",
             "|---|" + "---|" * (E + 2)]
    for kind, s in gate["inputs"].items():
        cells = " | ".join(f"{m:.3f} ± {d:.3f}" for m, d in zip(s["mean"], s["std"]))
        lines.append(f"| {kind} | {cells} | {s['normalized_entropy']:.3f} | {s['input_dependence']:.4f} |")
    lines += ["", "| class (clean) | " + " | ".join(heads) + " |", "|---|" + "---|" * E]
    lines += [f"| {c} | " + " | ".join(f"{w:.3f}" for w in ws) + " |" for c, ws in gate["per_class_clean"].items()]
    return lines
