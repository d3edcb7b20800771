"""Which executor runs the experts: a measured fact per device, never an assumption.

``pick_executor(engine, x)`` answers ``"grouped"`` or ``"loop"`` for ``executor="auto"``
(``GroupedResNet18.resolve_executor`` calls it on every forward). In order:

1. ``FASTMOE_EXECUTOR=grouped|loop`` in the environment forces that executor;
   ``FASTMOE_EXECUTOR=probe`` measures on any device, CPU included (see 3).
2. CPU: a fixed table, ``CPU_TABLE``, from ``benchmarks/test_bench_experts.py`` runs. CPU picks
   are deterministic on purpose: the two executors differ in float rounding, and training
   resumed from a checkpoint must end bit-identical on CPU, which a timing-based choice that
   flips between runs would break. Verify the table on a new CPU with the benchmark (its
   ``auto_pick`` column) or ``FASTMOE_EXECUTOR=probe``.
3. CUDA (and any other device): a first-use probe times both executors on the actual shape
   (``probe``) and caches the faster, keyed by device name, experts, width, batch, H, W, dtype,
   memory layout, autocast, BN mode, the kind of pass and whether the caller is being captured
   as a CUDA graph (``fastmoe_adv.graphs``: then each executor is timed as a graph replay, since
   without launch overhead the ranking can change). The probe leaves the engine as it was:
   BatchNorm buffers are saved and restored, gradients come from ``torch.autograd.grad`` (no
   parameter ``.grad`` is written).

Every pick is recorded: ``explain()`` prints what was picked for which shape and why
(the table row or the measured medians), ``decisions()`` returns the records, and
``decide(engine, x)`` returns the record of one call.
"""
from __future__ import annotations

import math
import os
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import graphs

__all__ = ["pick_executor", "decide", "pick_bn_backend", "decide_bn_backend", "probe", "BN_CHOICES", "explain",
           "decisions", "clear", "Decision", "TableRow", "ProbeSettings", "CPU_TABLE", "PROBE_SETTINGS", "ENV_VAR",
           "CHOICES", "work_per_expert"]

ENV_VAR = "FASTMOE_EXECUTOR"
CHOICES = ("grouped", "loop")
BN_CHOICES = ("torch", "triton")   # bn_backend="auto": the unfused ops or the fused Triton op
_ENV_VALUES = CHOICES + ("probe",)


@dataclass(frozen=True)
class TableRow:
    """Use ``executor`` when the pass is one of ``passes``, the batch is >= ``min_batch`` and
    the per-expert work (``work_per_expert``) is >= ``min_work``. The first matching row wins."""

    executor: str
    passes: tuple
    min_batch: int
    min_work: int
    evidence: str       # what was measured (benchmarks/RESULTS.md has the tables)

    def matches(self, passes: str, batch: int, work: int) -> bool:
        return passes in self.passes and batch >= self.min_batch and work >= self.min_work


def work_per_expert(batch: int, width: int, height: int, width_px: int) -> int:
    """batch * width^2 * H * W: proportional to one expert's FLOPs for one pass."""
    return int(batch) * int(width) ** 2 * int(height) * int(width_px)


_ALL_PASSES = ("fwd", "bwd-input", "bwd-params")

# Measured on the 2-core AMD EPYC dev box (torch 2.13, 9 experts, 32x32 images): the
# benchmark (benchmarks/test_bench_experts.py, medians of 5) and interleaved min-of-4..7 probes
# of the engine alone; grouped/loop time ratio, NCHW and channels_last. The box was shared:
# ratios within ~20% are ties. Per-expert work = batch * width^2 * H * W, e.g. w8 b32: 2.1M.
#   pass        grouped faster (g/l)                           loop faster (g/l)
#   fwd         w4b4 .2-.35, w8b8 .4, w4b32 .8, w16b8 .7,      w8b64 1.6-1.9, w16b32 1.3-1.45,
#               w32b4 .8; ties: w8b16, w16b16, w32b8, w4b64    w16b64 1.8-2.2 (benchmark 2.2-2.6)
#               (loop 1.2), w8b32 (benchmark .75-.85 twice,
#               engine-only probes 1.05-1.3)
#   bwd-input   w4b16 .5, w8b8 .5, w8b16 .6-.8, w8b32 .8-.9    w16b32 1.2-1.4, w16b64 1.8-2.0
#               (benchmark PGD-10 .93); ties: w16b16, w8b64
#   bwd-params  w4b4 .3, w8b8 .5, w8b32 .75-.8 (benchmark      w16b32 1.1-1.2, w16b64 1.5-1.7
#               .75-.85), w16b16 .8-.9, w32b4 .6, w32b8 .7;    (benchmark 1.75-1.8)
#               tie: w8b64
# The loop wins only at batch >= 32 with enough work per expert: then E plain oneDNN
# convolutions beat one grouped convolution; below that, the loop's E times more ops (and
# their per-op overhead) lose. Where the two are within noise the table keeps "grouped".
CPU_TABLE: tuple = (
    TableRow("loop", ("fwd",), 32, 4_194_304,
             "forward without grad, batch >= 32, work >= w8b64: loop 1.3-2.6x faster (w8b64, w16b32, w16b64)"),
    TableRow("loop", ("bwd-input", "bwd-params"), 32, 8_388_608,
             "with a backward, batch >= 32, work >= w16b32: loop 1.1-2.0x faster (w16b32, w16b64; "
             "prototype w16b64 fwd+bwd channels_last 0.80 s vs 1.30 s)"),
    TableRow("grouped", _ALL_PASSES, 0, 0,
             "smaller batches or work: grouped 1.1-5x faster (w4b4 .. w8b32, w32b8 with backward), ties "
             "within 20% at w8b16, w16b16, w8b64, w8b32 forward"),
)


