"""fastmoe_adv: a soft-gated mixture of ResNet-18 experts for adversarial robustness.

The "Divided We Fall" defense (arXiv 2512.20821): nine ResNet-18 experts (one clean, four
FGSM- and four PGD-trained) under a soft gate, trained jointly with randomized adversarial
training. The experts run as one grouped-convolution network; Triton kernels fuse the gated
mixing and the PGD step.
"""
import importlib

from .gate import Gate
from .grouped import GroupedResNet18
from .moe import FastSoftMoE, MoEOutput, ReferenceSoftMoE, default_roles
from .resnet import ResNet18

__version__ = "0.1.0"

_SUBMODULES = ("attacks", "apgd", "square", "presets", "evaluate", "data", "train", "checkpoint", "distributed",
               "kernels", "autotune", "cli", "constants", "errors", "reporting", "demo", "plots", "fold", "graphs")

__all__ = ["ResNet18", "GroupedResNet18", "FastSoftMoE", "ReferenceSoftMoE", "MoEOutput", "Gate",
           "default_roles", "__version__", *_SUBMODULES]


def __getattr__(name):
    # Submodules load on first use (``fm.attacks.pgd``), keeping ``import fastmoe_adv`` light.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastmoe_adv' has no attribute {name!r}")
