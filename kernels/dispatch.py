"""Backend choice for the fused ops: one small function that every op (and the engine) calls.

``backend="auto"``   Triton when the tensor is on CUDA and triton imports; on CPU only when
                     ``TRITON_INTERPRET=1`` (the interpreter, used by the tests); else torch.
``backend="triton"`` Triton, or a RuntimeError saying why it is impossible here.
``backend="torch"``  the plain-PyTorch twin.
"""
import contextlib
import os

import torch

__all__ = ["BACKENDS", "triton_available", "interpreter_enabled", "use_triton", "device_guard"]

BACKENDS = ("auto", "triton", "torch")

try:  # triton is optional: without it only the torch twins are available
    import triton  # noqa: F401

    _TRITON_IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a broken install raising at import time
    triton = None
    _TRITON_IMPORT_ERROR = exc

# @triton.jit decides at decoration time (when this package is imported) whether a kernel is
# compiled or interpreted, so the interpreter is usable on CPU only if it was on at import.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when triton imported successfully."""
    return triton is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels can run on CPU tensors (TRITON_INTERPRET=1 now and at import)."""
    return _INTERPRET_AT_IMPORT and os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor, backend: str = "auto") -> bool:
    """Whether an op on ``tensor`` should run its Triton kernel (True) or its torch twin (False).

    Raises ValueError for an unknown backend name and RuntimeError when ``backend="triton"``
    is impossible (triton missing, or CPU tensors without the interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"use_triton: expected a torch.Tensor, got {type(tensor).__name__}")
    on_cuda = tensor.device.type == "cuda"
    possible = triton_available() and (on_cuda or (tensor.device.type == "cpu" and interpreter_enabled()))
    if backend == "auto":
        return possible
    if not possible:  # backend == "triton"
        if not triton_available():
            why = f"triton is not importable ({_TRITON_IMPORT_ERROR!r})"
        elif tensor.device.type == "cpu":
            why = ("tensors are on CPU and the Triton interpreter is off (set TRITON_INTERPRET=1 "
                   "before fastmoe_adv.kernels is imported)")
        else:
            why = f"device {tensor.device} is neither CUDA nor CPU-with-interpreter"
        raise RuntimeError(f"backend='triton' requested but impossible: {why}")
    return True


def device_guard(tensor: torch.Tensor):
    """Context that makes ``tensor``'s CUDA device current (Triton launches on the current one)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