@dataclass
class ProbeSettings:
    """How the first-use probe measures: ``warmup`` untimed passes per executor (cuDNN's
    algorithm search with ``cudnn.benchmark``, the allocator), then ``runs`` timed passes per
    executor, interleaved; the median decides. ``timer(run, executor) -> seconds`` times one
    pass (None: wall clock with device synchronization)."""

    runs: int = 5
    warmup: int = 2
    timer: Callable | None = None


PROBE_SETTINGS = ProbeSettings()


@dataclass(frozen=True)
class Decision:
    executor: str            # the choice: "grouped" | "loop" (kind "executor"), "torch" | "triton" (kind "bn_backend")
    source: str              # "env" | "table" | "probe" | "fallback" | "unavailable"
    key: tuple               # see _key() (kind "bn_backend": plus the executor it was measured with)
    reason: str
    timings: dict = field(default_factory=dict)   # probe: choice -> median seconds per pass
    kind: str = "executor"   # what was chosen: "executor" or "bn_backend"

    def describe(self) -> str:
        fields = _KEY_FIELDS + ("for_executor",) if self.kind == "bn_backend" else _KEY_FIELDS
        shape = ", ".join(f"{k}={v}" for k, v in zip(fields, self.key))
        what = "" if self.kind == "executor" else "bn_backend "
        return f"{what}{self.executor} [{self.source}] for ({shape}): {self.reason}"


_KEY_FIELDS = ("device", "experts", "active", "shared_input", "width", "batch", "H", "W", "dtype", "x_layout",
               "w_layout", "autocast", "bn_train", "pass", "cudnn_benchmark", "bn_backend", "graphed")

_LOCK = threading.RLock()
_PROBED: dict = {}          # key -> Decision (probe results, reused)
_LAST: dict = {}            # key -> the latest Decision of any source (for explain())
_DEVICE_NAMES: dict = {}


# ----------------------------------------------------------------------------- the pick
def pick_executor(engine, x) -> str:
    """``"grouped"`` or ``"loop"`` for running ``engine`` (a ``GroupedResNet18``) on ``x``."""
    return decide(engine, x).executor


def decide(engine, x) -> Decision:
    """The full ``Decision`` behind ``pick_executor(engine, x)`` (executor, source, reason)."""
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env not in _ENV_VALUES:
        raise ValueError(f"{ENV_VAR} must be one of {_ENV_VALUES} (or unset), got {os.environ[ENV_VAR]!r}")
    compiling = _is_compiling()
    key = _key(engine, x)
    if env in CHOICES:
        decision = Decision(env, "env", key, f"{ENV_VAR}={env}")
    elif x.device.type == "cpu" and env != "probe":
        decision = _from_table(key, CPU_TABLE)
    else:
        decision = _PROBED.get(key)
        if decision is None:
            if compiling or _capturing(x):
                # Timing needs synchronization, impossible inside torch.compile tracing or CUDA
                # graph capture: say so loudly rather than pick silently.
                what = "torch.compile tracing" if compiling else "CUDA graph capture"
                decision = Decision("grouped", "fallback", key,
                                    f"not measured: first use of this shape was inside {what}")
                warnings.warn(f"fastmoe_adv: executor='auto' met a new shape inside {what}, where it cannot "
                              f"time the executors; using 'grouped' unmeasured. Run one eager forward with the "
                              f"same shape first, or pass executor='grouped'|'loop' explicitly.", RuntimeWarning,
                              stacklevel=4)
            else:
                decision = _probe_and_cache(engine, x, key)
    if not compiling:
        _LAST.pop(key, None)  # re-insert: decisions() lists the latest last
        _LAST[key] = decision
    return decision


