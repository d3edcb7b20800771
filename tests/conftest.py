"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton: the @triton.jit decorator
decides at decoration time whether a kernel runs compiled or under the CPU interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


# The tests run many tiny ops: one thread is faster than two fighting over small tensors
# (measured 12x on a loaded 2-core machine), and it keeps CPU results deterministic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    # ... also after a test that changed it (the CLI's --threads sets torch's thread count).
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
