"""Named training recipes: TrainConfig defaults that ``--recipe NAME`` applies under the explicit flags.

``paper``: the TrainConfig defaults (the paper's recipe where it states one, README "Design choices the
paper leaves open" elsewhere). ``fast``: nine width-64 experts on real CIFAR-10 in minutes on one H100,
sized so that DWF, its baselines at the same budget and their evaluation fit in 9 minutes together
(``benchmarks/run_gpu_cifar10.sh``); the arithmetic is below.
"""
from __future__ import annotations

__all__ = ["RECIPES", "FAST_ESTIMATE_S", "recipe"]

# ---------------------------------------------------------------------------- the "fast" arithmetic
# Measured on one H100 before this round (torch 2.11, bf16 autocast, channels_last, batch 128):
# a phase-1 step with PGD-10 takes ~223 ms and a phase-2 step with PGD-10 ~295 ms. The grouped phase-1
# attack costs ~14.7 ms per PGD iteration (4 PGD experts in one pass), so a phase-1 step is about
# 76 ms + 14.7 ms * k, with k the LARGEST step count drawn for the 4 PGD experts (the grouped loop runs
# until the last one finishes). A phase-2 attack iteration runs all 9 experts: (295 - 75) / 10 ~ 22 ms,
# so a phase-2 step is about 75 ms + 22 ms * k, k the drawn count (FGSM: 1).
#
# - Data: 16,000 training images + a 2,000-image holdout (an 18,000-image .npz fits the 64 MiB upload
#   limit of the GPU machine): 125 steps per epoch at batch 128.
# - PGD steps scaled by 0.2: {10..50} -> {2, 4, 6, 8, 10}. Phase 1: E[max of 4 draws] = 8.87
#   -> ~206 ms/step; phase 2 with FGSM half the time: E[k] = 0.5 * 1 + 0.5 * 6 = 3.5 -> ~152 ms/step.
# - 4 + 2 epochs: phase 1 500 steps * 206 ms = 103 s, phase 2 250 steps * 152 ms = 38 s: DWF ~141 s.
# - Baselines at the same budget (fastmoe_adv/experiments.py): gate-only phase 2 ~38 s; one PGD-AT
#   ResNet-18 for 9 * (4 + 2) = 54 epochs at batch 9 * 128 = 1152 (same images x experts, same step
#   count 750): a width-64 forward+backward at 1152 images ~ 9 experts at 128 (~24 ms), PGD-6 mean
#   + the update = 7 passes -> ~168 ms/step -> ~126 s. Training in all ~305 s.
# - Evaluation on 2,000 holdout images, 4 arms: PGD-20 (~21 mixture passes of 90 ms per 500 images:
#   ~8 s/arm), the "quick" preset (APGD-CE 20 + APGD-T 3 x 20 on the still-robust points: ~20 s/arm),
#   gate diagnostics (~5 s): ~130 s. Data load, kernel compilation and executor probe: ~40 s.
#   Total ~475 s of the 540 s budget (12% margin for the estimates).
# - onecycle at lr 0.1 (fast convergence in few epochs), Nesterov; the attack strength ramps in over
#   the first 30% of each phase (eps_warmup), which lets few-epoch adversarial training start learning.
# DWF alone fits in 9 minutes with about twice these epochs (e.g. --pretrain-epochs 10 --train-epochs 4,
# ~5.5 min of training) when the baselines are not trained in the same budget.
FAST_ESTIMATE_S = {"phase1": 103, "phase2": 38, "gate_only": 38, "pgd_at": 126, "evaluation": 130, "startup": 40}

RECIPES = {
    "paper": {},
    "fast": dict(holdout=2000, train_size=16000, width=64, num_experts=9, batch_size=128, pretrain_epochs=4,
                 train_epochs=2, lr=0.1, nesterov=True, schedule="onecycle", warmup_frac=0.15, steps_scale=0.2,
                 eps_warmup=0.3, bf16=True, channels_last=True, eval_every=-1, checkpoint_every=500, log_every=25),
}


def recipe(name: str) -> dict:
    """A copy of recipe ``name``'s TrainConfig defaults."""
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {tuple(RECIPES)}, got {name!r}")
    return dict(RECIPES[name])
