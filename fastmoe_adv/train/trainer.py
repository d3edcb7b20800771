"""The loop both phases share, and the two phases themselves (``pretrain``, ``train``).

A ``Trainer`` owns what a phase needs around its step function: device and DDP, the locked
output folder, data streams, optimizer and schedule, seeded generators, checkpoints and exact
resume, metrics, periodic evaluation, signals and divergence. Everything random comes from
seeded generators whose state is checkpointed, and the position inside the epoch and the open
metrics window are saved too, so ``resume=True`` ends where an uninterrupted run would
(bit-identical weights on CPU, under the same executor).

The host syncs with the device only at log boundaries (every ``log_every`` steps): there the
window's loss is read, checked for divergence, and under DDP one all-reduce agrees on both the
stop signal and divergence. Checkpoints are written only from finite weights.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint, data, distributed
from ..autotune import ENV_VAR as EXECUTOR_ENV
from ..checks import unchecked_inputs
from ..errors import TrainingDiverged, user_input
from ..moe import FastSoftMoE
from ..reporting import append_jsonl
from .config import TrainConfig
from .state import CHECKPOINT_FORMAT, RunDir, build_model, model_from_payload
from .steps import (
    ExpertsNet,
    LRSchedule,
    draw_phase1_plan,
    draw_phase2_attack,
    optimizer_groups,
    phase1_step,
    phase2_step,
)

__all__ = ["Trainer", "TrainingInterrupted", "pretrain", "train"]


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived: a checkpoint was written (``checkpoint``) and training stopped."""

    def __init__(self, signum: int, checkpoint: str | None):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name if signum else "interrupt"
        super().__init__(f"training stopped by {name}; checkpoint {checkpoint} (continue with --resume)")


