"""What a run leaves on disk and how it comes back: the output folder (lock, overwrite policy,
stale temporaries), models from checkpoints, and the decision to start, resume or skip a phase.

A phase writes ``OUT/phase{N}.pt`` (the finished phase, kept) and ``OUT/last.pt`` (the newest
state, for ``--resume``). At the end of a phase ``phase{N}.pt`` is written before ``last.pt``,
and a ``last.pt`` that says "done" while ``phase{N}.pt`` is missing is copied back to it, so no
kill between the two writes blocks a later resume.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .. import checkpoint
from ..data import dataset_info
from ..errors import CheckpointError, ConfigError, RunDirError
from ..moe import FastSoftMoE
from ..reporting import file_mode
from .config import TrainConfig

__all__ = ["CHECKPOINT_FORMAT", "RunDir", "RunLock", "build_model", "model_from_payload", "load_model"]

CHECKPOINT_FORMAT = "fastmoe_adv.train/1"
_MODEL_KEYS = ("num_experts", "num_classes", "width", "mean", "std", "mix", "temperature", "roles", "gate_hidden")


# ============================================================================ models
def build_model(cfg: TrainConfig, device=None) -> FastSoftMoE:
    """A fresh ``FastSoftMoE`` for ``cfg`` (class count and mean/std from the dataset)."""
    info = dataset_info(cfg.dataset, cfg.data_dir)
    try:
        model = FastSoftMoE(num_experts=cfg.num_experts, num_classes=int(info["num_classes"]), width=cfg.width,
                            mean=tuple(info["mean"]), std=tuple(info["std"]), mix=cfg.mix, backend=cfg.backend,
                            executor=cfg.executor, temperature=cfg.temperature, roles=cfg.expert_roles,
                            gate_hidden=cfg.gate_hidden)
    except (RuntimeError, MemoryError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        raise ConfigError(f"TrainConfig.width: a model of {cfg.num_experts} experts of width {cfg.width} does not "
                          f"fit in memory ({type(exc).__name__}); use a smaller --width") from None
    return model.to(device) if device is not None else model


def model_from_payload(payload, where, map_location="cpu", backend="auto", executor="auto") -> FastSoftMoE:
    """The ``FastSoftMoE`` a training checkpoint holds; CheckpointError naming what is wrong when
    the file is safe but not a complete, consistent fastmoe_adv checkpoint."""
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        keys = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{where}: not a fastmoe_adv training checkpoint (expected keys 'model' and "
                              f"'model_config', got {keys})")
    config, weights = payload["model_config"], payload["model"]
    if not isinstance(config, dict) or set(config) - set(_MODEL_KEYS):
        got = sorted(set(config) - set(_MODEL_KEYS)) if isinstance(config, dict) else repr(config)[:60]
        raise CheckpointError(f"{where}: model_config must be a dict with keys from {list(_MODEL_KEYS)}, got {got}")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: 'model' must be a state dict, got {type(weights).__name__}")
    try:
        model = FastSoftMoE(**config, backend=backend, executor=executor)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: model_config does not describe a valid model ({exc})") from None
    _load_weights(model, weights, where)
    return model.to(map_location) if map_location is not None else model


def _load_weights(model, weights: dict, where: str):
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights)
                   if not hasattr(weights[k], "shape") or tuple(weights[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{name} {keys[:4]}{' ...' if len(keys) > 4 else ''}" for name, keys in
                 (("missing weights", missing), ("unexpected weights", unexpected), ("mis-shaped weights", wrong))
                 if keys]
        raise CheckpointError(f"{where}: the weights do not match its model_config: " + "; ".join(parts))
    model.load_state_dict(weights)


def load_model(checkpoint_path, map_location="cpu", backend: str = "auto", executor: str = "auto") -> FastSoftMoE:
    """The ``FastSoftMoE`` saved in a training checkpoint, in eval mode (loaded with
    ``weights_only=True``: a file that needs code to unpickle is refused with ``UnsafeCheckpointError``)."""
    payload = checkpoint.load_checkpoint(checkpoint_path, map_location=map_location)
    return model_from_payload(payload, str(checkpoint_path), map_location, backend, executor).eval()


# ============================================================================ the run folder
class RunLock:
    """An advisory lock on a run folder: ``OUT/.lock`` held with ``flock`` for the life of the run
    and holding the owner's pid, host and start time.

    The kernel drops a ``flock`` when its process dies, so a lock file whose flock can be taken
    but which still names an owner was left by a run that was killed: that is reported (pid,
    host) and taken over, never silently. A lock naming another host is refused (``flock`` is
    not reliable on every network file system)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fd = None
        self.stale = None     # the dead owner's record, when a stale lock was taken over

    def acquire(self, command: str = "") -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by another run ({_describe(owner)}); wait for it to "
                              "finish or choose another --out") from None
        previous = _read_owner(fd)
        if previous and previous.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise RunDirError(f"{self.path} names a run on another host ({_describe(previous)}); if that run has "
                              f"ended, delete {self.path}")
        self.stale = previous or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)      # an empty lock file: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _read_owner(fd) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


