"""What every report shares: JSON-safe values, atomic text writes, formatters, and the one
description of the environment (versions and hardware) that reports and benchmarks record."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile

import torch

__all__ = ["json_safe", "atomic_write", "atomic_write_text", "write_json", "append_jsonl", "cpu_model", "hardware_info",
           "versions", "environment", "fmt_pct", "fmt_eps", "file_mode"]


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


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 minus the umask.
    (``mkstemp`` creates owner-only files; reports should read like the checkpoints beside them.)"""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write, binary: bool = False):
    """Call ``write(file)`` on a temp file in the same folder, fsync, then ``os.replace``: a reader
    never sees half a file, and a failed or interrupted write leaves the old file as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str):
    """``text`` written atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(text))


def write_json(path, obj):
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def append_jsonl(path, record: dict):
    """One JSON line (strict JSON: NaN/Inf become null) appended to ``path``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


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


def versions() -> dict:
    """Library versions that change results or speed."""
    import numpy

    from . import __version__
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 (triton is optional; a broken one is still worth reporting)
        triton_version = None if isinstance(exc, ImportError) else f"unavailable ({type(exc).__name__})"
    cuda = torch.cuda.is_available()
    return {"fastmoe_adv": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "numpy": numpy.__version__, "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}


def environment(device=None) -> dict:
    """Versions and hardware in one dict: what every report and benchmark records."""
    return {**versions(), **hardware_info(device if device is not None else "cpu")}


def fmt_pct(value, width: int = 5) -> str:
    """A fraction as a percentage (``0.1234 -> ' 12.3%'``); None as '-'."""
    return "-" if value is None else f"{100 * value:{width}.1f}%"


def fmt_eps(eps) -> str:
    """An eps on the pixel scale as 'k/255' when it is one (``8/255``), else 4 significant digits."""
    if eps is None:
        return "-"
    if eps == 0:
        return "0"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"