class _StopFlag:
    """SIGTERM/SIGINT set a flag that the loop reads between steps (so the checkpoint it then
    writes is a consistent step boundary); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        return False


class _Timer:
    """Training wall time, excluding evaluation and checkpoint writes (device synchronized)."""

    def __init__(self, device, elapsed=0.0):
        self.device, self.elapsed, self._t0 = device, float(elapsed), None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self._t0 = time.perf_counter()

    def pause(self):
        if self._t0 is not None:
            self._sync()
            self.elapsed += time.perf_counter() - self._t0
            self._t0 = None

    def now(self):
        if self._t0 is None:
            return self.elapsed
        self._sync()
        return self.elapsed + time.perf_counter() - self._t0


class _Streams:
    """One or several ``DeviceLoader`` advanced together (phase 1: one per expert)."""

    def __init__(self, loaders, stack: bool):
        self.loaders, self.stack = list(loaders), stack
        lengths = {len(loader) for loader in self.loaders}
        if len(lengths) != 1:
            raise ValueError(f"the expert streams must have the same number of batches, got {sorted(lengths)}")
        self.steps_per_epoch = lengths.pop()

    def __iter__(self):
        for batches in zip(*self.loaders):
            if self.stack:
                yield torch.stack([b[0] for b in batches], dim=1), torch.stack([b[1] for b in batches], dim=1)
            else:
                yield batches[0]

    def state_dict(self):
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, states):
        if len(states) != len(self.loaders):
            raise ValueError(f"checkpoint has {len(states)} loader states, expected {len(self.loaders)}")
        for loader, s in zip(self.loaders, states):
            loader.load_state_dict(s)


class _Window:
    """Metrics accumulated since the last log line. Sums stay on the device (no sync per step);
    the window is part of the checkpoint, so a resumed run logs what an uninterrupted one would."""

    def __init__(self, t0=0.0):
        self.loss, self.correct, self.n, self.steps, self.images, self.t0 = 0.0, 0, 0, 0, 0, float(t0)

    def add(self, loss, correct, n_pred, n_images):
        self.loss = self.loss + loss.float()
        self.correct = self.correct + correct
        self.n, self.steps, self.images = self.n + n_pred, self.steps + 1, self.images + n_images

    def state_dict(self) -> dict:
        correct = torch.as_tensor(self.correct)
        return {"loss": float(self.loss), "correct": correct.cpu().tolist(), "n": self.n, "steps": self.steps,
                "images": self.images, "t0": self.t0}

    def load_state_dict(self, d: dict, device):
        self.loss = torch.tensor(float(d["loss"]), device=device)
        self.correct = torch.tensor(d["correct"], device=device)
        self.n, self.steps, self.images, self.t0 = int(d["n"]), int(d["steps"]), int(d["images"]), float(d["t0"])


def _stream_seed(seed: int, phase: int, stream: int) -> int:
    return (seed * 1_000_003 + phase * 10_007 + stream * 101) % (2 ** 62)


def _wrap_ddp(net: nn.Module, info: distributed.DistInfo) -> nn.Module:
    if not info.distributed:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(net, device_ids=ids)


class Trainer:
    """The machinery both phases share (see the module docstring). Use as a context manager:
    leaving it releases the run folder and the process group."""

    def __init__(self, cfg: TrainConfig, out_dir, phase: int, resume=False, overwrite=False, progress=True,
                 log=print):
        self.cfg, self.phase, self.progress, self.log = cfg.validate(), phase, progress, log
        self.run_dir = RunDir(out_dir, phase)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.dist = distributed.setup(cfg.device)
        self.device, self.main = self.dist.device, self.dist.is_main
        self.history, self.images = [], None
        try:
            _check_runtime(cfg, self.dist)
            self.status, self.payload = self._start_state(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self.main:
            self.run_dir.close()
        distributed.cleanup(self.dist)

    def _start_state(self, resume, overwrite):
        """Rank 0 locks the folder and decides; the other ranks follow its decision."""
        decision = None
        if self.main:
            try:
                self.run_dir.prepare(f"phase {self.phase}", self.log)
                status, payload = self.run_dir.start_state(self.cfg, resume, overwrite, self.log)
                decision = (status, None)
            except Exception as exc:
                decision = ("error", f"{type(exc).__name__}: {exc}")
                if not self.dist.distributed:
                    raise
        decision = distributed.broadcast_object(decision)
        if decision[0] == "error":
            raise RuntimeError(f"rank 0 could not start the run: {decision[1]}")
        if not self.main and decision[0] != "fresh":
            path = self.run_dir.final if decision[0] == "done" else self.run_dir.last
            payload = checkpoint.load_checkpoint(path, map_location="cpu")
        return decision[0], (payload if decision[0] != "fresh" else None)

    # -------------------------------------------------------------- data
    def load_data(self):
        cfg = self.cfg
        common = dict(root=cfg.data_dir, download=cfg.download, seed=cfg.seed, holdout=cfg.holdout)
        with user_input(f"dataset {cfg.dataset!r}"):
            info = data.dataset_info(cfg.dataset, cfg.data_dir)
            self.images, self.labels = data.load_dataset(cfg.dataset, split="train", size=cfg.train_size, **common)
            self.eval_images = self.eval_labels = None
            if cfg.eval_every >= 0:   # the holdout when there is one: tune on it, never on the test split
                split, size = ("holdout", min(cfg.eval_limit, cfg.holdout)) if cfg.holdout else ("test", cfg.eval_limit)
                self.eval_images, self.eval_labels = data.load_dataset(cfg.dataset, split=split, size=size, **common)
        self.flip = bool(info.get("flip", False))

    def make_streams(self, n_streams: int, stack: bool) -> _Streams:
        cfg = self.cfg
        if len(self.labels) < cfg.batch_size:
            raise ValueError(f"TrainConfig.batch_size: expected at most the {len(self.labels)} training images, "
                             f"got {cfg.batch_size}")
        per_rank = cfg.batch_size // self.dist.world_size   # DeviceLoader's batch_size is per rank
        images, labels = self.images.to(self.device), self.labels.to(self.device)   # one copy for every stream
        loaders = [data.DeviceLoader(images, labels, per_rank, self.device, seed=_stream_seed(cfg.seed, self.phase, s),
                                     augment=cfg.augment, flip=self.flip, drop_last=True, rank=self.dist.rank,
                                     world_size=self.dist.world_size)
                   for s in range(n_streams)]
        return _Streams(loaders, stack)

    # -------------------------------------------------------------- state
    def setup_state(self, model, params, streams):
        cfg = self.cfg
        self.model, self.streams, self.params = model, streams, list(params)
        self.optimizer = torch.optim.SGD(optimizer_groups(model, self.params, cfg, self.phase), lr=cfg.lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.epochs = cfg.pretrain_epochs if self.phase == 1 else cfg.train_epochs
        self.total_steps = self.epochs * streams.steps_per_epoch
        self.schedule = LRSchedule(cfg.schedule, cfg.lr, self.total_steps, cfg.warmup_frac)
        self.choice_gen = torch.Generator().manual_seed(_stream_seed(cfg.seed, self.phase, 9_999))
        self.attack_gen = torch.Generator(device=self.device).manual_seed(
            _stream_seed(cfg.seed + self.dist.rank, self.phase, 7_777))
        self.epoch = self.step_in_epoch = self.global_step = self.images_seen = 0
        self.epoch_end = False
        self.timer, self.window = _Timer(self.device), _Window()
        self._last_window_finite = True
        if self.status == "resume":
            self._restore(self.payload)

    def _state(self, done: bool) -> dict:
        loaders = distributed.all_gather_object(self.streams.state_dict())
        attack_states = distributed.all_gather_object(self.attack_gen.get_state().cpu())
        return checkpoint.to_plain({
            "format": CHECKPOINT_FORMAT, "phase": self.phase, "done": done,
            "model": self.model.state_dict(), "model_config": self.model.config(), "train_config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
            "rng": {"torch": checkpoint.capture_rng_state(), "choice": self.choice_gen.get_state(),
                    "attack": attack_states},
            "loaders": loaders, "world_size": self.dist.world_size,
            "executor": {"config": self.cfg.executor, "env": os.environ.get(EXECUTOR_ENV)},
            "progress": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                         "total_steps": self.total_steps, "steps_per_epoch": self.streams.steps_per_epoch,
                         "images_seen": self.images_seen, "train_time_s": self.timer.now(),
                         "window": self.window.state_dict()},
        })

    def save(self, done=False) -> str:
        """Checkpoint (a collective under DDP). At the end of a phase ``phase{N}.pt`` is written
        before ``last.pt`` (see state.py). Non-finite weights are never written."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]   # BN statistics too
        if not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
            self._diverged("the weights or BatchNorm statistics became non-finite")
        state = self._state(done)
        if self.main:
            if done:
                checkpoint.save_checkpoint(self.run_dir.final, state)
            checkpoint.save_checkpoint(self.run_dir.last, state)
        distributed.barrier()
        return str(self.run_dir.last)

    def _restore(self, payload):
        if int(payload.get("world_size", 1)) != self.dist.world_size:
            raise ValueError(f"resume: the checkpoint was written by a {payload.get('world_size')}-process run, this "
                             f"run has {self.dist.world_size} processes (the data slices and RNG streams would differ)")
        prog = payload["progress"]
        if int(prog["steps_per_epoch"]) != self.streams.steps_per_epoch:
            raise ValueError(f"resume: the checkpoint has {prog['steps_per_epoch']} steps per epoch, this run "
                             f"{self.streams.steps_per_epoch} (different data size, batch size or world size)")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["scheduler"])
        self.epoch, self.step_in_epoch = int(prog["epoch"]), int(prog["step_in_epoch"])
        self.global_step, self.images_seen = int(prog["global_step"]), int(prog["images_seen"])
        self.timer = _Timer(self.device, float(prog["train_time_s"]))
        if "window" in prog:
            self.window.load_state_dict(prog["window"], self.device)
        checkpoint.restore_rng_state(payload["rng"]["torch"])
        self.choice_gen.set_state(payload["rng"]["choice"])
        self.attack_gen.set_state(payload["rng"]["attack"][self.dist.rank].to("cpu"))
        self.streams.load_state_dict(payload["loaders"][self.dist.rank])
        self._note_executor(payload.get("executor") or {})
        if self.main:
            self.log(f"resumed phase {self.phase} at epoch {self.epoch}, step {self.step_in_epoch}/"
                     f"{self.streams.steps_per_epoch} (global step {self.global_step}/{self.total_steps})")

    def _note_executor(self, saved: dict):
        now = {"config": self.cfg.executor, "env": os.environ.get(EXECUTOR_ENV)}
        if saved and saved != now and self.main:
            self.log(f"warning: resuming under executor {now} but the checkpoint was written under {saved}: the "
                     "executors compute the same function up to float rounding, so the result will not be "
                     "bit-identical to an uninterrupted run")

    # -------------------------------------------------------------- the loop
    def fit(self, step_fn, eval_fn, desc: str):
        """Run the remaining steps, then write the final checkpoint. ``step_fn(x, y) ->
        (loss, correct, n)``: ``correct`` a count (or one count per expert) over ``n`` predictions."""
        self.record({"event": "start", "resume": self.status == "resume", "world_size": self.dist.world_size,
                     "device": str(self.device), "total_steps": self.total_steps,
                     "pgd_steps": self.cfg.pgd_steps_scaled, "steps_scale": self.cfg.steps_scale})
        since_ckpt = 0
        # The loader's images and the attacks' outputs are in [0, 1] by construction: the model's
        # per-call pixel check (a host sync) is off inside the loop.
        with _StopFlag() as stop, self._bar(desc) as bar, unchecked_inputs(self.model):
            self.timer.start()
            try:
                for x, y in self._batches():
                    self.schedule.apply(self.optimizer, self.global_step)
                    loss, correct, n_pred = step_fn(x, y)
                    self._advance(x, loss, correct, n_pred)
                    since_ckpt += 1
                    at_log = self._due(self.cfg.log_every)
                    if at_log:
                        self._log_window(bar)
                    self._poll(stop, at_log)
                    if self._eval_due():
                        self._evaluate(eval_fn, bar)
                    if since_ckpt >= self.cfg.checkpoint_every and self.global_step < self.total_steps:
                        self._paused(self.save)
                        since_ckpt = 0
                    if bar is not None:
                        bar.update(1)
            finally:
                self.timer.pause()
        self.save(done=True)

    def _batches(self):
        if self.step_in_epoch >= self.streams.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        while self.epoch < self.epochs:
            for batch in self.streams:
                yield batch
                if self.epoch_end:
                    break

    def _advance(self, x, loss, correct, n_pred):
        # Images trained this step, over all ranks: a phase-1 step trains B images per expert.
        n_images = x.numel() // (x.shape[-3] * x.shape[-2] * x.shape[-1]) * self.dist.world_size
        self.global_step, self.step_in_epoch = self.global_step + 1, self.step_in_epoch + 1
        self.images_seen += n_images
        self.window.add(loss, correct, n_pred, n_images)
        self.epoch_end = self.step_in_epoch >= self.streams.steps_per_epoch
        if self.epoch_end:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _due(self, every: int) -> bool:
        return self.global_step % every == 0 or self.epoch_end or self.global_step == self.total_steps

    def _eval_due(self) -> bool:
        every = self.cfg.eval_every
        return every >= 0 and (self.epoch_end if every == 0 else self.global_step % every == 0)

    def _paused(self, fn, *args):
        self.timer.pause()
        try:
            return fn(*args)
        finally:
            self.timer.start()

    def _log_window(self, bar):
        w, t_now = self.window, self.timer.now()
        loss = float(w.loss) / max(1, w.steps)
        acc = torch.as_tensor(w.correct).double().cpu() / max(1, w.n)
        rec = {"event": "train", "loss": loss, "loss_finite": loss == loss and abs(loss) != float("inf"),
               "acc": float(acc.mean()), "lr": self.optimizer.param_groups[0]["lr"],
               "img_per_s": w.images / max(1e-9, t_now - w.t0), "train_time_s": t_now,
               "steps": [self.global_step - w.steps + 1, self.global_step]}
        if acc.dim():
            rec["expert_acc"] = [round(a, 4) for a in acc.tolist()]
        self.record(rec)
        self.window = _Window(t_now)
        self._last_window_finite = rec["loss_finite"]
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{rec['img_per_s']:.0f}")

    def _poll(self, stop, at_log: bool):
        """Stop signal and divergence: read locally each step in one process; under DDP agreed
        by one all-reduce at log boundaries (no host sync on the other steps)."""
        if self.dist.distributed and not at_log:
            return
        diverged = at_log and not self._last_window_finite
        stopping, diverged = distributed.any_true([stop.signum is not None, diverged], self.device)
        if diverged:
            self._diverged("the training loss became non-finite")
        if stopping:
            self.timer.pause()
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.save(done=False))

    def _diverged(self, what: str):
        last = self.run_dir.last if self.run_dir.last.exists() else None
        kept = f"the last finite checkpoint {last} was kept" if last else "no checkpoint was written"
        self.record({"event": "diverged", "what": what})
        raise TrainingDiverged(f"phase {self.phase} diverged: {what} by step {self.global_step} (metrics.jsonl "
                               f"names the window); {kept}. Lower --lr or check the data", self.global_step,
                               str(last) if last else None)

    def _evaluate(self, eval_fn, bar):
        if self.eval_images is None or not self.main:
            return
        t = time.perf_counter()
        result = self._paused(eval_fn, self.model, self.eval_images, self.eval_labels)
        self.record({"event": "eval", "eval_time_s": round(time.perf_counter() - t, 3), **result})
        if bar is not None:
            bar.write(f"[phase {self.phase}] step {self.global_step}: eval " + ", ".join(
                f"{k} {_fmt(v)}" for k, v in result.items()))

    def record(self, rec: dict):
        rec = {"phase": self.phase, "epoch": self.epoch, "global_step": self.global_step, "run_id": self.run_id,
               **rec}
        self.history.append(rec)
        if self.main:
            append_jsonl(self.run_dir.metrics, rec)

    def _bar(self, desc):
        if not (self.progress and self.main):
            return contextlib.nullcontext()
        from tqdm.auto import tqdm
        return tqdm(total=self.total_steps, initial=self.global_step, desc=desc, unit="step", dynamic_ncols=True)

    # -------------------------------------------------------------- results
    def summary(self, model) -> dict:
        done = self.status == "done"
        prog = self.payload.get("progress", {}) if done else {}
        config = self.payload["train_config"] if done else self.cfg.to_dict()   # reports: the checkpoint's config
        return {"phase": self.phase, "checkpoint": str(self.run_dir.final), "model": model,
                "history": self.history, "already_done": done, "world_size": self.dist.world_size,
                "rank": self.dist.rank, "device": str(self.device), "config": config,
                "train_time_s": float(prog.get("train_time_s", 0.0)) if done else self.timer.elapsed,
                "global_step": int(prog.get("global_step", 0)) if done else self.global_step,
                "total_steps": int(prog.get("total_steps", 0)) if done else self.total_steps,
                "images_seen": int(prog.get("images_seen", 0)) if done else self.images_seen}

    def finished_model(self) -> FastSoftMoE:
        """The finished phase's model, from the payload already read (no second load)."""
        if self.main:
            self.log(f"phase {self.phase} already complete: {self.run_dir.final}")
        return model_from_payload(self.payload, str(self.run_dir.final), self.device, self.cfg.backend,
                                  self.cfg.executor).eval()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "[" + " ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in v) + "]"
    return str(v)


