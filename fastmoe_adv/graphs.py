"""CUDA graphs for the attack loops and the training steps: capture one iteration, replay it.

Why: one PGD iteration, or one training forward/backward, of nine ResNet-18s launches hundreds
of small kernels, and at batch 128 the GPU spends most of its time waiting for the host to
launch them. A CUDA graph replays all of an iteration's kernels with one launch.

The rules every graphed path in this package follows:

- A ``GraphSet`` owns static device buffers and the bodies captured over them. Before each
  call the caller writes its inputs into the buffers (``load``: copies and fills, no host
  sync); each body reads and writes only those buffers (and returns tensors that the caller
  reads before the next replay of the same body). Values that change between calls (images,
  labels, eps, alpha, per-expert step counts, a step counter) live in these buffers, so one
  capture serves every call of the same shapes.
- The bodies of a set share one memory pool. A body's temporaries are dead once its replay
  ends, and the only tensors read across bodies are the static buffers (allocated outside any
  capture), so sharing is safe in whatever order the bodies are captured and replayed.
- The set's key holds everything the recorded kernels depend on (``signature``: shapes,
  dtypes, strides and devices of the inputs; autocast; every submodule's plain settings (its
  train/eval mode, ``executor``, ``bn_backend``, a mixture's ``temperature`` and ``mix``, ...);
  the storage, shape and dtype of every parameter and buffer; with ``fold_bn`` in eval mode,
  every parameter's version, since the folded weights are refolded into new tensors after any
  change). A call that changes any of it gets another set: never a stale graph. At most
  ``MAX_SETS`` sets are kept per owner (the least recently used is dropped, and with it its
  graphs and their memory).
- Warm-up (it resolves ``executor="auto"`` probes, compiles Triton kernels and initialises
  cuBLAS/cuDNN) runs on a side stream before capture; inside warm-up and capture ``graphing()``
  is true, and the ``executor="auto"`` probe then times each executor as a graph replay.
  Everything warm-up changes, the static buffers and the owner's module buffers (BatchNorm
  running statistics in train mode), is restored before the real first run.
- Under autocast, capture runs with the autocast cache off (a weight cast cached during the
  capture would be freed while the graph still reads it).
- A capture that fails (an operation that cannot be captured) is reported once as a warning
  and in ``explain()``; that body then runs uncaptured for this set: slower, never wrong.
- Without CUDA there are no graphs: a set on another device runs the same bodies on the same
  static buffers eagerly (``emulated``). That is how the CPU tests check the graphed code
  paths against the plain loops; it gains no speed.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

__all__ = ["GraphSet", "graph_set", "train_step", "signature", "explain", "records", "clear", "graphing",
           "autocast_dtype", "MAX_SETS", "WARMUP"]

MAX_SETS = 8      # graph sets kept per owner module (each holds its graphs' memory pool)
WARMUP = 2        # eager runs of a body on a side stream before it is captured

_SETS: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_RECORDS: list = []
_LOCK = threading.Lock()
_SCOPE = threading.local()


def graphing() -> bool:
    """True while a body is warmed up or captured (on this thread): ``executor="auto"`` then
    times the executors as graph replays, which is how they will run."""
    return getattr(_SCOPE, "active", False)


@contextlib.contextmanager
def _graphing_scope():
    previous = graphing()
    _SCOPE.active = True
    try:
        yield
    finally:
        _SCOPE.active = previous


@dataclass(frozen=True)
class Record:
    """One capture: which owner and body, on which key, and how it went."""

    owner: str
    body: str
    status: str      # "captured" | "failed: <error>" | "emulated"
    key: tuple

    def describe(self) -> str:
        return f"{self.owner}.{self.body}: {self.status}"


# ----------------------------------------------------------------------------- keys
def _tensor_sig(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.stride(), str(t.device)


def autocast_dtype(device_type: str):
    """The dtype of the autocast active for ``device_type`` on this thread, None when off
    (torch 2.1+: before 2.4 only the CUDA state is readable)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def _autocast_sig() -> tuple:
    return ("cuda", autocast_dtype("cuda"))


