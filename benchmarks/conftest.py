"""Benchmark session setup (helpers live in bench_utils.py).

The Triton interpreter is never timed: ``TRITON_INTERPRET`` is removed from the environment
here, before anything imports triton, and a benchmark session that finds the kernels already
imported in interpreter mode (e.g. ``pytest tests/ benchmarks/`` in one process, where
tests/conftest.py sets it) fails with that explanation.
"""
import os

os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402
from bench_utils import QUICK, cpu_model, cuda_ok, versions  # noqa: E402


# ----------------------------------------------------------------------------- hooks
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastmoe_adv"] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if cuda_ok() else None,
        "quick": QUICK,
        **versions(),
    }


@pytest.fixture(scope="session", autouse=True)
def _never_time_the_interpreter():
    try:
        from fastmoe_adv.kernels import dispatch
    except ImportError:
        return
    if getattr(dispatch, "_INTERPRET_AT_IMPORT", False):
        pytest.fail("fastmoe_adv.kernels was imported with TRITON_INTERPRET=1 (tests/conftest.py sets it): "
                    "run the benchmarks in their own pytest process, `pytest benchmarks/ --benchmark-only`")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _cudnn_benchmark():
    if cuda_ok():
        torch.backends.cudnn.benchmark = True
    yield


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # A run interrupted (run_gpu.sh's timeouts send SIGINT) in the middle of a benchmark's first
    # round leaves a row without data, on which pytest-benchmark's JSON writer crashes and loses
    # every finished row: drop such rows before it writes.
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        bs.benchmarks[:] = [b for b in bs.benchmarks if getattr(getattr(b, "stats", None), "data", None)]
    yield