def _check_runtime(cfg: TrainConfig, info: distributed.DistInfo):
    """What the whole pipeline needs, checked before the first step (not after a phase)."""
    from ..errors import ConfigError
    from ..kernels import dispatch
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"TrainConfig.batch_size: expected a multiple of the world size {info.world_size} (it is "
                          f"the global batch), got {cfg.batch_size}")
    for name in ("backend", "bn_backend"):
        if getattr(cfg, name) == "triton" and info.device.type != "cuda" and not dispatch.interpreter_enabled():
            raise ConfigError(f"TrainConfig.{name}: 'triton' needs a CUDA device (this run is on {info.device}); "
                              "use 'auto' or 'torch'")
    if cfg.cuda_graphs and info.world_size > 1:
        raise ConfigError(f"TrainConfig.cuda_graphs: expected False under torchrun with {info.world_size} processes "
                          f"(DDP's gradient all-reduce does not run inside a captured step), got True")


def _prepare_model(model: FastSoftMoE, cfg: TrainConfig, device) -> FastSoftMoE:
    model.bn_backend = cfg.bn_backend        # a runtime choice, like the executor: not in the checkpoint
    model = model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


# ============================================================================ the phases
def pretrain(cfg: TrainConfig, out_dir, resume: bool = False, progress: bool = True, log=print,
             overwrite: bool = False) -> dict:
    """Phase 1: every expert trained on its own stream per its role (see steps.py).

    Writes ``OUT/phase1.pt`` at the end, ``OUT/last.pt`` every ``checkpoint_every`` steps, and
    ``OUT/metrics.jsonl``. Refuses a folder holding a phase-1 result unless ``resume`` (continue
    or keep it) or ``overwrite``. Returns a summary dict (``model``, ``checkpoint``, ``history``,
    ``train_time_s``, ...).
    """
    from ..evaluate.experts import expert_robustness
    with Trainer(cfg, out_dir, 1, resume, overwrite, progress, log) as run:
        if run.status == "done":
            return run.summary(run.finished_model())
        torch.manual_seed(cfg.seed)
        model = _prepare_model(build_model(cfg), cfg, run.device)
        run.load_data()
        roles = list(model.roles)
        run.setup_state(model, model.experts.parameters(), run.make_streams(cfg.num_experts, stack=True))
        net = _wrap_ddp(ExpertsNet(model), run.dist)

        def step_fn(x, y):
            plan = draw_phase1_plan(roles, cfg, run.choice_gen, cfg.eps_ramp(run.global_step, run.total_steps))
            loss, correct = phase1_step(model, net, run.optimizer, x, y, plan, run.attack_gen, cfg.bf16,
                                        graph=cfg.cuda_graphs)
            return loss, correct, y.shape[0]     # per-expert correct counts, over B images each

        def eval_fn(m, images, labels):
            r = expert_robustness(m, images, labels, fgsm_eps=None, pgd_eps=cfg.pgd_eps, pgd_alpha=cfg.pgd_alpha,
                                  pgd_steps=cfg.eval_pgd_steps_scaled, batch_size=cfg.eval_batch_size,
                                  seed=cfg.seed + 12345, graph=cfg.cuda_graphs)
            return {f"expert_{k}": v for k, v in r.items()}

        run.fit(step_fn, eval_fn, "phase 1 (experts)")
        return run.summary(model.eval())


