"""All experts as one network: ``GroupedResNet18``.

Every layer of E ResNet-18 experts is stored stacked along the output channels, expert-major:
a conv weight is ``[E*C_out, C_in, k, k]`` (the weight of a grouped convolution with
``groups=E``), a BatchNorm holds ``E*C`` channels (E independent BatchNorms: BN is per
channel), the head is ``[E, K, C]``. A contiguous range of experts ``[lo, hi)`` is a slice of
every tensor along dim 0, so a role's experts run on views of the weights, without copies.

Two executors compute the same function over the same parameters:
- ``"grouped"``: one grouped convolution per layer for all active experts;
- ``"loop"``: the experts one after another (each a plain convolution on its weight slice).
Which is faster is a measured fact per device (see ``fastmoe_adv.autotune``); ``"auto"``
asks it.

Every BatchNorm runs together with what follows it in a basic block (``relu(bn(x) [+ residual])``),
through ``bn_backend``: ``"torch"`` (F.batch_norm, add, relu: the twin, the default) or the fused
Triton op ``fastmoe_adv.kernels.batch_norm_act`` (``"triton"``); ``"auto"`` times both on CUDA on
first use of a shape and keeps the faster (``torch`` on CPU), like ``executor="auto"``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_choice, check_positive_int, check_train_batch
from .constants import BACKENDS, EXECUTORS
from .kernels import batch_norm_act
from .resnet import BLOCKS_PER_STAGE, STAGE_STRIDES, ResNet18, _check_classes, _check_width, stage_widths

__all__ = ["GroupedResNet18", "GroupedConv2d", "GroupedBatchNorm2d", "GroupedLinear", "EXECUTORS"]


def _rows(t, lo, hi, n, rows):
    """Rows ``[lo*rows, hi*rows)`` of ``t`` (experts lo..hi-1 of n); the tensor itself when that is
    every row, because a slice of the whole tensor still costs a zeros + copy in its backward."""
    return t if lo == 0 and hi == n else t[lo * rows:hi * rows]


class GroupedConv2d(nn.Module):
    """E bias-free convolutions ``C_in -> C_out`` stacked as ``weight [E*C_out, C_in, k, k]``."""

    def __init__(self, num_experts, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.num_experts, self.in_channels, self.out_channels = num_experts, in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(num_experts * out_channels, in_channels, kernel_size, kernel_size))
        self.reset_parameters()

    def reset_parameters(self):
        # Per expert, exactly what nn.Conv2d's default init does for one [C_out, C_in, k, k] weight.
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e * self.out_channels:(e + 1) * self.out_channels], a=5 ** 0.5)

    def expert_params(self, lo, hi):
        """One ``(weight,)`` view per expert of ``[lo, hi)``. They come from one ``split``, whose
        backward writes every expert's gradient with a single cat (a slice per expert would cost a
        zeros + copy + accumulate each)."""
        w = _rows(self.weight, lo, hi, self.num_experts, self.out_channels)
        return [(v,) for v in w.split(self.out_channels)]

    def forward(self, x, lo=0, hi=None, shared_input=False, params=None):
        """x: ``[B, (hi-lo)*C_in, H, W]``, or ``[B, C_in, H, W]`` seen by every expert when
        ``shared_input``. Returns ``[B, (hi-lo)*C_out, H', W']``. ``params``: this range's
        ``(weight,)`` (from ``expert_params``) instead of slicing the parameter."""
        hi = self.num_experts if hi is None else hi
        w = _rows(self.weight, lo, hi, self.num_experts, self.out_channels) if params is None else params[0]
        return F.conv2d(x, w, None, self.stride, self.padding, 1, 1 if shared_input else hi - lo)

    def extra_repr(self):
        return (f"experts={self.num_experts}, {self.in_channels}->{self.out_channels}, "
                f"k={self.kernel_size}, stride={self.stride}, padding={self.padding}")


class GroupedBatchNorm2d(nn.Module):
    """E independent BatchNorm2d(C) as one over ``E*C`` channels; ``num_batches_tracked`` per expert."""

    def __init__(self, num_experts, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        if momentum is None or not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
        self.num_experts, self.num_features, self.eps, self.momentum = num_experts, num_features, eps, float(momentum)
        n = num_experts * num_features
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.register_buffer("num_batches_tracked", torch.zeros(num_experts, dtype=torch.long))

    def expert_params(self, lo, hi):
        """One ``(weight, bias)`` pair of views per expert of ``[lo, hi)`` (see ``GroupedConv2d``)."""
        c, n = self.num_features, self.num_experts
        return list(zip(_rows(self.weight, lo, hi, n, c).split(c), _rows(self.bias, lo, hi, n, c).split(c)))

    def count_batch(self, lo, hi):
        """Train mode: one more batch seen by experts ``[lo, hi)``."""
        if self.training:
            self.num_batches_tracked[lo:hi].add_(1)

    def forward(self, x, lo=0, hi=None, params=None, relu=False, residual=None, backend="torch"):
        """``relu(bn(x) + residual)`` on ``x [B, (hi-lo)*C, H, W]`` (``relu`` and ``residual``
        optional). With ``params`` (this range's ``(weight, bias)``) the caller counts the batch
        (``count_batch``), once for all the experts it runs. ``backend``: ``"torch"`` runs
        F.batch_norm, the add and F.relu (the twin of ``batch_norm_act``, inline: the op's
        per-call checks would only re-check this module's own tensors); ``"triton"`` / ``"auto"``
        go through the fused ``batch_norm_act``."""
        hi = self.num_experts if hi is None else hi
        c, n = self.num_features, self.num_experts
        if params is None:
            self.count_batch(lo, hi)
            params = (_rows(self.weight, lo, hi, n, c), _rows(self.bias, lo, hi, n, c))
        # Views of the running buffers: train mode updates the active experts' stats in place.
        rm, rv = _rows(self.running_mean, lo, hi, n, c), _rows(self.running_var, lo, hi, n, c)
        if backend != "torch":
            return batch_norm_act(x, params[0], params[1], rm, rv, training=self.training, momentum=self.momentum,
                                  eps=self.eps, relu=relu, residual=residual, backend=backend)
        y = F.batch_norm(x, rm, rv, params[0], params[1], self.training, self.momentum, self.eps)
        if residual is not None:
            y = y + residual
        return F.relu(y) if relu else y

    def extra_repr(self):
        return f"experts={self.num_experts}, features={self.num_features}, eps={self.eps}, momentum={self.momentum}"


class GroupedLinear(nn.Module):
    """E linear heads ``C -> K``: ``weight [E, K, C]``, ``bias [E, K]``."""

    def __init__(self, num_experts, in_features, out_features):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))
        bound = 1.0 / in_features ** 0.5  # nn.Linear's default init, per expert
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def expert_params(self, lo, hi):
        """One ``(weight [1,K,C], bias [1,K])`` pair of views per expert of ``[lo, hi)``."""
        n = self.num_experts
        return list(zip(_rows(self.weight, lo, hi, n, 1).split(1), _rows(self.bias, lo, hi, n, 1).split(1)))

    def forward(self, x, lo=0, hi=None, params=None):
        """x ``[B, (hi-lo), C]`` -> ``[B, (hi-lo), K]``."""
        hi = self.num_experts if hi is None else hi
        n = self.num_experts
        w, b = (_rows(self.weight, lo, hi, n, 1), _rows(self.bias, lo, hi, n, 1)) if params is None else params
        return torch.einsum("bnc,nkc->bnk", x, w) + b


class _GroupedBlock(nn.Module):
    def __init__(self, num_experts, in_planes, planes, stride):
        super().__init__()
        self.conv1 = GroupedConv2d(num_experts, in_planes, planes, 3, stride, 1)
        self.bn1 = GroupedBatchNorm2d(num_experts, planes)
        self.conv2 = GroupedConv2d(num_experts, planes, planes, 3, 1, 1)
        self.bn2 = GroupedBatchNorm2d(num_experts, planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(GroupedConv2d(num_experts, in_planes, planes, 1, stride, 0),
                                            GroupedBatchNorm2d(num_experts, planes))

    def forward(self, x, lo, hi, params=None, bn_backend="torch"):
        """``params``: None, or a dict module -> that module's ``expert_params`` entry for the
        single expert ``lo`` (the loop executor). bn2 takes the shortcut as its residual: BN, add
        and ReLU are one op."""
        def p(m):
            return None if params is None else params[m]
        out = self.bn1(self.conv1(x, lo, hi, params=p(self.conv1)), lo, hi, params=p(self.bn1), relu=True,
                       backend=bn_backend)
        out = self.conv2(out, lo, hi, params=p(self.conv2))
        if self.downsample is not None:
            conv, bn = self.downsample
            x = bn(conv(x, lo, hi, params=p(conv)), lo, hi, params=p(bn), backend=bn_backend)
        return self.bn2(out, lo, hi, params=p(self.bn2), relu=True, residual=x, backend=bn_backend)


def _parse_experts(experts, num_experts) -> tuple[int, int]:
    """None | slice | range | (lo, hi) | int  ->  (lo, hi), a non-empty contiguous range."""
    if experts is None:
        return 0, num_experts
    if isinstance(experts, bool):
        raise TypeError(f"experts must be None, an int, a slice, a range or (lo, hi), got {experts!r}")
    if isinstance(experts, int):
        lo, hi, step = experts, experts + 1, 1
    elif isinstance(experts, (slice, range)):
        lo, hi, step = experts.start or 0, num_experts if experts.stop is None else experts.stop, experts.step or 1
    elif isinstance(experts, (tuple, list)) and len(experts) == 2 and all(isinstance(v, int) for v in experts):
        (lo, hi), step = experts, 1
    else:
        raise TypeError(f"experts must be None, an int, a slice, a range or (lo, hi), got {experts!r}")
    if step != 1 or not 0 <= lo < hi <= num_experts:
        raise ValueError(f"experts must be a non-empty contiguous range inside [0, {num_experts}) with step 1, "
                         f"got {experts!r}")
    return lo, hi


class GroupedResNet18(nn.Module):
    """E CIFAR ResNet-18 experts as one network of grouped convolutions.

    ``forward(x, experts=None, executor=None)``:
    - ``x [B,3,H,W]``: the same (normalized) image to every expert; the stem is an ordinary
      convolution ``3 -> E*w`` channels (no copy of the image);
    - ``x [B,E',3,H,W]``: one image per active expert (the stem runs with ``groups=E'``);
    - ``experts``: a contiguous range of experts (``slice``, ``range``, ``(lo, hi)`` or an int),
      run on views of the weights; default all;
    - returns ``[B, E', K]``, batch-major; an empty batch gives ``[0, E', K]`` in eval mode and
      an error in train mode (BatchNorm has no batch statistics for zero samples).

    Each grouped layer is called as ``layer(x, lo, hi)`` on experts ``[lo, hi)`` (default all).

    ``bn_backend`` (an attribute, like ``executor``; not part of the architecture): how each
    BatchNorm and the add/ReLU after it run, ``"torch"`` (F.batch_norm, add, relu), ``"triton"``
    (the fused ``batch_norm_act``: one op for BN + residual add + ReLU) or ``"auto"`` (on CUDA
    the faster of the two, measured per shape and executor on first use; ``"torch"`` on CPU). The
    default stays ``"torch"`` until a GPU run has checked the fused op there (its kernel-level
    gain is a prediction from pass counts, not yet measured); both compute the same function and
    update the same running statistics.
    """

    def __init__(self, num_experts: int = 9, num_classes: int = 10, width: int = 64, executor: str = "auto",
                 bn_backend: str = "torch"):
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.num_classes = _check_classes(num_classes)
        self.width = _check_width(width)
        self.executor = _check_executor(executor)
        self.bn_backend = _check_bn_backend(bn_backend)
        E, widths = num_experts, stage_widths(width)
        self.conv1 = GroupedConv2d(E, 3, width, 3, 1, 1)
        self.bn1 = GroupedBatchNorm2d(E, width)
        in_planes = width
        for i, (planes, stride) in enumerate(zip(widths, STAGE_STRIDES)):
            blocks = []
            for j in range(BLOCKS_PER_STAGE):
                blocks.append(_GroupedBlock(E, in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = GroupedLinear(E, widths[-1], num_classes)

    # ------------------------------------------------------------------ forward
    def _run(self, x, lo, hi, shared_input, params=None, bn_backend="torch"):
        """Experts ``[lo, hi)`` as one grouped network; ``params`` (a dict module -> per-expert
        views, for one expert) replaces the slicing of each parameter."""
        def p(m):
            return None if params is None else params[m]
        out = self.bn1(self.conv1(x, lo, hi, shared_input, params=p(self.conv1)), lo, hi, params=p(self.bn1),
                       relu=True, backend=bn_backend)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                out = block(out, lo, hi, params=params, bn_backend=bn_backend)
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)           # [B, n*C]
        # Explicit C (not -1): an empty batch has nothing to infer it from.
        return self.fc(pooled.view(pooled.shape[0], hi - lo, self.fc.in_features), lo, hi, params=p(self.fc))

    def _run_loop(self, x, lo, hi, shared_input, bn_backend="torch"):
        """The experts one after another. Every parameter is split once into per-expert views, so
        autograd assembles each parameter's gradient with one cat; the train-mode batch count is
        bumped once per BatchNorm for the whole range."""
        per_expert = [{} for _ in range(hi - lo)]
        for _, m in self._layers():
            for d, views in zip(per_expert, m.expert_params(lo, hi)):
                d[m] = views
            if isinstance(m, GroupedBatchNorm2d):
                m.count_batch(lo, hi)
        xs = [x] * (hi - lo) if shared_input else x.unbind(1)
        outs = [self._run(xe, e, e + 1, True, d, bn_backend) for e, xe, d in zip(range(lo, hi), xs, per_expert)]
        return torch.cat(outs, dim=1)

    def check_input(self, x, n_active=None):
        """Validate ``x``; returns True when it is a shared ``[B,3,H,W]`` input."""
        n_active = self.num_experts if n_active is None else n_active
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got dtype {x.dtype}")
        if x.dim() == 4:
            if x.shape[1] != 3:
                raise ValueError(f"expected input [B,3,H,W] (3 channels), got shape {tuple(x.shape)}")
            return True
        if x.dim() == 5:
            if x.shape[1] != n_active or x.shape[2] != 3:
                raise ValueError(f"expected per-expert input [B,{n_active},3,H,W] ({n_active} active experts, "
                                 f"3 channels), got shape {tuple(x.shape)}")
            return False
        raise ValueError(f"expected input [B,3,H,W] or per-expert [B,{n_active},3,H,W], got rank {x.dim()} "
                         f"shape {tuple(x.shape)}")

    def resolve_executor(self, x, executor=None) -> str:
        executor = _check_executor(executor or self.executor)
        if executor == "auto":
            if x.shape[0] == 0:
                return "grouped"  # nothing to run: no table row or probe applies to an empty batch
            from .autotune import pick_executor
            executor = pick_executor(self, x)
        return executor

    def resolve_bn_backend(self, x, executor: str) -> str:
        """``bn_backend``, with ``"auto"`` resolved for this input and executor: the measured
        faster of ``"torch"`` and ``"triton"`` on CUDA, ``"torch"`` on CPU (``fastmoe_adv.autotune``)."""
        bn_backend = _check_bn_backend(self.bn_backend)  # an attribute: may have been set after construction
        if bn_backend != "auto":
            return bn_backend
        if x.shape[0] == 0:
            return "torch"
        from .autotune import pick_bn_backend
        return pick_bn_backend(self, x, executor)

    def forward(self, x, experts=None, executor=None):
        return self._forward(x, experts, executor)

    def _forward(self, x, experts=None, executor=None, bn_backend=None):
        """``forward`` with an optional explicit ``bn_backend`` (the autotune probe's candidates)."""
        lo, hi = _parse_experts(experts, self.num_experts)
        shared = self.check_input(x, hi - lo)
        check_train_batch(x.shape[0], self.training, type(self).__name__)
        executor = self.resolve_executor(x, executor)
        bn_backend = bn_backend or self.resolve_bn_backend(x, executor)
        if executor == "grouped" or hi - lo == 1:
            if not shared:
                b = x.shape[0]
                x = x.reshape(b, (hi - lo) * 3, *x.shape[3:])
            return self._run(x, lo, hi, shared, bn_backend=bn_backend)
        return self._run_loop(x, lo, hi, shared, bn_backend)

    # --------------------------------------------------------- pack / unpack
    def _layers(self):
        """(torchvision key prefix, grouped module) for every conv, bn and the head."""
        for name, module in self.named_modules():
            if isinstance(module, (GroupedConv2d, GroupedBatchNorm2d, GroupedLinear)):
                yield name, module

    def expert_layout(self) -> "OrderedDict[str, tuple]":
        """Key -> shape of one expert's torchvision-style state_dict, in ``ResNet18``'s key order,
        read off the grouped layers (no model is built)."""
        layout = OrderedDict()
        for name, m in self._layers():
            if isinstance(m, GroupedConv2d):
                layout[f"{name}.weight"] = (m.out_channels, m.in_channels, m.kernel_size, m.kernel_size)
            elif isinstance(m, GroupedBatchNorm2d):
                for key in ("weight", "bias", "running_mean", "running_var"):
                    layout[f"{name}.{key}"] = (m.num_features,)
                layout[f"{name}.num_batches_tracked"] = ()
            else:
                layout[f"{name}.weight"] = (m.out_features, m.in_features)
                layout[f"{name}.bias"] = (m.out_features,)
        return layout

    def expert_keys(self) -> list[str]:
        """The torchvision-style state_dict keys of one expert, in order."""
        return list(self.expert_layout())

    def expert_state_dict(self, e: int) -> "OrderedDict[str, torch.Tensor]":
        """Expert ``e`` as an ordinary ``ResNet18`` state_dict (torchvision key names; copies)."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert index must be in [0, {self.num_experts}), got {e}")
        sd = OrderedDict()
        for name, m in self._layers():
            if isinstance(m, GroupedConv2d):
                c = m.out_channels
                sd[f"{name}.weight"] = m.weight.detach()[e * c:(e + 1) * c].clone()
            elif isinstance(m, GroupedBatchNorm2d):
                c = m.num_features
                for key in ("weight", "bias", "running_mean", "running_var"):
                    sd[f"{name}.{key}"] = getattr(m, key).detach()[e * c:(e + 1) * c].clone()
                sd[f"{name}.num_batches_tracked"] = m.num_batches_tracked[e].clone()
            else:
                sd[f"{name}.weight"] = m.weight.detach()[e].clone()
                sd[f"{name}.bias"] = m.bias.detach()[e].clone()
        return OrderedDict((k, sd[k]) for k in self.expert_keys())

    def expert_state_dicts(self) -> list:
        return [self.expert_state_dict(e) for e in range(self.num_experts)]

    def check_expert_state_dict(self, sd, index=None):
        where = "state_dict" if index is None else f"state_dict {index}"
        if not isinstance(sd, dict):
            raise TypeError(f"{where}: expected a dict of tensors (a ResNet18 state_dict), got {type(sd).__name__}")
        reference = self.expert_layout()
        missing = [k for k in reference if k not in sd]
        extra = [k for k in sd if k not in reference]
        if missing or extra:
            raise ValueError(f"{where}: keys do not match a ResNet18(num_classes={self.num_classes}, "
                             f"width={self.width}) state_dict: missing {missing[:6]}{'...' if len(missing) > 6 else ''}"
                             f", unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}")
        for k, shape in reference.items():
            v = sd[k]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{where}: {k} must be a tensor, got {type(v).__name__}")
            if tuple(v.shape) != shape:
                raise ValueError(f"{where}: {k} expected shape {shape}, got {tuple(v.shape)}")

    @torch.no_grad()
    def load_expert_state_dicts(self, state_dicts):
        """Load E ordinary ``ResNet18`` state_dicts (torchvision key names) into the grouped layers."""
        if not isinstance(state_dicts, (list, tuple)):
            raise TypeError(f"expected a list of {self.num_experts} state_dicts, got {type(state_dicts).__name__}")
        if len(state_dicts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} state_dicts (one per expert), got {len(state_dicts)}")
        for i, sd in enumerate(state_dicts):
            self.check_expert_state_dict(sd, i)
        for e, sd in enumerate(state_dicts):
            for name, m in self._layers():
                if isinstance(m, GroupedConv2d):
                    c = m.out_channels
                    m.weight[e * c:(e + 1) * c].copy_(sd[f"{name}.weight"])
                elif isinstance(m, GroupedBatchNorm2d):
                    c = m.num_features
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(m, key)[e * c:(e + 1) * c].copy_(sd[f"{name}.{key}"])
                    m.num_batches_tracked[e] = sd[f"{name}.num_batches_tracked"]
                else:
                    m.weight[e].copy_(sd[f"{name}.weight"])
                    m.bias[e].copy_(sd[f"{name}.bias"])

    @classmethod
    def from_experts(cls, experts, executor="auto", bn_backend="torch"):
        """Build from a list of ``ResNet18`` modules (same width and classes)."""
        if not experts:
            raise ValueError("expected a non-empty list of ResNet18 experts")
        first = experts[0]
        for i, m in enumerate(experts):
            if not isinstance(m, ResNet18):
                raise TypeError(f"expert {i}: expected a ResNet18, got {type(m).__name__}")
            if (m.width, m.num_classes) != (first.width, first.num_classes):
                raise ValueError(f"expert {i}: width/num_classes {(m.width, m.num_classes)} differ from expert 0's "
                                 f"{(first.width, first.num_classes)}")
        p = next(first.parameters())
        grouped = cls(len(experts), first.num_classes, first.width, executor, bn_backend)
        grouped = grouped.to(device=p.device, dtype=p.dtype)
        grouped.load_expert_state_dicts([m.state_dict() for m in experts])
        grouped.train(first.training)
        return grouped

    def to_experts(self) -> nn.ModuleList:
        """The experts as a ``ModuleList`` of ordinary ``ResNet18`` (copies)."""
        p = self.fc.weight
        out = nn.ModuleList()
        for e in range(self.num_experts):
            m = ResNet18(self.num_classes, self.width).to(device=p.device, dtype=p.dtype)
            m.load_state_dict(self.expert_state_dict(e))
            out.append(m.train(self.training))
        return out

    def extra_repr(self):
        return f"num_experts={self.num_experts}, num_classes={self.num_classes}, width={self.width}, " \
               f"executor={self.executor!r}, bn_backend={self.bn_backend!r}"


def _check_executor(executor) -> str:
    return check_choice("executor", executor, EXECUTORS)


def _check_bn_backend(bn_backend) -> str:
    return check_choice("bn_backend", bn_backend, BACKENDS)