def signature(modules=(), tensors=(), extra=()) -> tuple:
    """The key of a graph set: what the recorded kernels depend on (see the module docstring)."""
    mods = []
    for module in modules:
        mods.append(tuple(_settings(m) for m in module.modules()))
        mods.append(tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in module.parameters()))
        mods.append(tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in module.buffers()))
        mods.append(tuple(_cache_versions(m) for m in module.modules()))
    return (tuple(extra), tuple(_tensor_sig(t) for t in tensors), _autocast_sig(), tuple(mods))


_SETTING_TYPES = (bool, int, float, str, tuple, type(None))


def _settings(module) -> tuple:
    """A module's plain public attributes (train/eval mode, executor, bn_backend, temperature,
    mix, eps, ...): a graph bakes in the values it was captured with."""
    return tuple((k, v) for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, _SETTING_TYPES))


def _cache_versions(module) -> tuple:
    """A mixture with ``fold_bn`` in eval mode computes from folded copies of its weights, which
    are refolded (new tensors) after any parameter or statistic changes: its key then holds every
    parameter's and buffer's in-place version, so a graph never replays stale or freed weights."""
    if getattr(module, "fold_bn", False) and hasattr(module, "experts") and not module.experts.training:
        return tuple(t._version for t in itertools.chain(module.parameters(), module.buffers()))
    return ()


def _autocast_without_cache():
    dtype = autocast_dtype("cuda")
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype, cache_enabled=False)


