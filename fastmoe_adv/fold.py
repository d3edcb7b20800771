"""Eval-mode BatchNorm folded into the convolutions of the grouped experts, for attacks and evaluation.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x, w))`` equals
``conv(x, w * s) + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``: one convolution with a
bias instead of a convolution and a normalization pass. The folded weights are a cache of the live
parameters and buffers, refolded whenever any of them changed (see ``FoldedExperts``), so a folded
forward never computes with stale weights.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .grouped import GroupedBatchNorm2d, GroupedConv2d, GroupedResNet18, _parse_experts

__all__ = ["FoldedExperts", "fold_conv_bn", "folded"]


def fold_conv_bn(conv: GroupedConv2d, bn: GroupedBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight ``[E*C, C_in, k, k]``, bias ``[E*C]``) of ``bn(conv(x))`` in eval mode, without
    autograd. Folded in at least fp32 and returned in the conv weight's dtype and memory format."""
    with torch.no_grad():
        dtype = torch.promote_types(conv.weight.dtype, torch.float32)
        scale = bn.weight.to(dtype) * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        weight = conv.weight.to(dtype) * scale.view(-1, 1, 1, 1)
        bias = bn.bias.to(dtype) - bn.running_mean.to(dtype) * scale
        return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def _state(t: torch.Tensor) -> tuple:
    # _version counts in-place writes (optimizer steps, copy_, train-mode running-stat updates);
    # data_ptr/device/dtype catch a tensor replaced or moved (.to(), module.float()).
    return t._version, t.data_ptr(), t.device, t.dtype


class FoldedExperts:
    """A ``GroupedResNet18``'s eval-mode function with every BatchNorm folded into its convolution.

    ``folded(x, experts=None, executor=None)`` takes the engine's inputs (normalized images,
    shared ``[B,3,H,W]`` or per-expert ``[B,E',3,H,W]``) and returns ``[B,E',K]``, the same
    function as ``engine.eval()(x, ...)`` up to fp32 rounding, whatever mode the engine is in.

    Never stale: before every call it compares each conv weight and BatchNorm tensor's in-place
    version counter, storage pointer, device and dtype with those it folded and refolds on any
    change. One hole: writes through ``param.data`` bypass the version counter; after such a
    write call ``refresh()``.

    Gradients flow to the input (and the linear heads), not to the folded conv/BatchNorm
    parameters: this is an engine for attacks and evaluation, not for training.
    """

    def __init__(self, engine: GroupedResNet18):
        if not isinstance(engine, GroupedResNet18):
            raise TypeError(f"expected a GroupedResNet18, got {type(engine).__name__}")
        self.engine = engine
        self._pairs = list(_conv_bn_pairs(engine))
        self._folded: dict = {}
        self._key = None
        self.num_folds = 0   # how many times the weights were (re)folded

    def _current_key(self) -> tuple:
        key = []
        for conv, bn in self._pairs:
            key.append(bn.eps)
            key.extend(_state(t) for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var))
        return tuple(key)

    def is_stale(self) -> bool:
        return self._key != self._current_key()

    def refresh(self) -> None:
        """Refold now from the current parameters and buffers."""
        self._folded = {conv: fold_conv_bn(conv, bn) for conv, bn in self._pairs}
        self._key = self._current_key()
        self.num_folds += 1

    def _conv(self, conv, x, lo, hi, shared_input=False):
        weight, bias = self._folded[conv]
        c = conv.out_channels
        return F.conv2d(x, weight[lo * c:hi * c], bias[lo * c:hi * c], conv.stride, conv.padding, 1,
                        1 if shared_input else hi - lo)

    def _run(self, x, lo, hi, shared_input):
        eng = self.engine
        out = F.relu(self._conv(eng.conv1, x, lo, hi, shared_input))
        for layer in (eng.layer1, eng.layer2, eng.layer3, eng.layer4):
            for block in layer:
                identity = x_in = out
                out = F.relu(self._conv(block.conv1, x_in, lo, hi))
                out = self._conv(block.conv2, out, lo, hi)
                if block.downsample is not None:
                    identity = self._conv(block.downsample[0], x_in, lo, hi)
                out = F.relu(out + identity)
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return eng.fc(pooled.view(pooled.shape[0], hi - lo, eng.fc.in_features), lo, hi)

    def __call__(self, x, experts=None, executor=None):
        eng = self.engine
        lo, hi = _parse_experts(experts, eng.num_experts)
        shared = eng.check_input(x, hi - lo)
        if self.is_stale():
            self.refresh()
        executor = eng.resolve_executor(x, executor)
        if executor == "grouped" or hi - lo == 1:
            if not shared:
                x = x.reshape(x.shape[0], (hi - lo) * 3, *x.shape[3:])
            return self._run(x, lo, hi, shared)
        xs = [x] * (hi - lo) if shared else x.unbind(1)
        return torch.cat([self._run(xe, e, e + 1, True) for e, xe in zip(range(lo, hi), xs)], dim=1)


def _conv_bn_pairs(engine: GroupedResNet18):
    """Every (conv, the BatchNorm right after it) of the engine."""
    yield engine.conv1, engine.bn1
    for layer in (engine.layer1, engine.layer2, engine.layer3, engine.layer4):
        for block in layer:
            yield block.conv1, block.bn1
            yield block.conv2, block.bn2
            if block.downsample is not None:
                yield block.downsample[0], block.downsample[1]


@contextlib.contextmanager
def folded(model, enabled: bool = True):
    """``with folded(moe): ...``: the mixture's eval-mode forwards run on folded BatchNorms
    inside the block (``moe.fold_bn = enabled``), restored on exit, also on error."""
    if not hasattr(model, "fold_bn"):
        raise TypeError(f"expected a model with a fold_bn switch (FastSoftMoE), got {type(model).__name__}")
    saved = model.fold_bn
    model.fold_bn = bool(enabled)
    try:
        yield model
    finally:
        model.fold_bn = saved
