"""Input validators shared by the model modules: one wording for each kind of bad input.

Every function raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong
value) with a message that names what was expected and what was given, and returns the checked
value (converted where that is the point, e.g. three floats for a mean).
"""
from __future__ import annotations

import contextlib
import math

import torch

from .constants import MAX_CLASSES, MAX_EXPERTS

__all__ = ["check_positive_int", "check_positive_float", "check_choice", "check_rgb_stats", "check_num_experts",
           "check_num_classes", "check_image_tensor", "check_input_dtype", "check_pixel_range",
           "check_train_batch", "sync_free_context", "unchecked_inputs"]


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_float(name: str, value) -> float:
    """A finite real number > 0 (bool refused: ``True`` is not a temperature)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a float > 0 (finite), got {value!r}")
    return float(value)


def check_choice(name: str, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_rgb_stats(name: str, value, positive: bool = False) -> tuple[float, float, float]:
    """Three finite floats (one per RGB channel); ``positive`` also requires each > 0 (a std)."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        vals = tuple(float(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of 3 floats (one per RGB channel), got {value!r}") from None
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(vals)}: {vals}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite per channel, got {vals}")
    if positive and min(vals) <= 0:
        raise ValueError(f"{name} must be > 0 per channel, got {vals}")
    return vals


def _check_count(name, value, limit, fused_mix, why):
    check_positive_int(name, value)
    if fused_mix and value > limit:
        raise ValueError(f"{name} must be <= {limit} (the limit of the fused gated_mix{why}), got {value}; "
                         "ReferenceSoftMoE has no such limit")
    return value


def check_num_experts(num_experts, fused_mix: bool = False) -> int:
    """E >= 1; with ``fused_mix`` (the mixture mixes with ``gated_mix``) also E <= ``MAX_EXPERTS``."""
    return _check_count("num_experts", num_experts, MAX_EXPERTS, fused_mix, ", all experts of a row in one tile")


def check_num_classes(num_classes, fused_mix: bool = False) -> int:
    """K >= 1; with ``fused_mix`` also K <= ``MAX_CLASSES``."""
    return _check_count("num_classes", num_classes, MAX_CLASSES, fused_mix, "")


def check_image_tensor(x, n_experts=None, what: str = "images") -> bool:
    """A float ``[B,3,H,W]`` tensor, or per-expert ``[B,n_experts,3,H,W]`` when ``n_experts`` is
    given. Returns True for the shared (rank-4) layout."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of {what}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected float {what} in [0, 1], got dtype {x.dtype}")
    if x.dim() == 4 and x.shape[1] == 3:
        return True
    if n_experts is not None and x.dim() == 5 and x.shape[1] == n_experts and x.shape[2] == 3:
        return False
    want = "[B,3,H,W]" if n_experts is None else f"[B,3,H,W] or per-expert input [B,{n_experts},3,H,W]"
    raise ValueError(f"expected {what} {want} in [0, 1], got shape {tuple(x.shape)}")


def check_input_dtype(x: torch.Tensor, model_dtype: torch.dtype, what: str = "images"):
    """The input's dtype must be the model's, except under autocast, which casts fp16/bf16/fp32
    per op (it leaves fp64 alone, so fp64 must still match)."""
    autocast = torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, model_dtype)
    if x.dtype != model_dtype and not autocast:
        raise TypeError(f"{what} have dtype {x.dtype} but the model's parameters are {model_dtype}: convert the "
                        f"input (x.to({model_dtype})) or the model (model.to({x.dtype})), or run under torch.autocast")


def sync_free_context(x: torch.Tensor) -> bool:
    """True where a device-to-host read is not allowed or breaks the graph: CUDA graph capture,
    ``torch.compile`` tracing."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return True
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_pixel_range(x: torch.Tensor, what: str = "images"):
    """Every pixel finite and in [0, 1]. One device-to-host read (min and max together); NaN
    fails both comparisons, so it is caught without a separate isfinite pass."""
    if x.numel() == 0 or sync_free_context(x):
        return
    # Outside autocast: stack is a type-promoting op there and refuses some input dtypes.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        lo, hi = torch.stack([x.amin().float(), x.amax().float()]).tolist()
    if not (lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"expected {what} with finite pixels in [0, 1], got min {lo} and max {hi}; scale 0..255 "
                         f"images by 1/255 and remove NaN/Inf (check_inputs=False skips this check)")


def check_train_batch(batch: int, training: bool, what: str = "model"):
    """Train-mode BatchNorm needs samples: with none its batch statistics (and the running ones
    it updates) would be NaN."""
    if training and batch == 0:
        raise ValueError(f"{what} got an empty batch (B=0) in training mode: BatchNorm has no batch statistics to "
                         f"compute; skip empty batches or call .eval() first")


@contextlib.contextmanager
def unchecked_inputs(model):
    """``with unchecked_inputs(model): ...``: every submodule with a ``check_inputs`` switch (a
    ``FastSoftMoE`` / ``ReferenceSoftMoE``, also inside a wrapper such as DDP) skips its per-call
    pixel check inside the block, restored on exit (also on error). For hot loops whose inputs
    were checked once at entry or are produced in range by construction (attack steps)."""
    modules = model.modules() if isinstance(model, torch.nn.Module) else [model]
    saved = [(m, m.check_inputs) for m in modules if hasattr(m, "check_inputs")]
    for m, _ in saved:
        m.check_inputs = False
    try:
        yield model
    finally:
        for m, flag in saved:
            m.check_inputs = flag