def _from_table(key, table) -> Decision:
    d = dict(zip(_KEY_FIELDS, key))
    work = work_per_expert(d["batch"], d["width"], d["H"], d["W"])
    for row in table:
        if row.matches(d["pass"], d["batch"], work):
            return Decision(row.executor, "table", key,
                            f"CPU table: pass {d['pass']}, batch {d['batch']}, work per expert {work:,}: "
                            f"{row.evidence}")
    raise AssertionError("CPU_TABLE must end with a row that matches everything")


def _probe_and_cache(engine, x, key, candidates=None, kind="executor") -> Decision:
    # bn_backend="auto" must never be worse than "torch": a fused kernel that fails on this
    # device (any error, reported in the reason) loses the probe instead of failing the forward.
    tolerate = (Exception,) if kind == "bn_backend" else (torch.cuda.OutOfMemoryError,)
    with _LOCK:
        if key in _PROBED:  # another thread probed it meanwhile
            return _PROBED[key]
        errors = {}
        timings = probe(engine, x, PROBE_SETTINGS.runs, PROBE_SETTINGS.warmup, PROBE_SETTINGS.timer, candidates,
                        tolerate, errors)
        labels = list(timings)
        best = min(labels, key=lambda e: timings[e])
        other = labels[1 - labels.index(best)]
        ratio = timings[other] / timings[best] if timings[best] > 0 else math.inf
        reason = (f"probe: median of {PROBE_SETTINGS.runs} passes, {best} {_fmt_s(timings[best])} vs "
                  f"{other} {_fmt_s(timings[other])} ({ratio:.2f}x)")
        reason += "".join(f"; {e} failed: {msg}" for e, msg in errors.items())
        decision = Decision(best, "probe", key, reason, dict(timings), kind)
        _PROBED[key] = decision
        return decision


def pick_bn_backend(engine, x, executor: str) -> str:
    """``"torch"`` or ``"triton"`` for ``bn_backend="auto"``, running ``executor`` on ``x``."""
    return decide_bn_backend(engine, x, executor).executor


def decide_bn_backend(engine, x, executor: str) -> Decision:
    """The ``Decision`` behind ``pick_bn_backend``. CPU: ``"torch"`` (the fused kernel runs on
    CPU tensors only under the Triton interpreter, a test tool), unless ``FASTMOE_EXECUTOR=probe``.
    CUDA: the first use of a shape times the executor's pass with both (``probe``) and keeps the
    faster, like the executor probe (graph replays when the caller is being captured)."""
    from .kernels.dispatch import triton_available
    env = os.environ.get(ENV_VAR, "").strip().lower()
    compiling = _is_compiling()
    key = _key(engine, x) + (executor,)
    if not triton_available() or (x.device.type == "cpu" and env != "probe"):
        why = "Triton is not installed" if not triton_available() else \
            "CPU: the fused kernel runs on CPU tensors only under the Triton interpreter (a test tool)"
        decision = Decision("torch", "unavailable" if not triton_available() else "table", key, why, kind="bn_backend")
    else:
        decision = _PROBED.get(key)
        if decision is None:
            if compiling or _capturing(x):
                decision = Decision("torch", "fallback", key, "not measured: first use inside tracing or capture",
                                    kind="bn_backend")
                warnings.warn("fastmoe_adv: bn_backend='auto' met a new shape inside torch.compile tracing or CUDA "
                              "graph capture, where it cannot time the backends; using 'torch' unmeasured.",
                              RuntimeWarning, stacklevel=4)
            else:
                candidates = {b: (executor, b) for b in BN_CHOICES}
                decision = _probe_and_cache(engine, x, key, candidates, kind="bn_backend")
    if not compiling:
        _LAST.pop(key, None)
        _LAST[key] = decision
    return decision


