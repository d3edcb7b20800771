"""What every evaluation shares: input checks, device/dtype handling, no-grad forwards, and
progress that a researcher can follow on a terminal or in a log file."""
from __future__ import annotations

import sys
import time

import torch

from .. import attacks as _attacks
from ..moe import FastSoftMoE, MoEOutput, ReferenceSoftMoE

__all__ = ["is_moe", "model_device_dtype", "sync", "generator", "prepare_data", "to_device", "forward", "Progress",
           "batches"]


def is_moe(model) -> bool:
    return isinstance(model, (FastSoftMoE, ReferenceSoftMoE))


def model_device_dtype(model, device):
    p = next(iter(model.parameters()), None)
    if device is None:
        device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.device(device), dtype


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def prepare_data(images, labels):
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images: expected a torch.Tensor [N,C,H,W] (uint8 or float in [0, 1]), "
                         f"got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images: expected [N,C,H,W], got rank {images.dim()} shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        pass
    elif images.is_floating_point():
        _attacks.check_images(images, name="images")
    else:
        raise ValueError(f"images: expected uint8 (0..255) or float in [0, 1], got dtype {images.dtype}")
    labels = _attacks.check_labels(labels, [(images.shape[0],)], "cpu", name="labels")
    if images.shape[0] == 0:
        raise ValueError("images: expected at least one image, got N = 0")
    return images, labels


def to_device(images, device, dtype=torch.float32):
    if images.dtype == torch.uint8:
        return images.to(device, non_blocking=True).to(dtype).div_(255)
    return images.to(device=device, dtype=dtype, non_blocking=True)


def forward(model, x, moe):
    """No-grad eval forward -> (logits [B,K], gate weights [B,E] or None)."""
    with torch.no_grad():
        if moe:
            out = model(x, return_details=True)
            if isinstance(out, MoEOutput):
                return out.logits, out.gate_weights
            return out[0], out[2]
        return _attacks.logits_of(model(x)), None


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI) plain lines with the fraction done
    and the estimated time left, at most one every ``every_s`` seconds."""

    def __init__(self, total, enabled, desc="robustness", every_s: float = 30.0, stream=None):
        self.total, self.done, self.enabled, self.desc, self.every_s = max(1, total), 0, enabled, desc, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.bar, self.t0, self.last = None, time.perf_counter(), None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="batch", file=self.stream)

    def update(self, label):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if not self.enabled or (self.last is not None and now - self.last < self.every_s
                                and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.t0
        left = elapsed / self.done * (self.total - self.done)
        print(f"{self.desc}: {self.done}/{self.total} batches ({self.done / self.total:.0%}), {label}, "
              f"{elapsed:.0f} s elapsed, about {left:.0f} s left", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
