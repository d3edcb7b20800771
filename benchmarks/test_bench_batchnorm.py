"""Fused BatchNorm (+ residual add, + ReLU) vs its eager torch twin vs torch.compile of the twin.

    python -m pytest benchmarks/test_bench_batchnorm.py --benchmark-only [--benchmark-json out.json]
    FASTMOE_BENCH_QUICK=1 ...     small sizes, few rounds (smoke run)
    FASTMOE_BENCH_COMPILE=0 ...   no torch.compile rows

The activation of the grouped nine-expert ResNet-18's first stage: [128, 9*64, 32, 32] bf16
channels_last (quick: [8, 9*4, 8, 8]). Groups "batchnorm <mode> <epilogue> <passes>": mode train
(batch statistics, running buffers updated) or eval (running statistics, as under an attack);
epilogue "relu" (bn1 of a block) or "add+relu" (bn2 + the residual); passes "fwd" or "fwd+bwd"
(gradients of x, weight, bias and the residual). Rows: the torch twin (F.batch_norm, add, relu;
the reference), triton, and torch.compile of the twin. GPU only: without CUDA every row skips
(the Triton interpreter and CPU batch norm say nothing about the H100 kernels). Each row records
the bytes the fused passes move and the achieved GB/s, next to an x.clone() copy row.
"""
import os

import pytest
import torch
from bench_utils import COMPILE, device_name

from fastmoe_adv.kernels import batch_norm_act, batch_norm_act_torch, dispatch

QUICK = os.environ.get("FASTMOE_BENCH_QUICK", "0") == "1"
CUDA = torch.cuda.is_available()
TRITON_OK = CUDA and dispatch.triton_available() and not dispatch.interpreter_enabled()
SHAPE = (8, 9 * 4, 8, 8) if QUICK else (128, 9 * 64, 32, 32)
BACKENDS = ("torch", "triton", "compile")


def _skip_unless_runnable(backend):
    if not CUDA:
        pytest.skip("GPU only: needs CUDA (the Triton interpreter and CPU batch norm are not timed here)")
    if backend == "triton" and not TRITON_OK:
        pytest.skip("triton rows need compiled kernels on CUDA (triton missing or TRITON_INTERPRET=1)")
    if backend == "compile" and COMPILE == "0":
        pytest.skip("FASTMOE_BENCH_COMPILE=0: no torch.compile rows")


def _inputs():
    c = SHAPE[1]
    x = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    res = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    dy = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = (0.5 + torch.rand(c, device="cuda")).requires_grad_(True)
    b = (0.1 * torch.randn(c, device="cuda")).requires_grad_(True)
    rm, rv = 0.1 * torch.randn(c, device="cuda"), 0.5 + torch.rand(c, device="cuda")
    return x.requires_grad_(True), res.requires_grad_(True), dy, w, b, rm, rv


def _op(backend):
    if backend == "triton":
        return lambda *a, **kw: batch_norm_act(*a, backend="triton", **kw)
    if backend == "torch":
        return batch_norm_act_torch
    # Dynamo caches graphs per code object, at most a few per function: the 8 configurations of
    # this file would exhaust that and silently fall back to eager. Each row compiles afresh.
    torch._dynamo.reset()
    return torch.compile(batch_norm_act_torch)


def _bytes(training, residual, passes, elem):
    """Bytes the fused passes move (full tensors; the [C] vectors are negligible). Training reads x
    twice (statistics first, then the normalization); the backward reads dy, y (ReLU mask) and x
    for the sums, writes dy_hat as the residual gradient, then reads it and x to write dx."""
    fwd = (2 if training else 1) + (1 if residual else 0) + 1
    if passes == "fwd":
        return fwd * elem
    if training:
        bwd = 3 + (1 if residual else 0) + (2 if residual else 3) + 1
    else:
        bwd = 3 + 1 + (1 if residual else 0)
    return (fwd + bwd) * elem


def _run(benchmark, fn, group, backend, nbytes, **info):
    benchmark.group = group
    benchmark.extra_info.update(device="cuda", device_name=device_name("cuda"), torch=torch.__version__,
                                triton=dispatch.triton.__version__ if dispatch.triton_available() else None,
                                backend=backend, reference=backend == "torch", bytes_moved=nbytes, quick=QUICK,
                                shape=list(SHAPE), dtype="bf16", memory_format="channels_last", **info)

    def timed():
        fn()
        torch.cuda.synchronize()

    for _ in range(3):  # warm up: Triton JIT, torch.compile, allocator
        timed()
    if QUICK:
        benchmark.pedantic(timed, rounds=3, iterations=1)
    else:
        benchmark(timed)
    median = benchmark.stats.stats.median
    if median:
        benchmark.extra_info["median_s"] = median
        benchmark.extra_info["achieved_GBps"] = nbytes / median / 1e9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("passes", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("epilogue", ("relu", "add+relu"))
@pytest.mark.parametrize("mode", ("train", "eval"))
def test_bench_batchnorm(benchmark, mode, epilogue, passes, backend):
    _skip_unless_runnable(backend)
    x, res, dy, w, b, rm, rv = _inputs()
    training, residual = mode == "train", res if epilogue == "add+relu" else None
    op = _op(backend)
    leaves = (x, w, b) + ((res,) if residual is not None else ())

    def fwd():
        with torch.no_grad():
            return op(x, w, b, rm, rv, training=training, relu=True, residual=residual)

    def fwd_bwd():
        y = op(x, w, b, rm, rv, training=training, relu=True, residual=residual)
        return torch.autograd.grad(y, leaves, dy)

    nbytes = _bytes(training, residual is not None, passes, x.numel() * x.element_size())
    _run(benchmark, fwd if passes == "fwd" else fwd_bwd, f"batchnorm {mode} {epilogue} {passes}", backend, nbytes,
         path=f"batchnorm-{backend}", mode=mode, epilogue=epilogue, passes=passes)


def test_bench_batchnorm_copy_bandwidth(benchmark):
    """x.clone() of the same activation: the device's practical bandwidth, for reference."""
    _skip_unless_runnable("torch")
    x = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    _run(benchmark, x.clone, "batchnorm copy", "copy", 2 * x.numel() * x.element_size(), path="clone")
