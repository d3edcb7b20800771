"""Names and numbers shared across the package: one home for each fact.

Everything here is plain data (no torch import), so any module may import it without creating a
cycle. Values that the paper fixes cite it; the rest are this library's defaults.
"""
from __future__ import annotations

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "MIX_MODES", "BACKENDS", "ROLES", "ATTACK_KINDS", "EXECUTORS",
           "DEFAULT_EPS", "DEFAULT_ALPHA", "DEFAULT_FGSM_EPS_SET", "DEFAULT_PGD_STEPS_SET", "MAX_EXPERTS",
           "MAX_CLASSES"]

# Per-channel statistics of the CIFAR-10 training split (pixel scale [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

MIX_MODES = ("logits", "probs")             # weighted sum of expert logits / log of mixed probabilities
BACKENDS = ("auto", "triton", "torch")      # kernel backends (fastmoe_adv.kernels.dispatch)
EXECUTORS = ("grouped", "loop", "auto")     # how GroupedResNet18 runs its experts
ROLES = ("clean", "fgsm", "pgd")            # expert roles, in the order the default layout uses
ATTACK_KINDS = ROLES                        # the attacks that train and evaluate them

# L-inf threat model of the PGD experts and of evaluation (pixel scale [0, 1]).
DEFAULT_EPS = 8 / 255
DEFAULT_ALPHA = 2 / 255
# Expert pre-training (arXiv 2512.20821): FGSM eps drawn per batch from {0.01, ..., 0.09},
# PGD iterations drawn per batch from {10, 20, 30, 40, 50}.
DEFAULT_FGSM_EPS_SET = tuple(round(0.01 * i, 2) for i in range(1, 10))
DEFAULT_PGD_STEPS_SET = (10, 20, 30, 40, 50)

# Limits of the fused gated_mix kernel (all experts of a row in one tile; classes looped in chunks).
MAX_EXPERTS = 64
MAX_CLASSES = 1024
