"""The little torch.distributed glue the training recipe needs (``torchrun`` launches).

Single process is the default: ``setup()`` starts a process group only when the environment
says ``WORLD_SIZE > 1`` (as ``torchrun`` sets it), NCCL on CUDA devices and gloo on CPU. Every
helper is a no-op (or the trivial answer) when no group is running, so the training code calls
them unconditionally.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = ["DistInfo", "env_world_size", "setup", "cleanup", "is_initialized", "barrier",
           "all_gather_object", "broadcast_object", "any_true", "resolve_device"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False   # we called init_process_group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name, default):
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def env_world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``"auto"``/None -> ``cuda:<local_rank>`` when CUDA is available, else CPU; a bare
    ``"cuda"`` under torchrun becomes ``cuda:<local_rank>``."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def setup(device: str | torch.device | None = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group the environment describes (if any) and pick this rank's device."""
    world = env_world_size()
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    started = False
    if not is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        started = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, started)


def cleanup(info: DistInfo) -> None:
    if info.started_here and is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (a list with one entry per rank); ``[obj]`` without a group."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a group)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_true(flags, device: torch.device) -> list[bool]:
    """For each flag, True on every rank when it is true on any rank (one collective for all of
    them, so every rank stops at the same step). Without a process group: the flags themselves.
    This syncs the host with the device: call it at log boundaries, not every step."""
    flags = [bool(f) for f in flags]
    if not is_initialized():
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
