"""Where the GPU time goes: torch.profiler over the engine's hot paths, kernel time by category.

    python benchmarks/profile_gpu.py [--out DIR] [--quick] [--only SUBSTR,...]

Workloads (width-64 experts, 9 of them, bf16 autocast, channels_last, train mode unless said):
- ``experts b512 fwd+bwd``: one forward and the gradient of every expert parameter, through the
  grouped executor, the loop executor, each with the fused BatchNorm (``bn_backend="triton"``),
  and the plain ``nn.ModuleList`` of ``ResNet18`` (``ReferenceSoftMoE.experts_forward``);
- ``pgd10 b512``: ``attacks.pgd`` (10 steps) against the whole mixture, eval mode;
- ``phase1 b128 pgd10`` / ``phase2 b128 pgd10``: one ``train.phase1_step`` / ``phase2_step``
  (phase 1: FGSM experts eps 0.03, PGD experts 10 steps; phase 2: PGD-10 on the mixture).
On CUDA, ``+graph`` rows run the same work as CUDA graph replays (``fastmoe_adv.graphs``: the
experts' forward+backward captured once; ``graph=True`` for the attacks and steps), so the
profile shows what removing the launch gaps leaves.
For each: wall time per iteration (CUDA events, median), then one profiled run: GPU kernel time
per iteration by category (``categorize``), the union of kernel intervals (busy time; kernels on
several streams overlap, so the plain sum can exceed the wall time), the idle fraction
``1 - busy / wall``, launches, and the top-10 kernels. Written to DIR/PROFILE.md and
DIR/profile.json (DIR: benchmarks/ by default), with the card, the versions and the command.

Without CUDA it prints "skipped: needs CUDA" and exits 0. ``--device cpu --quick`` is a smoke run
of the same code on CPU (records are CPU operators, not kernels: it checks the plumbing only).
The aggregation (``categorize``, ``kernel_records``, ``summarize``, ``render_markdown``) is pure
and unit-tested on synthetic records in tests/test_profile_tools.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

CATEGORIES = ("conv", "batchnorm", "elementwise", "gemm", "copy+slice", "reduction", "other")
# First match wins, on the lower-cased kernel name. Copies first: a cast is an elementwise kernel
# wrapping direct_copy_kernel, and cuDNN's NHWC grouped convolution copies each group's channels
# out (nhwcSliceCKernel) before convolving. BatchNorm before conv and gemm: torch's and cuDNN's
# BN kernels and this library's Triton ones (_bn_*). "implicit_gemm" is a convolution.
_RULES = (
    ("copy+slice", r"nhwcslicec|slice|direct_copy|copy_kernel|catarraybatchedcopy|memcpy|memset|"
                   r"nchwtonhwc|nhwctonchw|addpadding|transpose"),
    ("batchnorm", r"batch_norm|batchnorm|_bn_|bn_fw|bn_bw|welford|cudnn::bn"),
    ("conv", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|implicit_convolve"),
    ("gemm", r"gemm|cublas|matmul|cutlass"),
    ("reduction", r"reduce|reduction|softmax|cross_entropy|nll_loss|logsumexp|_gated_mix"),
    ("elementwise", r"elementwise|relu|threshold|clamp|add|mul|sign|where|foreach|multi_tensor_apply|"
                    r"_pgd_step|fill"),
)
_COMPILED = tuple((cat, re.compile(pattern)) for cat, pattern in _RULES)
KERNEL_TRACE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


# ============================================================================ pure aggregation
def categorize(name: str) -> str:
    """The category of a kernel, by its name (one of ``CATEGORIES``)."""
    if not isinstance(name, str):
        raise TypeError(f"categorize: expected a kernel name (str), got {type(name).__name__}")
    low = name.lower()
    for cat, pattern in _COMPILED:
        if pattern.search(low):
            return cat
    return "other"


def kernel_records(trace: dict, cats=KERNEL_TRACE_CATS) -> list:
    """``(name, duration_us, start_us)`` of every event of a Chrome trace (``export_chrome_trace``)
    whose ``cat`` is in ``cats`` (GPU kernels, memcpy and memset by default)."""
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError("kernel_records: expected a Chrome trace dict with a 'traceEvents' list, got "
                         f"{type(trace).__name__}{' without traceEvents' if isinstance(trace, dict) else ''}")
    out = []
    for ev in trace["traceEvents"]:
        if isinstance(ev, dict) and ev.get("cat") in cats and ev.get("ph", "X") == "X" and "dur" in ev:
            out.append((str(ev.get("name", "?")), float(ev["dur"]), float(ev.get("ts", 0.0))))
    return out


def _union_us(intervals) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def summarize(records, wall_ms: float, iters: int, top: int = 10) -> dict:
    """Per-iteration figures of ``iters`` profiled iterations.

    records: ``(name, duration_us)`` or ``(name, duration_us, start_us)`` tuples (kernels);
    wall_ms: the median wall time of one iteration, measured without the profiler.
    Returns kernel_ms (sum of durations), busy_ms (union of the intervals; the sum when starts are
    missing), idle_fraction ``max(0, 1 - busy_ms / wall_ms)``, launches, categories (ms per
    category, every one of ``CATEGORIES``) and ``top`` (the longest kernels by total time: name,
    category, ms, launches per iteration, share of kernel time).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"summarize: iters expected a positive int, got {iters!r}")
    if not (isinstance(wall_ms, (int, float)) and wall_ms > 0):
        raise ValueError(f"summarize: wall_ms expected a number > 0, got {wall_ms!r}")
    cats = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict = {}
    intervals, have_starts = [], True
    for rec in records:
        if len(rec) not in (2, 3) or rec[1] < 0:
            raise ValueError(f"summarize: expected (name, duration_us >= 0[, start_us]) records, got {rec!r}")
        name, dur = rec[0], float(rec[1])
        cats[categorize(name)] += dur
        total, count = by_name.get(name, (0.0, 0))
        by_name[name] = (total + dur, count + 1)
        if len(rec) == 3:
            intervals.append((float(rec[2]), float(rec[2]) + dur))
        else:
            have_starts = False
    kernel_us = sum(cats.values())
    busy_us = _union_us(intervals) if have_starts else kernel_us
    ranked = sorted(by_name.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    return {
        "kernel_ms": kernel_us / iters / 1e3,
        "busy_ms": busy_us / iters / 1e3,
        "wall_ms": float(wall_ms),
        "idle_fraction": max(0.0, 1.0 - busy_us / iters / 1e3 / wall_ms),
        "launches": sum(c for _, c in by_name.values()) / iters,
        "categories": {k: v / iters / 1e3 for k, v in cats.items()},
        "top": [{"name": n, "category": categorize(n), "ms": t / iters / 1e3, "launches": c / iters,
                 "share": t / kernel_us if kernel_us > 0 else 0.0} for n, (t, c) in ranked],
    }


def _short(name: str, n: int = 90) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= n else name[:n - 3] + "..."


def render_markdown(results: list, meta: dict) -> str:
    """PROFILE.md: one table per workload group, then each workload's top kernels."""
    lines = [f"# Where the time goes on {meta.get('device', '?')}", "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
             f"cuDNN {meta.get('cudnn')}; {meta.get('date', '')}.", "",
             f"Command: `{meta.get('command', '')}`", "",
             "Wall: median of CUDA-event timed iterations (no profiler). Kernel time: sum of kernel durations "
             "per iteration (torch.profiler); busy: their union (overlapping kernels counted once); idle = "
             "1 - busy / wall. Categories by kernel name (benchmarks/profile_gpu.py `categorize`).", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    head = "| path | wall ms | kernel ms | busy ms | idle | " + " | ".join(CATEGORIES) + " | launches |"
    sep = "|---|" + "---:|" * (5 + len(CATEGORIES))
    groups = []
    for r in results:
        if r["group"] not in groups:
            groups.append(r["group"])
    for g in groups:
        lines += [f"## {g}", "", head, sep]
        for r in (r for r in results if r["group"] == g):
            if "error" in r:
                lines.append(f"| {r['path']} | failed: {_short(r['error'], 120)} |" + " |" * (4 + len(CATEGORIES)))
                continue
            cats = " | ".join(f"{r['categories'][c]:.1f}" for c in CATEGORIES)
            lines.append(f"| {r['path']} | {r['wall_ms']:.1f} | {r['kernel_ms']:.1f} | {r['busy_ms']:.1f} | "
                         f"{100 * r['idle_fraction']:.0f}% | {cats} | {r['launches']:.0f} |")
        lines.append("")
    for r in results:
        if "error" in r:
            continue
        lines += [f"### Top kernels: {r['group']}, {r['path']}", "", "| kernel | category | ms/iter | launches/iter "
                  "| share |", "|---|---|---:|---:|---:|"]
        lines += [f"| `{_short(t['name'])}` | {t['category']} | {t['ms']:.2f} | {t['launches']:.0f} | "
                  f"{100 * t['share']:.1f}% |" for t in r["top"]]
        lines.append("")
    return "\n".join(lines)


def short_table(results: list) -> str:
    """A few columns per workload, for a terminal."""
    rows = [f"{'workload':44s} {'wall ms':>9s} {'busy ms':>9s} {'idle':>5s} {'conv':>7s} {'bn':>7s} {'elem':>7s} "
            f"{'copy':>7s}"]
    for r in results:
        label = f"{r['group']} | {r['path']}"[:44]
        if "error" in r:
            rows.append(f"{label:44s} failed: {r['error'][:80]}")
            continue
        c = r["categories"]
        rows.append(f"{label:44s} {r['wall_ms']:9.1f} {r['busy_ms']:9.1f} {100 * r['idle_fraction']:4.0f}% "
                    f"{c['conv']:7.1f} {c['batchnorm']:7.1f} {c['elementwise']:7.1f} {c['copy+slice']:7.1f}")
    return "\n".join(rows)


# ============================================================================ measuring (needs torch)
def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def time_iterations(fn, iters: int, device: str) -> list:
    """Milliseconds of each of ``iters`` calls: CUDA events on CUDA, perf_counter on CPU."""
    import torch
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def profile_records(fn, iters: int, device: str) -> list:
    """Kernel records of ``iters`` calls under torch.profiler (CPU smoke run: CPU operators)."""
    from torch.profiler import ProfilerActivity, profile
    # CPU activity too on CUDA: kernels are attributed through their launches either way, and
    # kineto versions differ in what a CUDA-only trace keeps.
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        _sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        trace = json.loads(pathlib.Path(path).read_text())
    return kernel_records(trace, KERNEL_TRACE_CATS if device == "cuda" else ("cpu_op",))


# ============================================================================ workloads
class Sizes:
    """Full: the real model. Quick (smoke): tiny, on any device."""

    def __init__(self, quick: bool):
        self.width, self.experts, self.hw = (4, 9, 16) if quick else (64, 9, 32)
        self.big, self.small = (4, 2) if quick else (512, 128)
        self.pgd_steps = 2 if quick else 10
        # (warm-up, timed, profiled) iterations: the b512 fwd+bwd rows take ~0.1 s, an attack ~1 s
        self.light = (1, 2, 1) if quick else (2, 5, 2)
        self.heavy = (1, 2, 1) if quick else (1, 3, 1)


def _models(sizes, device):
    import torch

    import fastmoe_adv as fm
    torch.manual_seed(0)
    with torch.device(device):  # initialising on the device: seconds faster for width 64
        ref = fm.ReferenceSoftMoE(num_experts=sizes.experts, width=sizes.width)
        fast = fm.FastSoftMoE.from_reference(ref, executor="grouped")
    if device == "cuda":
        ref, fast = ref.to(memory_format=torch.channels_last), fast.to(memory_format=torch.channels_last)
    ref.check_inputs = fast.check_inputs = False  # inputs are torch.rand: the per-call pixel check is a sync
    return ref, fast


def _autocast(device):
    import torch
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def _images(device, *shape):
    import torch
    x = torch.rand(*shape, device=device)
    return x.contiguous(memory_format=torch.channels_last) if device == "cuda" and x.dim() == 4 else x


def _experts_step(ref, fast, path, x, device):
    """Forward + gradient of every expert parameter, train mode; ``+graph``: captured once as a
    CUDA graph (``fastmoe_adv.graphs``) and replayed."""
    import torch
    parts = path.split("+")
    if path == "modulelist":
        model, forward = ref, (lambda z: ref.experts_forward(z))
        params = list(ref.experts.parameters())
    else:
        fast.executor, fast.bn_backend = parts[0], "triton" if "fusedbn" in parts else "torch"
        model, forward = fast, (lambda z: fast.experts_forward(z))
        params = list(fast.experts.parameters())
    model.train()

    def body(z=x):
        with _autocast(device):
            out = forward(z)
        return torch.autograd.grad(out.float().sum(), params)
    if "graph" not in parts:
        return body
    from fastmoe_adv import graphs
    gs = graphs.graph_set(model, graphs.signature((model,), (x,), ("profile", path)),
                          lambda: dict(x=torch.empty_like(x)))
    gs.load(x=x)
    return lambda: gs.run("fwd+bwd", lambda: body(gs.buf.x))


def _pgd_step(fast, bn, x, y, sizes, device, graph=False):
    import torch

    from fastmoe_adv import attacks
    fast.executor, fast.bn_backend = "grouped", bn
    fast.eval()
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        with _autocast(device):
            attacks.pgd(fast, x, y, 8 / 255, 2 / 255, sizes.pgd_steps, random_start=True, generator=gen, graph=graph)
    return step


def _phase_step(fast, phase, bn, sizes, device, graph=False, executor="grouped"):
    import torch

    from fastmoe_adv import attacks
    from fastmoe_adv.train import Phase2Attack, TrainConfig, phase1_step, phase2_step
    from fastmoe_adv.train.steps import ExpertsNet
    fast.executor, fast.bn_backend = executor, bn
    gen = torch.Generator(device=device).manual_seed(0)
    opt = torch.optim.SGD(fast.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    b, e, k = sizes.small, sizes.experts, fast.num_classes
    if phase == 1:
        x, y = _images(device, b, e, 3, sizes.hw, sizes.hw), torch.randint(0, k, (b, e), device=device)
        net = ExpertsNet(fast)
        plan = attacks.make_plan(fast.roles, fgsm_eps=0.03, pgd_steps=sizes.pgd_steps, pgd_eps=8 / 255,
                                 pgd_alpha=2 / 255)
        return lambda: phase1_step(fast, net, opt, x, y, plan, generator=gen, bf16=device == "cuda", graph=graph)
    x, y = _images(device, b, 3, sizes.hw, sizes.hw), torch.randint(0, k, (b,), device=device)
    cfg = TrainConfig(width=fast.width, bf16=device == "cuda", channels_last=device == "cuda")
    attack = Phase2Attack("pgd", 8 / 255, 2 / 255, sizes.pgd_steps)
    return lambda: phase2_step(fast, fast, opt, x, y, attack, cfg, generator=gen, graph=graph)


def workloads(sizes, device):
    """(group, path, builder, (warm-up, timed, profiled) iterations) for every workload, most
    telling first; a builder returns the step to time."""
    s = sizes
    big = f"b{s.big}"
    out = []
    graphs = device == "cuda"   # "+graph": CUDA graph replays (fastmoe_adv.graphs); uncaptured elsewhere
    experts = ["grouped", "loop", "grouped+fusedbn", "loop+fusedbn", "modulelist"]
    experts += ["loop+graph", "loop+fusedbn+graph", "grouped+graph"] if graphs else []
    for path in experts:
        out.append((f"experts {big} fwd+bwd", path, lambda ref, fast, p=path: _experts_step(
            ref, fast, p, _images(device, s.big, 3, s.hw, s.hw), device), s.light))
    # (path, bn_backend, executor, graph)
    steps = [("grouped", "torch", "grouped", False), ("grouped+fusedbn", "triton", "grouped", False)]
    steps += [("grouped+graph", "torch", "grouped", True), ("loop+graph", "torch", "loop", True)] if graphs else []
    for phase in (1, 2):
        for path, bn, ex, gr in steps:
            out.append((f"phase{phase} step b{s.small} pgd{s.pgd_steps}", path,
                        lambda ref, fast, ph=phase, bn=bn, ex=ex, gr=gr: _phase_step(fast, ph, bn, s, device, gr, ex),
                        s.heavy))
    for path, bn, _, gr in steps[:3]:
        def pgd(ref, fast, bn=bn, gr=gr):
            import torch
            y = torch.randint(0, fast.num_classes, (s.big,), device=device)
            return _pgd_step(fast, bn, _images(device, s.big, 3, s.hw, s.hw), y, s, device, gr)
        out.append((f"pgd{s.pgd_steps} mixture {big} eval", path, pgd, s.heavy))
    return out


def measure(group, path, builder, counts, ref, fast, device) -> dict:
    """Warm up, time, profile one workload; failures become a row with the error."""
    import torch
    row = {"group": group, "path": path}
    warmup, iters, prof_iters = counts
    try:
        step = builder(ref, fast)
        for _ in range(warmup):  # cuDNN algorithm search, Triton compiles
            step()
        _sync(device)
        times = time_iterations(step, iters, device)
        records = profile_records(step, prof_iters, device)
        row.update(summarize(records, statistics.median(times), prof_iters))
        row["wall_ms_all"] = times
        if device == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    except Exception as exc:  # noqa: BLE001 (one failed workload must not lose the others)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        fast.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return row


def _meta(device, argv, quick):
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001
        triton_version = f"unavailable ({type(exc).__name__})"
    return {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(["benchmarks/profile_gpu.py", *argv]), "quick": quick,
            "note": None if device == "cuda" and not quick else
            ("smoke run: tiny sizes" + ("; CPU operators, not GPU kernels: no timing here means anything"
                                        if device != "cuda" else ""))}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent),
                    help="folder for PROFILE.md and profile.json (default: benchmarks/)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--only", default="", help="comma-separated substrings of 'group | path$' to keep (a trailing "
                                               "$ anchors at the end: 'grouped$' leaves out grouped+fusedbn)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke run of the plumbing, only with --quick")
    args = ap.parse_args(argv)
    import torch
    if args.device == "cpu" and not args.quick:
        ap.error("--device cpu is a smoke run of the plumbing: it needs --quick")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"skipped: needs CUDA (torch {torch.__version__} sees no CUDA device); nothing written")
        return 0
    torch.backends.cudnn.benchmark = True
    sizes = Sizes(args.quick)
    ref, fast = _models(sizes, args.device)
    only = [s for s in args.only.split(",") if s]
    results = []
    meta = _meta(args.device, argv, args.quick)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for group, path, builder, counts in workloads(sizes, args.device):
        if only and not any(s in f"{group} | {path}$" for s in only):
            continue
        results.append(measure(group, path, builder, counts, ref, fast, args.device))
        print(f"[profile_gpu] {group} | {path}: " + (results[-1].get("error") or
                                                    f"{results[-1]['wall_ms']:.1f} ms"), flush=True)
        # written after every workload: a run cut short by its time limit keeps what it measured
        (out / "profile.json").write_text(json.dumps({"meta": meta, "workloads": results}, indent=1))
        (out / "PROFILE.md").write_text(render_markdown(results, meta))
    print(short_table(results))
    print(f"wrote {out / 'PROFILE.md'} and {out / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
