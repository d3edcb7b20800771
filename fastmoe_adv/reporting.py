"""What every report shares: JSON-safe values, atomic text writes, the hardware description."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile

import torch

__all__ = ["json_safe", "atomic_write_text", "write_json", "cpu_model", "hardware_info"]


def json_safe(obj):
    """Plain JSON values: non-finite floats become None, tensors/numpy values lists or numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):          # tensors, numpy arrays and scalars
        return json_safe(obj.tolist())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def atomic_write_text(path, text: str):
    """Write via a temp file in the same folder, fsync, then ``os.replace``: a reader never sees
    half a file, and an interrupted write leaves the old file as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info(device) -> dict:
    device = torch.device(device)
    hw = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "platform": platform.platform(), "device": str(device), "gpu": None}
    if device.type == "cuda" and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw
