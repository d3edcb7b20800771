"""Fused ops for fastmoe_adv (installed as ``fastmoe_adv.kernels``).

Each op has a Triton implementation and a plain-PyTorch twin with the same signature
(minus ``backend``); ``use_triton(tensor, backend)`` is the one place that picks between them.
Triton is optional: without it, ``backend="auto"`` always runs the twins.
"""
from .batchnorm import batch_norm_act, batch_norm_act_torch
from .dispatch import interpreter_enabled, triton_available, use_triton
from .gated_mix import gated_mix, gated_mix_torch
from .pgd_step import fgsm_step, pgd_random_start, pgd_random_start_torch, pgd_step, pgd_step_, pgd_step_torch

__all__ = [
    "batch_norm_act",
    "batch_norm_act_torch",
    "gated_mix",
    "gated_mix_torch",
    "pgd_step",
    "pgd_step_",
    "pgd_step_torch",
    "pgd_random_start",
    "pgd_random_start_torch",
    "fgsm_step",
    "use_triton",
    "triton_available",
    "interpreter_enabled",
]
