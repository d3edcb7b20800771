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

from . import checks
from .constants import BACKENDS, CIFAR10_MEAN, CIFAR10_STD, MIX_MODES, ROLES
from .fold import FoldedExperts
from .gate import Gate
from .grouped import GroupedResNet18, _check_executor, _parse_experts
from .kernels import gated_mix
from .resnet import ResNet18

# The shared names stay importable from here (``from fastmoe_adv.moe import CIFAR10_MEAN``).
__all__ = ["FastSoftMoE", "ReferenceSoftMoE", "MoEOutput", "default_roles", "CIFAR10_MEAN", "CIFAR10_STD",
           "MIX_MODES", "BACKENDS", "ROLES"]


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


class _SoftMoEBase(nn.Module):
    """What both twins share: configuration, normalization, roles, input checks."""

    def __init__(self, num_experts, num_classes, width, mean, std, mix, temperature, roles, gate_hidden,
                 check_inputs, fused_mix):
        super().__init__()
        # fused_mix: the mixture mixes with gated_mix (either backend), so E and K must fit its limits:
        # fail here, not at the first forward of a training run.
        self.num_experts = checks.check_num_experts(num_experts, fused_mix)
        self.num_classes = checks.check_num_classes(num_classes, fused_mix)
        self.width = width
        self.mix = checks.check_choice("mix", mix, MIX_MODES)
        self.temperature = checks.check_positive_float("temperature", temperature)
        self.roles = _check_roles(roles, num_experts)
        self.gate_hidden = gate_hidden
        self.check_inputs = bool(check_inputs)
        self.register_buffer("mean", torch.tensor(checks.check_rgb_stats("mean", mean)).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(checks.check_rgb_stats("std", std, positive=True)).view(3, 1, 1))
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

    def _check_image(self, x, n_experts=None):
        """Shape, dtype and batch checks (free: metadata only), then, when ``check_inputs`` is on,
        the pixel range (one device-to-host read). ``n_experts`` allows per-expert
        ``[B,n,3,H,W]`` input."""
        checks.check_image_tensor(x, n_experts)
        checks.check_input_dtype(x, self.gate.fc.weight.dtype)
        checks.check_train_batch(x.shape[0], self.training, type(self).__name__)
        if self.check_inputs:
            checks.check_pixel_range(x)

    def _expert_range(self, experts):
        if isinstance(experts, str):
            experts = self.role_slice(experts)
        return _parse_experts(experts, self.num_experts)


