"""Fused ops for fastmoe_adv (installed as ``fastmoe_adv.kernels``).

PLACEHOLDER: torch twins only; the Triton kernels and dispatchers replace this file.
"""
import torch

__all__ = ["gated_mix", "pgd_step"]


def gated_mix(expert_logits, gate_logits, mode="logits", temperature=1.0, return_weights=False, backend="auto"):
    w = torch.softmax(gate_logits.float() / temperature, dim=-1)
    if mode == "logits":
        out = torch.einsum("be,bek->bk", w, expert_logits.float())
    else:
        out = torch.logsumexp(torch.log_softmax(expert_logits.float(), -1) + torch.log(w).unsqueeze(-1), dim=1)
    out = out.to(expert_logits.dtype)
    return (out, w) if return_weights else out


def pgd_step(x_adv, grad, x_nat, alpha, eps, lo=0.0, hi=1.0, backend="auto"):
    x = x_adv + alpha * torch.sign(grad)
    x = torch.min(torch.max(x, x_nat - eps), x_nat + eps)
    return x.clamp(lo, hi)