def train(cfg: TrainConfig, out_dir, init=None, resume: bool = False, progress: bool = True, log=print,
          overwrite: bool = False) -> dict:
    """Phase 2: experts + gate trained jointly with randomized adversarial training against the
    whole mixture.

    init: the phase-1 checkpoint path (default ``OUT/phase1.pt``), or a ``FastSoftMoE`` to start
    from. Writes ``OUT/phase2.pt``, ``OUT/last.pt`` and ``OUT/metrics.jsonl``.
    """
    from ..evaluate.experts import mixture_robustness
    with Trainer(cfg, out_dir, 2, resume, overwrite, progress, log) as run:
        if run.status == "done":
            return run.summary(run.finished_model())
        if run.status == "resume":   # the architecture is the checkpoint's; its weights are restored below
            model = model_from_payload(run.payload, str(run.run_dir.last), None, cfg.backend, cfg.executor)
        else:
            model = init_model(cfg, init, run.run_dir.folder)
            model.mix, model.temperature = cfg.mix, cfg.temperature   # phase-2 choices (the gate starts here)
        check_compatible(model, cfg)
        model = _prepare_model(model, cfg, run.device)
        run.load_data()
        run.setup_state(model, model.parameters(), run.make_streams(1, stack=False))
        net = _wrap_ddp(model, run.dist)

        def step_fn(x, y):
            attack = draw_phase2_attack(cfg, run.choice_gen, cfg.eps_ramp(run.global_step, run.total_steps))
            loss, correct = phase2_step(model, net, run.optimizer, x, y, attack, cfg, run.attack_gen, cfg.cuda_graphs)
            return loss, correct, y.numel()

        def eval_fn(m, images, labels):
            r = mixture_robustness(m, images, labels, cfg.pgd_eps, cfg.pgd_alpha, cfg.eval_pgd_steps_scaled,
                                   cfg.eval_batch_size, seed=cfg.seed + 12345, gate=True, graph=cfg.cuda_graphs)
            _warn_gate(r, list(m.roles), run)
            return r

        run.fit(step_fn, eval_fn, "phase 2 (joint)")
        return run.summary(model.eval())