class RunDir:
    """``OUT`` for one phase: its files, its lock, and what a new run may do with what is there."""

    def __init__(self, folder, phase: int):
        self.folder, self.phase = Path(folder), phase
        self.final, self.last = self.folder / f"phase{phase}.pt", self.folder / "last.pt"
        self.metrics = self.folder / "metrics.jsonl"
        self.lock = RunLock(self.folder)

    def prepare(self, command: str, log=print) -> None:
        """Create the folder, lock it, remove temporaries a killed save left behind."""
        if self.folder.exists() and not self.folder.is_dir():
            raise RunDirError(f"--out {self.folder}: expected a folder, got an existing "
                              f"{'file' if self.folder.is_file() else 'non-folder path'}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.lock.acquire(command)
        except PermissionError as exc:
            raise RunDirError(f"--out {self.folder}: not writable ({exc.strerror})") from None
        if self.lock.stale:
            log(f"warning: {self.folder} held a stale lock ({_describe(self.lock.stale)}): that run ended without "
                "releasing it (killed?); taking the folder over")
        for tmp in self.folder.glob(".*.pt.*.tmp"):
            tmp.unlink(missing_ok=True)
            log(f"removed {tmp.name}, left by an interrupted checkpoint write")

    def close(self) -> None:
        self.lock.release()

    def start_state(self, cfg: TrainConfig, resume: bool, overwrite: bool, log=print):
        """``("fresh", None)``, ``("resume", payload)`` or ``("done", payload)`` (the finished phase)."""
        last = self._load(self.last) if self.last.exists() else None
        last_phase = int(last.get("phase", 0)) if isinstance(last, dict) else 0
        if not resume:
            self._refuse_overwrite(last_phase, overwrite)
            return "fresh", None
        if self.final.exists():
            return "done", self._check_config(self._load(self.final), cfg, self.final)
        if last is None or last_phase < self.phase:
            log(f"resume: no phase-{self.phase} checkpoint in {self.folder}; starting phase {self.phase} from scratch")
            return "fresh", None
        if last_phase > self.phase:
            raise RunDirError(f"resume: {self.last} is from phase {last_phase} but {self.final} is missing")
        self._check_config(last, cfg, self.last)
        if last.get("done"):      # killed between the two final writes: phaseN.pt is last.pt
            checkpoint.save_checkpoint(self.final, last)
            log(f"resume: recovered {self.final} from the finished {self.last}")
            return "done", last
        return "resume", last

    def _refuse_overwrite(self, last_phase: int, overwrite: bool):
        held = [p.name for p in (self.final,) if p.exists()]
        if last_phase >= self.phase:      # this phase's state, or a later phase's that a new run would replace
            held.append(f"{self.last.name} (phase {last_phase})")
        if not held:
            return
        if not overwrite:
            raise RunDirError(f"{self.folder} already holds {', '.join(held)}: pass --resume to continue or keep it, "
                              f"or --overwrite to replace it (or choose another --out)")
        self.final.unlink(missing_ok=True)
        if last_phase >= self.phase:
            self.last.unlink(missing_ok=True)

    def _check_config(self, payload: dict, cfg: TrainConfig, where: Path) -> dict:
        try:
            saved = TrainConfig.from_dict(payload["train_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: its train_config is missing or invalid ({exc})") from None
        diffs = cfg.differences(saved, self.phase)
        if diffs:
            raise ConfigError(f"resume: the configuration differs from {where}'s in fields that change phase "
                              f"{self.phase}'s training (" + "; ".join(diffs) + "); pass the checkpoint's values, "
                              "or --overwrite without --resume to start again")
        return payload

    @staticmethod
    def _load(path: Path) -> dict:
        payload = checkpoint.load_checkpoint(path, map_location="cpu")
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a fastmoe_adv training checkpoint (format "
                                  f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r},"
                                  f" expected {CHECKPOINT_FORMAT!r})")
        return payload