# ----------------------------------------------------------------------------- the probe
def probe(engine, x, runs: int = 5, warmup: int = 2, timer: Callable | None = None, candidates=None,
          tolerate=(torch.cuda.OutOfMemoryError,), errors: dict | None = None) -> dict:
    """Median seconds of one pass of each executor (``{"grouped": s, "loop": s}``) on ``x``;
    with ``candidates`` (label -> (executor, bn_backend)), of each candidate instead. A candidate
    that raises one of ``tolerate`` gets ``inf`` (all of them failing re-raises the first error)
    and, given an ``errors`` dict, its error message there.

    The pass is what the caller is doing: with grad mode on and ``x`` requiring grad, forward +
    input gradient (an attack step); with grad mode on and trainable parameters, forward +
    parameter gradients (a training step); else forward only. Runs under the caller's autocast
    and BN mode. BatchNorm buffers are restored afterwards and no ``.grad`` is written. An
    executor that runs out of memory gets ``inf``. While a CUDA graph is being warmed up or
    captured (``graphs.graphing()``), each pass is timed as the replay of its own captured graph.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"probe needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    timer = timer or _wall_timer(x.device)
    experts = (0, x.shape[1]) if x.dim() == 5 else None
    kind = _pass_kind(engine, x)
    params = [p for p in engine.parameters() if p.requires_grad]
    inp = x.detach().requires_grad_(kind == "bwd-input")
    candidates = candidates or {e: (e, None) for e in CHOICES}
    labels = list(candidates)

    def one_pass(label):
        out = engine._forward(inp, experts, *candidates[label])
        if kind == "bwd-input":
            torch.autograd.grad(out.float().sum(), [inp])
        elif kind == "bwd-params":
            torch.autograd.grad(out.float().sum(), params)

    saved = {name: b.detach().clone() for name, b in engine.named_buffers()}
    samples = {e: [] for e in labels}
    failed = {}
    passes = {e: (lambda e=e: one_pass(e)) for e in labels}
    try:
        for e in labels:
            try:
                for _ in range(warmup):
                    one_pass(e)
            except tolerate as exc:
                failed[e] = exc
                _free(x.device)
        if graphs.graphing() and x.device.type == "cuda":
            passes = _as_graph_replays(passes, failed)
        for _ in range(runs):
            for e in labels:
                if e in failed:
                    continue
                try:
                    samples[e].append(float(timer(passes[e], e)))
                except tolerate as exc:
                    failed[e] = exc
                    _free(x.device)
    finally:
        with torch.no_grad():
            for name, b in engine.named_buffers():
                b.copy_(saved[name])
    if errors is not None:
        errors.update({e: f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                       for e, exc in failed.items()})
    if len(failed) == len(labels):
        raise failed[labels[0]]
    return {e: (math.inf if e in failed or not samples[e] else statistics.median(samples[e])) for e in labels}


def _as_graph_replays(passes: dict, failed: dict) -> dict:
    """Each executor's pass captured as a CUDA graph (the caller is being captured: replays are
    what it will run); an executor whose capture fails keeps its eager pass."""
    replays = {}
    for e, run in passes.items():
        if e in failed:
            continue
        graph = torch.cuda.CUDAGraph()
        try:  # on the stream the warm-up passes ran on (the caller's warm-up stream)
            with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
                run()
            replays[e] = graph.replay
        except Exception:  # noqa: BLE001 - timed eagerly instead
            replays[e] = run
    return replays


def _wall_timer(device):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timer(run, executor):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - t0

    return timer


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- records
def decisions() -> list:
    """Every shape's latest ``Decision`` (env, table, probe or fallback), oldest first."""
    return list(_LAST.values())


def explain() -> str:
    """What ``executor="auto"`` picked so far, per shape, and why."""
    if not _LAST:
        return "fastmoe_adv.autotune: no executor='auto' decision yet"
    return "\n".join(d.describe() for d in _LAST.values())


def clear() -> None:
    """Forget the probe cache and the records (the next use of each shape probes again)."""
    with _LOCK:
        _PROBED.clear()
        _LAST.clear()


# ----------------------------------------------------------------------------- helpers
def _pass_kind(engine, x) -> str:
    if not torch.is_grad_enabled():
        return "fwd"
    if x.requires_grad:
        return "bwd-input"
    if any(p.requires_grad for p in engine.parameters()):
        return "bwd-params"
    return "fwd"


def _order(t: torch.Tensor) -> str:
    """The memory layout as the dims ordered by decreasing stride ("0123" = contiguous NCHW,
    "0231" = channels_last)."""
    dims = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return "".join(str(d) for d in dims)


def _device_name(device) -> str:
    if device.type != "cuda":
        return device.type
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_NAMES:
        _DEVICE_NAMES[idx] = torch.cuda.get_device_name(idx)
    return _DEVICE_NAMES[idx]


def _autocast_state(device_type) -> str:
    dtype = graphs.autocast_dtype(device_type)
    return "off" if dtype is None else str(dtype).replace("torch.", "")


def _key(engine, x) -> tuple:
    shared = x.dim() == 4
    active = engine.num_experts if shared else x.shape[1]
    h, w = x.shape[-2], x.shape[-1]
    cudnn = bool(torch.backends.cudnn.benchmark) if x.device.type == "cuda" else None
    return (_device_name(x.device), engine.num_experts, active, shared, engine.width, x.shape[0], h, w,
            str(x.dtype).replace("torch.", ""), _order(x), _order(engine.conv1.weight), _autocast_state(x.device.type),
            bool(engine.training), _pass_kind(engine, x), cudnn, getattr(engine, "bn_backend", "torch"),
            graphs.graphing() and x.device.type == "cuda")


def _is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _capturing(x) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fmt_s(seconds) -> str:
    return "failed (out of memory or an error)" if math.isinf(seconds) else f"{seconds * 1e3:.3f} ms"