def _warn_gate(result: dict, roles: list, run: Trainer):
    """Phase-2 logs say when the gate ignores its input or starves an expert (evaluate/gate.py)."""
    from ..evaluate.gate import GATE_THRESHOLDS
    if not run.main:
        return
    if result.get("gate_clean_input_dependence", 1.0) < GATE_THRESHOLDS["constant_input_dependence"]:
        run.log(f"warning: step {run.global_step}: the gate is effectively constant (input dependence "
                f"{result['gate_clean_input_dependence']:.4f}); the mixture is a fixed weighted ensemble")
    for e, w in enumerate(result.get("gate_clean", [])):
        if w < GATE_THRESHOLDS["starved_expert_weight"]:
            run.log(f"warning: step {run.global_step}: expert e{e} ({roles[e]}) gets {w:.2%} of the gate weight")


def init_model(cfg: TrainConfig, init, out_dir: Path) -> FastSoftMoE:
    """Phase 2's starting model: ``init`` (a FastSoftMoE or a checkpoint path) or OUT/phase1.pt."""
    if isinstance(init, FastSoftMoE):
        model = FastSoftMoE(**init.config(), backend=cfg.backend, executor=cfg.executor)
        model.load_state_dict(init.state_dict())
        return model
    path = Path(init) if init is not None else Path(out_dir) / "phase1.pt"
    if not path.exists():
        raise FileNotFoundError(f"phase-2 init checkpoint not found: {path} (run pretrain first, or pass "
                                f"--init PATH / init=)")
    payload = checkpoint.load_checkpoint(path, map_location="cpu")
    return model_from_payload(payload, str(path), None, cfg.backend, cfg.executor)


def check_compatible(model: FastSoftMoE, cfg: TrainConfig):
    """The init model must have the configured architecture; the mixing rule and temperature
    are phase-2 choices (the gate is untrained before), so the config's are applied."""
    from ..errors import ConfigError
    for name, want, got in (("width", cfg.width, model.width), ("num_experts", cfg.num_experts, model.num_experts),
                            ("roles", cfg.expert_roles, list(model.roles))):
        if want != got:
            raise ConfigError(f"TrainConfig.{name}: the init model has {got!r}, the config says {want!r} (leave "
                              f"the flag out to take the init checkpoint's value)")
