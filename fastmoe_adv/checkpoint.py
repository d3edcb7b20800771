"""Checkpoints that are safe to load and cannot be half-written.

- ``save_checkpoint`` accepts only what ``torch.load(weights_only=True)`` can read back (tensors,
  dicts, lists, tuples, str, int, float, bool, None; also bytes, torch.Size/dtype/device), checks
  that BEFORE writing and names the key path of anything else; ``to_plain`` converts configs
  (dataclasses, namedtuples, Paths, numpy scalars/arrays, enums, sets) to that vocabulary.
  The write is atomic: a temp file in the same folder, flushed and fsynced, then ``os.replace``
  onto the target; a crash leaves the previous checkpoint intact and no temp file behind.
- ``load_checkpoint`` always uses ``weights_only=True``. When that refuses a file, the file's
  pickle opcodes are scanned (never executed) to tell a file that would run code
  (``UnsafeCheckpointError``) from a corrupt one (``ValueError``).
- ``capture_rng_state`` / ``restore_rng_state``: Python, numpy, torch CPU and CUDA generators as
  tensors and plain values, so they travel inside a weights-only checkpoint.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import io
import os
import pickletools
import random
import secrets
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, UserError

__all__ = ["save_checkpoint", "load_checkpoint", "to_plain", "UnsafeCheckpointError", "capture_rng_state",
           "restore_rng_state"]


class UnsafeCheckpointError(UserError, ValueError):
    """The checkpoint's pickle references code outside torch's weights-only allowlist: refused."""


# --------------------------------------------------------------------------------- plain payloads
_SCALARS = (str, int, float, bool, bytes, type(None))
_TORCH_VALUES = (torch.Size, torch.dtype, torch.device)


def _check_plain(obj, path: str, active: set) -> None:
    t = type(obj)
    if t in _SCALARS or t in _TORCH_VALUES or t is torch.Tensor or t is torch.nn.Parameter:
        return
    if t in (dict, collections.OrderedDict, list, tuple):
        if id(obj) in active:
            raise TypeError(f"{path}: the payload contains a reference cycle")
        active.add(id(obj))
        if t in (list, tuple):
            for i, v in enumerate(obj):
                _check_plain(v, f"{path}[{i}]", active)
        else:
            for k, v in obj.items():
                if type(k) not in _SCALARS and type(k) is not tuple:
                    raise TypeError(f"{path}: dict key {k!r} of type {type(k).__qualname__} is not allowed; "
                                    "keys must be str, int, float, bool or None")
                _check_plain(v, f"{path}[{k!r}]", active)
        active.discard(id(obj))
        return
    hint = " (convert it with to_plain())" if _convertible(obj) else ""
    raise TypeError(f"{path}: {t.__module__}.{t.__qualname__} is not allowed in a checkpoint{hint}; a payload "
                    "holds only tensors, dicts, lists, tuples, str, int, float, bool and None (what "
                    "torch.load(weights_only=True) reads back)")


def _convertible(obj) -> bool:
    return (dataclasses.is_dataclass(obj) or isinstance(obj, (tuple, dict, list, set, frozenset, os.PathLike,
                                                              np.generic, np.ndarray, enum.Enum, int, float, str)))


def to_plain(obj):
    """``obj`` rewritten with only checkpoint-safe types, recursively: dataclass instances and
    namedtuples -> dicts of their fields; dict subclasses -> dict (OrderedDict kept, with a
    state_dict's ``_metadata``); sets -> sorted lists; ``os.PathLike`` -> str; enums -> their
    value; numpy scalars -> Python scalars; numpy arrays -> tensors; subclasses of int/float/str
    -> the base type. Tensors and plain values pass through. Anything else -> TypeError."""
    return _to_plain(obj, "obj")


def _to_plain(obj, path):
    t = type(obj)
    if t in _SCALARS or t in _TORCH_VALUES or t is torch.Tensor or t is torch.nn.Parameter:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(torch.Tensor) if t is not torch.Tensor else obj
    if isinstance(obj, enum.Enum):
        return _to_plain(obj.value, f"{path}.value")
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return [_to_plain(v, f"{path}[{i}]") for i, v in enumerate(obj.tolist())]
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name), f"{path}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {k: _to_plain(v, f"{path}.{k}") for k, v in zip(obj._fields, obj)}
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        items = [(_to_plain(k, f"{path} key {k!r}"), _to_plain(v, f"{path}[{k!r}]")) for k, v in obj.items()]
        if isinstance(obj, collections.OrderedDict):
            out = collections.OrderedDict(items)
            if hasattr(obj, "_metadata"):   # nn.Module.state_dict() keeps per-module versions here
                out._metadata = _to_plain(obj._metadata, f"{path}._metadata")
            return out
        return dict(items)
    if isinstance(obj, (list, tuple)):
        out = [_to_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return tuple(out) if isinstance(obj, tuple) else out
    if isinstance(obj, (set, frozenset)):
        items = [_to_plain(v, f"{path} item") for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    raise TypeError(f"to_plain: {path} is a {t.__module__}.{t.__qualname__}, which has no plain equivalent")


# --------------------------------------------------------------------------------- save / load
def save_checkpoint(path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (parent folders created); returns the path.

    TypeError (naming the key path) if ``payload`` holds anything but tensors, dicts, lists,
    tuples, str, int, float, bool, None (plus bytes, torch.Size/dtype/device); use ``to_plain``
    for configs. On any error the file previously at ``path`` is untouched and the temp file
    is removed."""
    if type(payload) not in (dict, collections.OrderedDict):
        raise TypeError(f"save_checkpoint: payload must be a dict, got {type(payload).__qualname__}")
    _check_plain(payload, "payload", set())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)     # make the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load(path, map_location=map_location, weights_only=True)``, with clear errors:
    FileNotFoundError if missing; UnsafeCheckpointError (a ValueError) if the file's pickle
    references code torch's weights-only loader does not allow (nothing in it is executed);
    ValueError naming the file if it is corrupt, truncated or not a torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                f"refused to load checkpoint {path}: loading it would execute code (its pickle imports and "
                f"calls {', '.join(sorted(unsafe))}, which torch.load(weights_only=True) does not allow; a checkpoint "
                "written by save_checkpoint holds only tensors and plain values). Load it with "
                "torch.load(weights_only=False) only if you trust where it came from.") from None
        if isinstance(exc, RuntimeError) and "device" in str(exc) and "zip archive" not in str(exc):
            raise   # e.g. map_location names a device this machine lacks: not the file's fault
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a torch checkpoint "
                         f"(torch.load failed: {type(exc).__name__}: {_short_reason(exc)})") from None


