"""The soft mixture of experts: ``FastSoftMoE`` and its readable twin ``ReferenceSoftMoE``.

Both take raw images in [0, 1] (``[B,3,H,W]``), normalize them with the dataset mean/std held
as buffers, run E ResNet-18 experts and a soft gate on the normalized image, and mix:
- ``mix="logits"``: ``sum_e w[b,e] * z[b,e,:]`` (a weighted sum of expert logits);
- ``mix="probs"``: ``log(sum_e w[b,e] * softmax(z[b,e,:]))`` (the log of the mixture of the
  experts' probabilities: cross-entropy on it is the mixture's negative log-likelihood);
with ``w = softmax(gate_logits / temperature)``.

``FastSoftMoE`` runs the experts as one ``GroupedResNet18`` and mixes with the fused
``fastmoe_adv.kernels.gated_mix``; ``ReferenceSoftMoE`` loops over an ``nn.ModuleList`` of
``ResNet18`` and mixes with plain torch ops. They hold the same parameters
(``from_reference`` / ``to_reference``) and compute the same function.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from .gate import Gate
from .grouped import GroupedResNet18, _check_executor, _parse_experts
from .kernels import gated_mix
from .resnet import ResNet18

__all__ = ["FastSoftMoE", "ReferenceSoftMoE", "MoEOutput", "default_roles", "CIFAR10_MEAN", "CIFAR10_STD",
           "MIX_MODES", "BACKENDS", "ROLES"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MIX_MODES = ("logits", "probs")
BACKENDS = ("auto", "triton", "torch")
ROLES = ("clean", "fgsm", "pgd")


class MoEOutput(NamedTuple):
    logits: torch.Tensor          # [B, K] mixed output (log-probabilities when mix="probs")
    expert_logits: torch.Tensor   # [B, E, K]
    gate_weights: torch.Tensor    # [B, E], rows sum to 1, every entry > 0


def default_roles(num_experts: int) -> list[str]:
    """The paper's layout for 9 experts: 1 clean, 4 FGSM, 4 PGD; for other E: 1 clean, then
    the rest split between FGSM and PGD (FGSM gets the extra one)."""
    if num_experts == 1:
        return ["clean"]
    rest = num_experts - 1
    n_fgsm = (rest + 1) // 2
    return ["clean"] + ["fgsm"] * n_fgsm + ["pgd"] * (rest - n_fgsm)


def _check_roles(roles, num_experts) -> list[str]:
    roles = default_roles(num_experts) if roles is None else list(roles)
    if len(roles) != num_experts:
        raise ValueError(f"expected {num_experts} roles (one per expert), got {len(roles)}: {roles}")
    for r in roles:
        if r not in ROLES:
            raise ValueError(f"unknown expert role {r!r}; expected one of {ROLES}")
    seen = []
    for r in roles:
        if not seen or seen[-1] != r:
            if r in seen:
                raise ValueError(f"each role's experts must be contiguous (a channel slice of the grouped model), "
                                 f"got {roles}")
            seen.append(r)
    return roles


def _check_stats(name, value) -> tuple[float, float, float]:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        vals = tuple(float(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of 3 floats (one per RGB channel), got {value!r}") from None
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(vals)}: {vals}")
    if name == "std" and min(vals) <= 0:
        raise ValueError(f"std must be > 0 per channel, got {vals}")
    return vals


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class _SoftMoEBase(nn.Module):
    """What both twins share: configuration, normalization, roles, input checks."""

    def __init__(self, num_experts, num_classes, width, mean, std, mix, temperature, roles, gate_hidden):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        self.num_experts, self.num_classes, self.width = num_experts, num_classes, width
        self.mix = _check_choice("mix", mix, MIX_MODES)
        self.temperature = float(temperature)
        self.roles = _check_roles(roles, num_experts)
        self.gate_hidden = gate_hidden
        self.register_buffer("mean", torch.tensor(_check_stats("mean", mean)).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(_check_stats("std", std)).view(3, 1, 1))
        self.gate = Gate(num_experts, gate_hidden)

    def config(self) -> dict:
        """Constructor arguments (plain values) that rebuild this architecture."""
        return dict(num_experts=self.num_experts, num_classes=self.num_classes, width=self.width,
                    mean=self.mean.flatten().tolist(), std=self.std.flatten().tolist(), mix=self.mix,
                    temperature=self.temperature, roles=list(self.roles), gate_hidden=self.gate_hidden)

    def role_slice(self, role: str) -> slice:
        """The contiguous range of experts that have ``role``."""
        idx = [i for i, r in enumerate(self.roles) if r == role]
        if not idx:
            raise ValueError(f"no expert has role {role!r}; roles are {self.roles}")
        return slice(idx[0], idx[-1] + 1)

    def normalize(self, x):
        # Works for [B,3,H,W] and per-expert [B,E,3,H,W]: mean/std are [3,1,1].
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _check_image(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W] in [0, 1], got shape {tuple(x.shape)}")


class FastSoftMoE(_SoftMoEBase):
    """Soft mixture of E ResNet-18 experts, the experts run as one grouped network.

    Args:
        num_experts, num_classes, width: E, K and the ResNet width (64 is the real model).
        mean, std: dataset normalization (3 values each); inputs are raw [0, 1] pixels.
        mix: ``"logits"`` or ``"probs"`` (see the module docstring).
        backend: mixing kernel, ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA).
        executor: ``"grouped"``, ``"loop"`` or ``"auto"`` (the one measured faster on the device).
        temperature: gate softmax temperature.
        roles: per-expert role list, default ``["clean"] + ["fgsm"] * 4 + ["pgd"] * 4``.
        gate_hidden: width of the gate CNN.
    """

    def __init__(self, num_experts: int = 9, num_classes: int = 10, width: int = 64,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, mix: str = "logits",
                 backend: str = "auto", executor: str = "auto", temperature: float = 1.0,
                 roles: Sequence[str] | None = None, gate_hidden: int = 16):
        super().__init__(num_experts, num_classes, width, mean, std, mix, temperature, roles, gate_hidden)
        self.backend = _check_choice("backend", backend, BACKENDS)
        self.experts = GroupedResNet18(num_experts, num_classes, width, _check_executor(executor))

    @property
    def executor(self) -> str:
        return self.experts.executor

    @executor.setter
    def executor(self, value):
        self.experts.executor = _check_executor(value)

    def forward(self, x, return_details: bool = False):
        self._check_image(x)
        xn = self.normalize(x)
        expert_logits = self.experts(xn)                   # [B, E, K]
        # Under autocast the two may come out in different dtypes; the mix accumulates in fp32 anyway.
        gate_logits = self.gate(xn).to(expert_logits.dtype)  # [B, E]
        logits, weights = gated_mix(expert_logits, gate_logits, mode=self.mix, temperature=self.temperature,
                                    return_weights=True, backend=self.backend)
        if return_details:
            return MoEOutput(logits, expert_logits, weights)
        return logits

    def experts_forward(self, x, experts=None):
        """Raw [0,1] images -> expert logits ``[B, E', K]`` of a contiguous range of experts (a
        slice, range, ``(lo, hi)``, an int or a role name), without the gate. ``x`` is
        ``[B,3,H,W]`` (shared) or ``[B,E',3,H,W]`` (one image per active expert)."""
        if isinstance(experts, str):
            experts = self.role_slice(experts)
        return self.experts(self.normalize(x), experts=experts)

    def load_experts(self, state_dicts):
        """Load E ordinary ``ResNet18`` state_dicts (torchvision key names)."""
        self.experts.load_expert_state_dicts(state_dicts)

    def expert_state_dicts(self) -> list:
        return self.experts.expert_state_dicts()

    @classmethod
    def from_reference(cls, ref: "ReferenceSoftMoE", backend: str = "auto", executor: str = "auto"):
        if not isinstance(ref, ReferenceSoftMoE):
            raise TypeError(f"expected a ReferenceSoftMoE, got {type(ref).__name__}")
        p = ref.gate.fc.weight
        moe = cls(**ref.config(), backend=backend, executor=executor).to(device=p.device, dtype=p.dtype)
        moe.load_experts([m.state_dict() for m in ref.experts])
        moe.gate.load_state_dict(ref.gate.state_dict())
        return moe.train(ref.training)

    def to_reference(self) -> "ReferenceSoftMoE":
        p = self.gate.fc.weight
        ref = ReferenceSoftMoE(**self.config()).to(device=p.device, dtype=p.dtype)
        for m, sd in zip(ref.experts, self.expert_state_dicts()):
            m.load_state_dict(sd)
        ref.gate.load_state_dict(self.gate.state_dict())
        return ref.train(self.training)

    def extra_repr(self):
        return f"mix={self.mix!r}, temperature={self.temperature}, backend={self.backend!r}, roles={self.roles}"


class ReferenceSoftMoE(_SoftMoEBase):
    """The readable twin that defines correctness: an ``nn.ModuleList`` of ``ResNet18`` run one
    by one and plain torch mixing. Same constructor arguments as ``FastSoftMoE`` (less the
    backend/executor choices)."""

    def __init__(self, num_experts: int = 9, num_classes: int = 10, width: int = 64,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, mix: str = "logits",
                 temperature: float = 1.0, roles: Sequence[str] | None = None, gate_hidden: int = 16):
        super().__init__(num_experts, num_classes, width, mean, std, mix, temperature, roles, gate_hidden)
        self.experts = nn.ModuleList(ResNet18(num_classes, width) for _ in range(num_experts))

    def forward(self, x, return_details: bool = False):
        self._check_image(x)
        xn = self.normalize(x)
        expert_logits = torch.stack([m(xn) for m in self.experts], dim=1)
        weights = torch.softmax(self.gate(xn).float() / self.temperature, dim=-1)
        if self.mix == "logits":
            logits = (weights.unsqueeze(-1) * expert_logits.float()).sum(dim=1)
        else:
            logp = torch.log_softmax(expert_logits.float(), dim=-1)
            logits = torch.logsumexp(logp + torch.log(weights).unsqueeze(-1), dim=1)
        logits = logits.to(expert_logits.dtype)
        if return_details:
            return MoEOutput(logits, expert_logits, weights.to(expert_logits.dtype))
        return logits

    def experts_forward(self, x, experts=None):
        """Same contract as ``FastSoftMoE.experts_forward``, one expert at a time."""
        if isinstance(experts, str):
            experts = self.role_slice(experts)
        lo, hi = _parse_experts(experts, self.num_experts)
        xn = self.normalize(x)
        if xn.dim() == 5:
            if xn.shape[1] != hi - lo:
                raise ValueError(f"expected per-expert input [B,{hi - lo},3,H,W], got shape {tuple(x.shape)}")
            return torch.stack([self.experts[e](xn[:, e - lo]) for e in range(lo, hi)], dim=1)
        return torch.stack([self.experts[e](xn) for e in range(lo, hi)], dim=1)

    def load_experts(self, state_dicts):
        if not isinstance(state_dicts, (list, tuple)) or len(state_dicts) != self.num_experts:
            n = len(state_dicts) if isinstance(state_dicts, (list, tuple)) else type(state_dicts).__name__
            raise ValueError(f"expected a list of {self.num_experts} state_dicts, got {n}")
        for m, sd in zip(self.experts, state_dicts):
            m.load_state_dict(sd)

    def expert_state_dicts(self) -> list:
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.experts]