# ----------------------------------------------------------------------------- the set
class GraphSet:
    """Static buffers plus the bodies captured over them (see the module docstring).

    ``buf``: the static tensors by name. ``load(**values)`` writes a call's inputs into them.
    ``run(name, body)`` runs body ``name``: its graph's replay on CUDA (captured on first use),
    the body itself elsewhere or where capture failed. Returns what the body returned at capture
    (the replay rewrites those tensors: read them before the next ``run`` of the same name).
    """

    def __init__(self, owner: torch.nn.Module, key: tuple, buffers: dict):
        self.owner_name, self.key = type(owner).__name__, key
        self._owner = weakref.ref(owner)
        self.buf = SimpleNamespace(**buffers)
        devices = {t.device.type for t in buffers.values()}
        self.emulated = devices != {"cuda"}
        self.graphs: dict = {}
        self.outputs: dict = {}
        self.failed: dict = {}
        self.pool = None
        self.replays = 0

    def load(self, **values) -> None:
        """Write inputs into the static buffers: tensors are copied, numbers filled (no sync)."""
        for name, value in values.items():
            dst = getattr(self.buf, name)
            if isinstance(value, torch.Tensor):
                dst.copy_(value)
            else:
                dst.fill_(value)

    def run(self, name, body: Callable):
        if self.emulated or name in self.failed:
            if self.emulated and name not in self.graphs:
                self.graphs[name] = None
                _record(self, name, "emulated")
            return body()
        graph = self.graphs.get(name)
        if graph is None:
            graph = self._capture(name, body)
            if graph is None:
                return body()
        graph.replay()
        self.replays += 1
        return self.outputs[name]

    # ------------------------------------------------------------------ capture
    def _state(self) -> list:
        owner = self._owner()
        module_buffers = list(owner.buffers()) if owner is not None else []
        return list(vars(self.buf).values()) + module_buffers

    def _capture(self, name, body):
        tensors = self._state()
        saved = [t.clone() for t in tensors]
        try:
            graph, out = self._capture_graph(body)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager body
            _restore(tensors, saved)
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.failed[name] = message
            _record(self, name, f"failed: {message}")
            warnings.warn(f"fastmoe_adv: CUDA graph capture of {self.owner_name}.{name} failed ({message}); "
                          f"this step runs uncaptured (same result, no speed-up).", RuntimeWarning, stacklevel=4)
            return None
        _restore(tensors, saved)
        self.graphs[name], self.outputs[name] = graph, out
        self.pool = self.pool if self.pool is not None else graph.pool()
        _record(self, name, "captured")
        return graph

    def _capture_graph(self, body):
        """Warm up on a side stream, then capture on the same stream (per-stream library state,
        such as a cuBLAS workspace, is then created before the capture, not during it); returns
        (graph, body's outputs)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _autocast_without_cache(), _graphing_scope():
            for _ in range(WARMUP):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side), _autocast_without_cache(), _graphing_scope():
            out = body()
        return graph, out


def _restore(tensors, saved) -> None:
    with torch.no_grad():
        for t, s in zip(tensors, saved):
            t.copy_(s)


def _record(gs: GraphSet, name, status) -> None:
    with _LOCK:
        _RECORDS.append(Record(gs.owner_name, str(name), status, gs.key[0]))


# ----------------------------------------------------------------------------- a training step
def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               loss_fn: Callable) -> tuple:
    """One optimizer step whose forward and gradients are one captured CUDA graph.

    ``loss_fn(x, y) -> (loss, stats)`` runs ``net`` (in whatever mode and autocast the caller
    set) and returns the scalar loss and a tensor of statistics (accuracy counts, ...). Its
    forward and ``torch.autograd.grad(loss, params)`` over the optimizer's trainable parameters
    are captured on static copies of x and y; each call copies x and y in, replays, hands the
    captured gradients to the parameters' ``.grad`` and runs ``optimizer.step()`` eagerly (so
    learning-rate schedules work unchanged). Returns (loss, stats), detached copies. The same
    function as ``loss.backward(); optimizer.step()``; x and y must keep their shapes from call
    to call to reuse the capture (a new shape captures anew). ``loss_fn`` should run ``net``
    only: what the warm-up runs change in ``net``'s buffers (BatchNorm statistics) is undone
    before the first real step, in other modules' it is not. Not for DistributedDataParallel,
    whose all-reduce runs in backward hooks that the captured gradients do not fire.
    """
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("graphs.train_step: DistributedDataParallel's gradient all-reduce runs in backward hooks "
                         "that a captured step does not fire; run DDP training uncaptured")
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    key = signature((net,), (x, y), ("train", tuple(p.data_ptr() for p in params)))
    gs = graph_set(net, key, lambda: dict(x=torch.empty_like(x), y=torch.empty_like(y)))
    gs.load(x=x, y=y)

    def body():
        loss, stats = loss_fn(gs.buf.x, gs.buf.y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), stats.detach(), [_like_param(g, p) for g, p in zip(grads, params)]

    loss, stats, grads = gs.run("train", body)
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = g      # the graph's static gradient: read by this step, rewritten by the next replay
    optimizer.step()
    return loss.clone(), stats.clone()


def _like_param(grad, param):
    """The gradient in its parameter's memory layout, as ``backward()`` would store it (the
    optimizer's multi-tensor kernels take their fast path only when the layouts agree)."""
    if grad is None or grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


# ----------------------------------------------------------------------------- the cache
def graph_set(owner: torch.nn.Module, key: tuple, make_buffers: Callable[[], dict]) -> GraphSet:
    """The set of ``owner`` for ``key``, made (with ``make_buffers()``) on first use."""
    with _LOCK:
        sets = _SETS.get(owner)
        if sets is None:
            sets = _SETS[owner] = OrderedDict()
        gs = sets.get(key)
        if gs is not None:
            sets.move_to_end(key)
            return gs
    gs = GraphSet(owner, key, make_buffers())
    with _LOCK:
        sets[key] = gs
        while len(sets) > MAX_SETS:
            sets.popitem(last=False)
    return gs


def records() -> list:
    """Every capture so far (``Record``s), oldest first."""
    with _LOCK:
        return list(_RECORDS)


def explain() -> str:
    """One line per captured (or failed, or emulated) body."""
    return "\n".join(r.describe() for r in records()) or "no CUDA graphs captured"


def clear() -> None:
    """Drop every graph set (and the memory of their graphs) and the records."""
    with _LOCK:
        _SETS.clear()
        _RECORDS.clear()