def _short_reason(exc: Exception) -> str:
    # torch's weights-only refusal is a long essay; its one useful line is the unpickler's reason.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Unsupported", "Trying to", "Unpickler", "Can only")):
            return ln[:300]
    return lines[0][:300] if lines else ""


def _allowed_globals() -> set:
    allowed = {"torch.device", "torch.Size", "collections.OrderedDict", "_codecs.encode",
               "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed |= set(_get_allowed_globals())
    except Exception:
        pass
    try:
        for entry in torch.serialization.get_safe_globals():
            obj, name = entry if isinstance(entry, tuple) else (entry, None)
            allowed.add(name or f"{obj.__module__}.{obj.__qualname__}")
    except Exception:
        pass
    return allowed


_PUSH_STRING = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                "BINUNICODE8"}
_NO_PUSH = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "FRAME", "PROTO", "MARK"}


def _pickle_globals(data: bytes) -> set:
    """Every global a pickle stream (or several, back to back) would import, read with
    pickletools' parser: nothing is imported or executed. STACK_GLOBAL names are recovered from
    the strings pushed before it (as the pickler writes them); if they cannot be, the global is
    reported as unresolved, which counts as unsafe."""
    found = set()
    stream = io.BytesIO(data)
    first = True
    while first or stream.read(1) == b"\x80":   # later pickles (legacy torch format) start with PROTO
        if not first:
            stream.seek(-1, io.SEEK_CUR)
        first = False
        recent, memo = [], {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, qual = str(arg).split(" ", 1) if " " in str(arg) else (str(arg), "?")
                    found.add(f"{module}.{qual}")
                    recent.append(None)
                elif name == "STACK_GLOBAL":
                    if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                        found.add(f"{recent[-2]}.{recent[-1]}")
                    else:
                        found.add("<unresolved STACK_GLOBAL>")
                    recent.append(None)
                elif name in _PUSH_STRING:
                    recent.append(arg.decode("latin1") if isinstance(arg, bytes) else arg)
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = recent[-1] if recent else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(arg))
                elif name not in _NO_PUSH:
                    recent.append(None)
                del recent[:-2]
        except Exception:
            break   # not (or no longer) a pickle stream
    return found


def _unsafe_globals(path: Path) -> set:
    """Globals in the checkpoint's pickles that torch's weights-only loader would refuse."""
    streams = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                streams = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:
            with open(path, "rb") as f:       # legacy format or a bare pickle: pickles come first
                streams = [f.read(64 << 20)]
    except Exception:
        return set()
    allowed = _allowed_globals()
    return {g for s in streams for g in _pickle_globals(s) if g not in allowed}


# --------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Python ``random``, numpy's global generator, torch CPU and every CUDA device's generator,
    as tensors / ints / floats / str (weights-only loadable)."""
    version, internal, gauss_next = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(np_name), "key": torch.from_numpy(np_key.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored for the devices present; if
    the saved run had CUDA generators this machine lacks, a warning says they were skipped."""
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"restore_rng_state: expected keys python, numpy, torch (and cuda), missing {missing}")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["bit_generator"], npst["key"].numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    cuda = list(state.get("cuda") or [])
    if cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for i, s in enumerate(cuda[:available]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), i)
        if available < len(cuda):
            warnings.warn(f"restore_rng_state: the state has {len(cuda)} CUDA generators, this machine "
                          f"{available} CUDA devices; the others were not restored", RuntimeWarning, stacklevel=2)
