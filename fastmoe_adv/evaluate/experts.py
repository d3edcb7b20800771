"""Quick evaluations used during training and by the demo: every expert as a stand-alone model
(all attacked at once in one grouped pass), and the whole mixture's clean and PGD accuracy."""
from __future__ import annotations

import torch

from .. import attacks as _attacks
from ..constants import DEFAULT_ALPHA, DEFAULT_EPS
from ..moe import FastSoftMoE
from .common import batches, generator, to_device

__all__ = ["expert_robustness", "mixture_robustness"]


@torch.no_grad()
def _correct_per_expert(model, x, y):
    return (model.experts_forward(x).argmax(-1) == y[:, None]).sum(0).cpu()


def expert_robustness(model: FastSoftMoE, images, labels, fgsm_eps: float | None = DEFAULT_EPS,
                      pgd_eps: float = DEFAULT_EPS, pgd_alpha: float = DEFAULT_ALPHA, pgd_steps: int = 20,
                      batch_size: int = 256, device=None, seed: int = 0, random_start: bool = True,
                      graph: bool = False) -> dict:
    """Accuracy of every expert as a stand-alone model (white-box: each attacked against itself,
    all experts in one grouped pass): ``{"clean": [E], "fgsm": [E], "pgd": [E]}`` in [0, 1].
    ``fgsm_eps=None`` / ``pgd_steps=0`` skip that attack; ``graph``: CUDA-graphed attack steps."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = generator(device, seed)
    E = model.num_experts
    plans = {}
    if fgsm_eps is not None:
        plans["fgsm"] = _attacks.ExpertAttackPlan(["fgsm"] * E, [fgsm_eps] * E, [fgsm_eps] * E, [1] * E)
    if pgd_steps:
        plans["pgd"] = _attacks.ExpertAttackPlan(["pgd"] * E, [pgd_eps] * E, [pgd_alpha] * E, [pgd_steps] * E,
                                                 random_start=random_start)
    correct = {k: torch.zeros(E, dtype=torch.long) for k in ("clean", *plans)}
    n = len(labels)
    with _attacks.eval_mode(model):
        for s in batches(n, batch_size):
            x, y = to_device(images[s], device), labels[s].to(device)
            correct["clean"] += _correct_per_expert(model, x, y)
            for kind, plan in plans.items():
                x_adv = _attacks.attack_experts(model, x, y, plan, generator=gen, graph=graph)
                correct[kind] += _correct_per_expert(model, x_adv, y)
    return {k: (v.double() / max(1, n)).tolist() for k, v in correct.items()}


def mixture_robustness(model: FastSoftMoE, images, labels, pgd_eps=DEFAULT_EPS, pgd_alpha=DEFAULT_ALPHA, pgd_steps=20,
                       batch_size=256, device=None, seed=0, gate: bool = False, graph: bool = False) -> dict:
    """Quick held-out check of the whole mixture: clean and PGD accuracy in [0, 1]; with
    ``gate``, the gate's mean weights on clean and PGD inputs and its input dependence;
    ``graph``: CUDA-graphed PGD steps."""
    from .gate import gate_statistics
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = generator(device, seed)
    clean = adv = 0
    weights = {"clean": [], "pgd": []}
    n = len(labels)
    with _attacks.eval_mode(model), torch.no_grad():
        for s in batches(n, batch_size):
            x, y = to_device(images[s], device), labels[s].to(device)
            out = model(x, return_details=True)
            clean += int((out.logits.argmax(-1) == y).sum())
            weights["clean"].append(out.gate_weights.cpu())
            if pgd_steps:
                with torch.enable_grad():
                    xa = _attacks.pgd(model, x, y, pgd_eps, pgd_alpha, pgd_steps, generator=gen, graph=graph)
                out = model(xa, return_details=True)
                adv += int((out.logits.argmax(-1) == y).sum())
                weights["pgd"].append(out.gate_weights.cpu())
    result = {"clean": clean / max(1, n)}
    if pgd_steps:
        result["pgd"] = adv / max(1, n)
    if gate:
        for kind, w in weights.items():
            if w:
                st = gate_statistics(torch.cat(w))
                result[f"gate_{kind}"] = [round(v, 4) for v in st["mean"]]
                result[f"gate_{kind}_input_dependence"] = round(st["input_dependence"], 5)
    return result
