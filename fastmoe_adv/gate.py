"""The soft, flat gate: a small CNN on the normalized image -> one logit per expert.

The mixture turns the logits into weights with a softmax (optionally tempered), so every
expert gets a fractional weight. The logits are bounded, ``bound * tanh(raw / bound)``, which
keeps every weight at least ``exp(-2 * bound / temperature) / E`` (about 2e-9 / E for the
default bound 10): no expert is ever switched off, not even by fp32 underflow.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Gate"]


class Gate(nn.Module):
    """``forward(x [B,3,H,W] normalized) -> gate logits [B, E]``."""

    def __init__(self, num_experts: int, hidden: int = 16, logit_bound: float = 10.0):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"gate hidden width must be a positive int, got {hidden!r}")
        if not logit_bound > 0:
            raise ValueError(f"logit_bound must be > 0, got {logit_bound!r}")
        self.num_experts, self.hidden, self.logit_bound = num_experts, hidden, float(logit_bound)
        self.conv1 = nn.Conv2d(3, hidden, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 2 * hidden, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * hidden)
        self.fc = nn.Linear(2 * hidden, num_experts)
        # Start flat: equal weights for every expert until training says otherwise.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        raw = self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        return self.logit_bound * torch.tanh(raw / self.logit_bound)

    def extra_repr(self):
        return f"num_experts={self.num_experts}, hidden={self.hidden}, logit_bound={self.logit_bound}"
