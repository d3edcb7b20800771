"""Kernel device time against the memory floor: ``gated_mix`` (forward, backward) and ``pgd_step``.

    python benchmarks/kernel_floor.py [--out DIR]      # CUDA: the sizes below
    python benchmarks/kernel_floor.py --quick          # CPU, tiny sizes: a check of the script only

pytest-benchmark's rows (test_bench_gated_mix.py, test_bench_pgd_step.py) time a call with a host
clock around a synchronize: what a Python caller waits for, launch path included. This script
times what the GPU does, three ways per kernel, at the sizes of the speed issue (gated_mix
B=8192, E=9, K=10; pgd_step [512, 9, 3, 32, 32]):

- ``events``: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed between
  calls, median): device time plus whatever launch gap the host leaves;
- ``graph``: ``triton.testing.do_bench_cudagraph`` (replays of the call captured as a CUDA
  graph): device time without launch overhead;
- ``floor``: the bytes the kernel must read and write once, over the device-to-device copy
  bandwidth measured in the same run (``torch.Tensor.copy_`` of 1 GiB, also by do_bench).

The target is ``graph / floor <= 2``. Small kernels (gated_mix moves ~3.6 MB, about a
microsecond at full bandwidth) cannot get near it: a launch alone costs a few microseconds, so
their rows are reported as they are. Written to DIR/kernel_floor.json and .md, table printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

FULL = dict(device="cuda", B=8192, E=9, K=10, x=(512, 9, 3, 32, 32), copy_bytes=1 << 30)
QUICK = dict(device="cpu", B=64, E=3, K=10, x=(4, 3, 3, 8, 8), copy_bytes=1 << 22)


def _bench(fn, device, graph=False) -> float:
    """Median milliseconds per call (CPU: wall clock, a smoke check only)."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph
        return float(do_bench_cudagraph(fn, rep=100) if graph else do_bench(fn, warmup=25, rep=100,
                                                                            return_mode="median"))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _cases(cfg, device, dtype):
    """(name, fn, bytes moved once) per kernel variant."""
    from fastmoe_adv.kernels import pgd_step
    from fastmoe_adv.kernels.gated_mix import _gated_mix_backward, _gated_mix_forward
    B, E, K, s = cfg["B"], cfg["E"], cfg["K"], torch.tensor([], dtype=dtype).element_size()
    z = torch.randn(B, E, K, device=device, dtype=dtype)
    g = torch.randn(B, E, device=device, dtype=dtype)
    dy = torch.randn(B, K, device=device, dtype=dtype)
    x = torch.rand(cfg["x"], device=device, dtype=dtype)
    grad, x_nat = torch.randn_like(x), torch.rand_like(x)
    out = torch.empty_like(x)
    eps_be = torch.full(cfg["x"][:2], 8 / 255, device=device)
    n = x.numel()
    return [
        ("gated_mix forward", lambda: _gated_mix_forward(z, g, 0, 1.0), (B * E * K + B * E + B * K + B * E) * s),
        ("gated_mix backward", lambda: _gated_mix_backward(z, g, dy, None, 0, 1.0),
         (B * E * K + B * E + B * K + B * E * K + B * E) * s),
        ("pgd_step, scalar eps", lambda: pgd_step(x, grad, x_nat, 2 / 255, 8 / 255, out=out, validate=False),
         4 * n * s),
        ("pgd_step, per-sample [B,E] eps", lambda: pgd_step(x, grad, x_nat, eps_be / 4, eps_be, out=out,
                                                            validate=False), 4 * n * s + 2 * eps_be.numel() * 4),
        ("pgd_step, validate=True (syncs)", lambda: pgd_step(x, grad, x_nat, 2 / 255, 8 / 255, out=out), 4 * n * s),
    ]


def measure(cfg, dtypes) -> dict:
    device = torch.device(cfg["device"])
    bandwidth = copy_bandwidth(device, cfg["copy_bytes"])
    rows = []
    for dtype in dtypes:
        for name, fn, nbytes in _cases(cfg, device, dtype):
            fn()  # compile / first launch outside the timing
            events = _bench(fn, device)
            graph = _bench(fn, device, graph=True) if "syncs" not in name else None
            floor = nbytes / (bandwidth * 1e9) * 1e3
            rows.append(dict(kernel=name, dtype=str(dtype).replace("torch.", ""), bytes=nbytes, events_ms=events,
                             graph_ms=graph, floor_ms=floor, events_x_floor=events / floor,
                             graph_x_floor=None if graph is None else graph / floor))
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                copy_gb_s=bandwidth, sizes=dict(B=cfg["B"], E=cfg["E"], K=cfg["K"], x=list(cfg["x"])), rows=rows)


def render(result) -> str:
    lines = [f"Kernels against the memory floor on {result['device']} (copy bandwidth "
             f"{result['copy_gb_s']:.0f} GB/s measured in the same run); sizes {result['sizes']}.",
             "", "```",
             f"{'kernel':34s} {'dtype':9s} {'MB':>7s} {'events us':>10s} {'graph us':>9s} {'floor us':>9s} "
             f"{'graph/floor':>11s}"]
    if result["device"] == "cpu":
        lines.insert(1, "CPU smoke run: wall clock under the Triton interpreter, no CUDA graphs; not a measurement.")
    for r in result["rows"]:
        graph = "-" if r["graph_ms"] is None else f"{1e3 * r['graph_ms']:9.1f}"
        ratio = "-" if r["graph_x_floor"] is None else f"{r['graph_x_floor']:10.2f}x"
        lines.append(f"{r['kernel']:34s} {r['dtype']:9s} {r['bytes'] / 1e6:7.2f} {1e3 * r['events_ms']:10.1f} "
                     f"{graph:>9s} {1e3 * r['floor_ms']:9.2f} {ratio:>11s}")
    lines.append("```")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for kernel_floor.json and kernel_floor.md")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on CPU (a check of the script)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.quick:   # the Triton kernels run on CPU tensors only under the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print("kernel_floor.py: full size needs a CUDA device (use --quick on CPU)", file=sys.stderr)
        return 2
    result = measure(cfg, [torch.float32] if args.quick else [torch.float32, torch.bfloat16])
    result["command"] = "python benchmarks/kernel_floor.py" + (" --quick" if args.quick else "")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = render(result)
    (out / "kernel_floor.json").write_text(json.dumps(result, indent=1))
    (out / "kernel_floor.md").write_text(f"# Kernels against the memory floor\n\nCommand: `{result['command']}`\n\n"
                                         f"{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