class FastSoftMoE(_SoftMoEBase):
    """Soft mixture of E ResNet-18 experts, the experts run as one grouped network.

    Args:
        num_experts, num_classes, width: E, K and the ResNet width (64 is the real model).
        mean, std: dataset normalization (3 values each); inputs are raw [0, 1] pixels.
        mix: ``"logits"`` or ``"probs"`` (see the module docstring).
        backend: mixing kernel, ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA).
        executor: ``"grouped"``, ``"loop"`` or ``"auto"`` (the one measured faster on the device).
        bn_backend: the experts' BatchNorm (+ residual add + ReLU), ``"torch"`` (default),
            ``"triton"`` (the fused ``batch_norm_act``) or ``"auto"`` (measured per shape on CUDA); see
            ``GroupedResNet18``. A runtime choice like ``executor``: an attribute, not in ``config()``,
            so checkpoints do not record it.
        temperature: gate softmax temperature.
        roles: per-expert role list, default ``["clean"] + ["fgsm"] * 4 + ["pgd"] * 4``.
        gate_hidden: width of the gate CNN.
        check_inputs: check on every call that the pixels are finite and in [0, 1] (one
            device-to-host read per call, skipped inside CUDA graph capture and torch.compile).
            Also an attribute: hot loops that feed images they produced themselves (attack steps,
            training batches from a checked loader) may set ``model.check_inputs = False``.
            Shape and dtype are checked either way (those checks are free).
        fold_bn: in eval mode, run the experts with every BatchNorm folded into its convolution
            (``fastmoe_adv.fold``; refolded whenever a weight or statistic changed). Same function up to
            fp32 rounding, for attacks and evaluation: gradients reach the input but not the experts'
            conv/BatchNorm parameters. Off by default; an attribute, also set by ``fold.folded(model)``.

    Inputs must have the model's dtype (``model.double()`` for fp64 input), except under
    ``torch.autocast``, which casts per operation. An empty batch gives empty outputs in eval
    mode and an error in train mode (BatchNorm has no batch statistics for zero samples).
    """

    def __init__(self, num_experts: int = 9, num_classes: int = 10, width: int = 64,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, mix: str = "logits",
                 backend: str = "auto", executor: str = "auto", temperature: float = 1.0,
                 roles: Sequence[str] | None = None, gate_hidden: int = 16, check_inputs: bool = True,
                 fold_bn: bool = False, bn_backend: str = "torch"):
        backend = checks.check_choice("backend", backend, BACKENDS)
        bn_backend = checks.check_choice("bn_backend", bn_backend, BACKENDS)
        super().__init__(num_experts, num_classes, width, mean, std, mix, temperature, roles, gate_hidden,
                         check_inputs, fused_mix=True)
        self.backend = backend
        self.experts = GroupedResNet18(num_experts, num_classes, width, _check_executor(executor), bn_backend)
        self.fold_bn = bool(fold_bn)
        self._folded = None   # FoldedExperts, built on first folded use

    def _expert_engine(self):
        """What runs the experts: the folded engine when ``fold_bn`` is on and the experts are in eval mode."""
        if not (self.fold_bn and not self.experts.training):
            return self.experts
        if self._folded is None or self._folded.engine is not self.experts:
            self._folded = FoldedExperts(self.experts)
        return self._folded

    @property
    def executor(self) -> str:
        return self.experts.executor

    @executor.setter
    def executor(self, value):
        self.experts.executor = _check_executor(value)

    @property
    def bn_backend(self) -> str:
        return self.experts.bn_backend

    @bn_backend.setter
    def bn_backend(self, value):
        self.experts.bn_backend = checks.check_choice("bn_backend", value, BACKENDS)

    def forward(self, x, return_details: bool = False):
        self._check_image(x)
        xn = self.normalize(x)
        expert_logits = self._expert_engine()(xn)          # [B, E, K]
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
        ``[B,3,H,W]`` (shared) or ``[B,E',3,H,W]`` (one image per active expert). Checked like
        ``forward``."""
        lo, hi = self._expert_range(experts)
        self._check_image(x, hi - lo)
        return self._expert_engine()(self.normalize(x), experts=(lo, hi))

    def load_experts(self, state_dicts):
        """Load E ordinary ``ResNet18`` state_dicts (torchvision key names)."""
        self.experts.load_expert_state_dicts(state_dicts)

    def expert_state_dicts(self) -> list:
        return self.experts.expert_state_dicts()

    @classmethod
    def from_reference(cls, ref: "ReferenceSoftMoE", backend: str = "auto", executor: str = "auto",
                       bn_backend: str = "torch"):
        if not isinstance(ref, ReferenceSoftMoE):
            raise TypeError(f"expected a ReferenceSoftMoE, got {type(ref).__name__}")
        p = ref.gate.fc.weight
        moe = cls(**ref.config(), backend=backend, executor=executor, check_inputs=ref.check_inputs,
                  bn_backend=bn_backend)
        moe = moe.to(device=p.device, dtype=p.dtype)
        moe.load_experts([m.state_dict() for m in ref.experts])
        moe.gate.load_state_dict(ref.gate.state_dict())
        return moe.train(ref.training)

    def to_reference(self) -> "ReferenceSoftMoE":
        p = self.gate.fc.weight
        ref = ReferenceSoftMoE(**self.config(), check_inputs=self.check_inputs).to(device=p.device, dtype=p.dtype)
        for m, sd in zip(ref.experts, self.expert_state_dicts()):
            m.load_state_dict(sd)
        ref.gate.load_state_dict(self.gate.state_dict())
        return ref.train(self.training)

    def extra_repr(self):
        return (f"mix={self.mix!r}, temperature={self.temperature}, backend={self.backend!r}, "
                f"bn_backend={self.bn_backend!r}, roles={self.roles}")


class ReferenceSoftMoE(_SoftMoEBase):
    """The readable twin that defines correctness: an ``nn.ModuleList`` of ``ResNet18`` run one
    by one and plain torch mixing. Same constructor arguments as ``FastSoftMoE`` (less the
    backend/executor choices)."""

    def __init__(self, num_experts: int = 9, num_classes: int = 10, width: int = 64,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, mix: str = "logits",
                 temperature: float = 1.0, roles: Sequence[str] | None = None, gate_hidden: int = 16,
                 check_inputs: bool = True):
        super().__init__(num_experts, num_classes, width, mean, std, mix, temperature, roles, gate_hidden,
                         check_inputs, fused_mix=False)
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
        lo, hi = self._expert_range(experts)
        self._check_image(x, hi - lo)
        xn = self.normalize(x)
        if xn.dim() == 5:
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
