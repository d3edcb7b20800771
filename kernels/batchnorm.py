"""BatchNorm2d fused with the residual add and the ReLU of a ResNet basic block.

    y = relu(bn(x) + residual)   (second BN of a block; ``relu`` and ``residual`` are optional)
    bn(x) = (x - mean_c) * rstd_c * weight_c + bias_c

Training: per-channel batch mean and biased variance over (N, H, W), running statistics updated
in place exactly as ``nn.BatchNorm2d`` does (unbiased variance, ``momentum`` weights the new
value). Eval: the running statistics. Both are differentiable in x, weight, bias and residual.

Layers: private ``@triton.jit`` kernels, host launchers, one ``torch.autograd.Function`` and the
public ``batch_norm_act`` that dispatches to it or to the plain-PyTorch twin ``batch_norm_act_torch``.

Memory layout: x [N, C, H, W] is addressed as a 3-D view [P, C, Q] with strides (sP, sC, sQ):
channels_last -> [N*H*W, C, 1] (a program owns a block of channels and walks rows, channel the
fastest axis); contiguous NCHW -> [N, C, H*W] (a program owns whole contiguous planes of one or a
few channels). One set of kernels serves both; the unit stride is specialized by Triton.

Passes: training forward = partial sums over row blocks, a tiny finalize (mean, rstd, running
update), one elementwise apply; training backward = partial sums of dy_hat and dy_hat * x_hat
(writing dy_hat as the residual gradient when there is one), a tiny finalize (dweight, dbias),
one elementwise dx pass; eval forward = the apply alone; eval backward = one pass writing dx and
the partial sums, plus the finalize. Partial sums go to a [2, SPLIT, C] buffer, reduced in a
fixed order: results are deterministic (no atomics). Counted in full-tensor reads and writes, the
second BN of a block (residual and ReLU) costs 4 in the training forward and 7 in the backward;
the unfused F.batch_norm, add and relu cost 3 + 3 + 2 = 8 and 3 (relu) + 2 + 3 (BN) = 8.

Precision: fp16/bf16/fp32 inputs, statistics and accumulation in fp32, one rounding to the input
dtype at the end (the torch twin rounds after the BN and again after the add). The variance is
computed from sums shifted by one sample of each channel, so a large mean does not cancel it away.
fp64 inputs run on the twin (``backend="auto"``) or are refused (``backend="triton"``).
"""
import functools
import math

import torch
import torch.nn.functional as F

from .dispatch import device_guard, triton_available, use_triton

__all__ = ["batch_norm_act", "batch_norm_act_torch"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TILE = 4096  # elements of one [BLOCK_P, BLOCK_C, BLOCK_Q] tile on GPU (16 per thread at 8 warps)
_TILE_INTERPRETER = 16384  # CPU interpreter (tests): fewer, larger programs
_MAX_BLOCK_C = 64  # channels_last: 64 channels = one 128-byte bf16 row segment per tile row
_MIN_RUN = 64  # NCHW: contiguous elements per tile row (several small planes side by side)
_PROGRAMS_PER_SM = 4  # reduction programs per SM the split aims for (memory-bound: keep loads in flight)
_PROGRAMS_INTERPRETER = 2  # interpreter: split rows only a little
_MAX_SPLIT = 1024  # rows of the partial-sum buffer
_MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2
_FINAL_BLOCK_C = 128  # finalize kernels: channels per program
_FINAL_BLOCK_S = 16  # finalize kernels: partial rows per step

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(p0, c0, q0, p_end, C, Q, sP, sC, sQ, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_Q: tl.constexpr):
        """Offsets and mask of the [BLOCK_P, BLOCK_C, BLOCK_Q] tile at (p0, c0, q0); p0, c0 int64."""
        offs_p = p0 + tl.arange(0, BLOCK_P)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        offs = offs_p[:, None, None] * sP + offs_c[None, :, None] * sC + offs_q[None, None, :] * sQ
        mask = (offs_p < p_end)[:, None, None] & (offs_c < C)[None, :, None] & (offs_q < Q)[None, None, :]
        return offs, mask

    @triton.jit
    def _channel_stats(mean_ptr, var_ptr, offs_c, mask_c, eps, EVAL: tl.constexpr):
        """(mean, rstd) per channel: the batch ones saved by the forward, or from the running buffers."""
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        if EVAL:
            rstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32) + eps)
        else:
            rstd = tl.load(var_ptr + offs_c, mask=mask_c, other=0.0)
        return mean, rstd

    @triton.jit
    def _sum_partials(part_ptr, offs_c, mask_c, C, SPLIT, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        """Column sums of both halves of the [2, SPLIT, C] partial buffer, in a fixed order."""
        a1 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        a2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for s0 in range(0, SPLIT, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            m = (offs_s < SPLIT)[:, None] & mask_c[None, :]
            a1 += tl.load(part_ptr + offs_s[:, None] * C + offs_c[None, :], mask=m, other=0.0)
            a2 += tl.load(part_ptr + (SPLIT + offs_s)[:, None] * C + offs_c[None, :], mask=m, other=0.0)
        return tl.sum(a1, axis=0), tl.sum(a2, axis=0)

    @triton.jit
    def _bn_stats_partial_kernel(
        x_ptr,  # input, [P, C, Q] view
        part_ptr,  # out: fp32 [2, SPLIT, C], sums of (x - shift) and (x - shift)^2
        P, C, Q,  # view sizes
        sP, sC, sQ,  # view strides (elements)
        p_per_split,  # rows of P per split (a multiple of BLOCK_P)
        SPLIT,  # number of splits along P
        BLOCK_P: tl.constexpr,  # rows per tile
        BLOCK_C: tl.constexpr,  # channels per program
        BLOCK_Q: tl.constexpr,  # plane elements per tile (1 for channels_last)
    ):
        pid_c = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        # shift = x[0, c, 0]: sums of x - shift keep the variance from cancelling when |mean| >> std
        shift = tl.load(x_ptr + offs_c * sC, mask=mask_c, other=0.0).to(tl.float32)[None, :, None]
        p_start = pid_s * p_per_split
        p_end = tl.minimum(p_start + p_per_split, P)
        acc1 = tl.zeros([BLOCK_P, BLOCK_C, BLOCK_Q], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C, BLOCK_Q], tl.float32)
        for p0 in range(p_start, p_end, BLOCK_P):
            for q0 in range(0, Q, BLOCK_Q):
                offs, mask = _tile(p0, pid_c * BLOCK_C, q0, p_end, C, Q, sP, sC, sQ, BLOCK_P, BLOCK_C, BLOCK_Q)
                d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
                acc1 += d
                acc2 += d * d
        s1 = tl.sum(tl.sum(acc1, axis=2), axis=0)
        s2 = tl.sum(tl.sum(acc2, axis=2), axis=0)
        tl.store(part_ptr + pid_s * C + offs_c, s1, mask=mask_c)
        tl.store(part_ptr + (SPLIT + pid_s) * C + offs_c, s2, mask=mask_c)

    @triton.jit
    def _bn_stats_finalize_kernel(
        x_ptr,  # input (for the shift x[0, c, 0])
        part_ptr,  # fp32 [2, SPLIT, C] from _bn_stats_partial_kernel
        mean_ptr,  # out: fp32 [C] batch mean
        rstd_ptr,  # out: fp32 [C] 1 / sqrt(biased var + eps)
        rm_ptr,  # running mean [C], updated in place (read only if UPDATE_RUNNING)
        rv_ptr,  # running var [C], updated in place (read only if UPDATE_RUNNING)
        C,  # channels
        SPLIT,  # partial rows
        sC,  # channel stride of x
        inv_count,  # 1 / (N*H*W)
        unbias,  # (N*H*W) / (N*H*W - 1): biased -> unbiased variance for the running buffer
        eps,  # added to the variance
        momentum,  # weight of the new statistics in the running ones
        UPDATE_RUNNING: tl.constexpr,  # running buffers given
        BLOCK_S: tl.constexpr,  # partial rows per step
        BLOCK_C: tl.constexpr,  # channels per program
    ):
        offs_c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        s1, s2 = _sum_partials(part_ptr, offs_c, mask_c, C, SPLIT, BLOCK_S, BLOCK_C)
        shift = tl.load(x_ptr + offs_c * sC, mask=mask_c, other=0.0).to(tl.float32)
        d = s1 * inv_count
        var = tl.maximum(s2 * inv_count - d * d, 0.0)
        mean = shift + d
        tl.store(mean_ptr + offs_c, mean, mask=mask_c)
        tl.store(rstd_ptr + offs_c, 1.0 / tl.sqrt(var + eps), mask=mask_c)
        if UPDATE_RUNNING:
            rm = tl.load(rm_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            rv = tl.load(rv_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * (var * unbias)
            tl.store(rm_ptr + offs_c, rm.to(rm_ptr.dtype.element_ty), mask=mask_c)
            tl.store(rv_ptr + offs_c, rv.to(rv_ptr.dtype.element_ty), mask=mask_c)

    @triton.jit
    def _bn_apply_kernel(
        x_ptr,  # input, [P, C, Q] view
        res_ptr,  # residual, same strides as x (read only if HAS_RES)
        y_ptr,  # out, same strides as x
        w_ptr,  # weight [C]
        b_ptr,  # bias [C]
        mean_ptr,  # fp32 batch mean [C], or the running mean if EVAL
        var_ptr,  # fp32 batch rstd [C], or the running var if EVAL
        eps,  # added to the running var (EVAL)
        P, C, Q,  # view sizes
        sP, sC, sQ,  # view strides
        HAS_RES: tl.constexpr,  # add the residual before the ReLU
        RELU: tl.constexpr,  # apply max(., 0)
        EVAL: tl.constexpr,  # statistics from the running buffers
        BLOCK_P: tl.constexpr,  # rows per tile
        BLOCK_C: tl.constexpr,  # channels per tile
        BLOCK_Q: tl.constexpr,  # plane elements per tile
    ):
        p0 = tl.program_id(0).to(tl.int64) * BLOCK_P
        c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
        q0 = tl.program_id(2).to(tl.int64) * BLOCK_Q
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mean, rstd = _channel_stats(mean_ptr, var_ptr, offs_c, mask_c, eps, EVAL)
        scale = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32) * rstd
        bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        offs, mask = _tile(p0, c0, q0, P, C, Q, sP, sC, sQ, BLOCK_P, BLOCK_C, BLOCK_Q)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :, None]) * scale[None, :, None] + bias[None, :, None]
        if HAS_RES:
            y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    # VJP. x_hat = (x - mean) * rstd, z = weight * x_hat + bias (+ residual), y = relu(z) or z.
    #   dy_hat   = dy * [y > 0]  (ReLU; the mask is read from the saved output, as torch's relu does)
    #   dresidual = dy_hat;  dbias = sum dy_hat;  dweight = sum dy_hat * x_hat   (sums over N, H, W)
    #   training (mean, rstd depend on x):  dx = weight * rstd * (dy_hat - dbias / n - x_hat * dweight / n)
    #   eval (running statistics):          dx = weight * rstd * dy_hat
    # This pass computes the per-split partial sums; with EVAL it also writes dx (it needs no sums),
    # with STORE_DRES it writes dy_hat once as the residual gradient (the dx pass then reads it
    # instead of dy and y).
    @triton.jit
    def _bn_bwd_reduce_kernel(
        dy_ptr,  # grad of y, same strides as x
        y_ptr,  # saved output (read only if RELU)
        x_ptr,  # saved input
        w_ptr,  # weight [C] (read only if EVAL)
        mean_ptr,  # fp32 batch mean, or the running mean if EVAL
        var_ptr,  # fp32 batch rstd, or the running var if EVAL
        dres_ptr,  # out: residual grad dy_hat (written only if STORE_DRES)
        dx_ptr,  # out: input grad (written only if EVAL)
        part_ptr,  # out: fp32 [2, SPLIT, C], sums of dy_hat and dy_hat * x_hat
        eps,  # added to the running var (EVAL)
        P, C, Q,  # view sizes
        sP, sC, sQ,  # view strides
        p_per_split,  # rows of P per split
        SPLIT,  # number of splits along P
        RELU: tl.constexpr,  # mask dy by y > 0
        STORE_DRES: tl.constexpr,  # write dy_hat to dres_ptr
        EVAL: tl.constexpr,  # running statistics; write dx here
        BLOCK_P: tl.constexpr,  # rows per tile
        BLOCK_C: tl.constexpr,  # channels per program
        BLOCK_Q: tl.constexpr,  # plane elements per tile
    ):
        pid_c = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mean, rstd = _channel_stats(mean_ptr, var_ptr, offs_c, mask_c, eps, EVAL)
        mean, rstd = mean[None, :, None], rstd[None, :, None]
        scale = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :, None] * rstd
        p_start = pid_s * p_per_split
        p_end = tl.minimum(p_start + p_per_split, P)
        acc1 = tl.zeros([BLOCK_P, BLOCK_C, BLOCK_Q], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C, BLOCK_Q], tl.float32)
        for p0 in range(p_start, p_end, BLOCK_P):
            for q0 in range(0, Q, BLOCK_Q):
                offs, mask = _tile(p0, pid_c * BLOCK_C, q0, p_end, C, Q, sP, sC, sQ, BLOCK_P, BLOCK_C, BLOCK_Q)
                dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if RELU:
                    dy = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0) > 0, dy, 0.0)
                x_hat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
                acc1 += dy
                acc2 += dy * x_hat  # dy is 0 outside the mask
                if STORE_DRES:
                    tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask)
                if EVAL:
                    tl.store(dx_ptr + offs, (dy * scale).to(dx_ptr.dtype.element_ty), mask=mask)
        s1 = tl.sum(tl.sum(acc1, axis=2), axis=0)
        s2 = tl.sum(tl.sum(acc2, axis=2), axis=0)
        tl.store(part_ptr + pid_s * C + offs_c, s1, mask=mask_c)
        tl.store(part_ptr + (SPLIT + pid_s) * C + offs_c, s2, mask=mask_c)

    @triton.jit
    def _bn_bwd_finalize_kernel(
        part_ptr,  # fp32 [2, SPLIT, C] from _bn_bwd_reduce_kernel
        sums_ptr,  # out: fp32 [2, C] = (dbias, dweight)
        C,  # channels
        SPLIT,  # partial rows
        BLOCK_S: tl.constexpr,  # partial rows per step
        BLOCK_C: tl.constexpr,  # channels per program
    ):
        offs_c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        s1, s2 = _sum_partials(part_ptr, offs_c, mask_c, C, SPLIT, BLOCK_S, BLOCK_C)
        tl.store(sums_ptr + offs_c, s1, mask=mask_c)
        tl.store(sums_ptr + C + offs_c, s2, mask=mask_c)

    @triton.jit
    def _bn_bwd_dx_kernel(
        dy_ptr,  # grad of y, or dy_hat already masked (when the reduce pass stored it)
        y_ptr,  # saved output (read only if RELU)
        x_ptr,  # saved input
        w_ptr,  # weight [C]
        mean_ptr,  # fp32 batch mean [C]
        rstd_ptr,  # fp32 batch rstd [C]
        sums_ptr,  # fp32 [2, C] = (sum dy_hat, sum dy_hat * x_hat)
        dx_ptr,  # out: input grad, same strides as x
        inv_count,  # 1 / (N*H*W)
        P, C, Q,  # view sizes
        sP, sC, sQ,  # view strides
        RELU: tl.constexpr,  # mask dy by y > 0 (False when dy_ptr holds dy_hat)
        BLOCK_P: tl.constexpr,  # rows per tile
        BLOCK_C: tl.constexpr,  # channels per tile
        BLOCK_Q: tl.constexpr,  # plane elements per tile
    ):
        p0 = tl.program_id(0).to(tl.int64) * BLOCK_P
        c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
        q0 = tl.program_id(2).to(tl.int64) * BLOCK_Q
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)[None, :, None]
        rstd = tl.load(rstd_ptr + offs_c, mask=mask_c, other=0.0)[None, :, None]
        scale = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :, None] * rstd
        mean_dy = (tl.load(sums_ptr + offs_c, mask=mask_c, other=0.0) * inv_count)[None, :, None]
        mean_dyx = (tl.load(sums_ptr + C + offs_c, mask=mask_c, other=0.0) * inv_count)[None, :, None]
        offs, mask = _tile(p0, c0, q0, P, C, Q, sP, sC, sQ, BLOCK_P, BLOCK_C, BLOCK_Q)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            dy = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0) > 0, dy, 0.0)
        x_hat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        dx = scale * (dy - mean_dy - x_hat * mean_dyx)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _View:
    """x [N, C, H, W] as the 3-D view [P, C, Q] the kernels address, and its memory format."""

    def __init__(self, x):
        n, c, h, w = x.shape
        hw = h * w
        # channels_last unless plain NCHW is contiguous too (C == 1 or H*W == 1: same memory either way)
        self.channels_last = x.is_contiguous(memory_format=torch.channels_last) and (
            not x.is_contiguous() or (hw == 1 and c > 1))
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.channels_last:
            self.P, self.C, self.Q, self.strides = n * hw, c, 1, (c, 1, 1)
        else:
            self.P, self.C, self.Q, self.strides = n, c, hw, (c * hw, hw, 1)
        self.count = n * hw

    def sizes(self):
        return self.P, self.C, self.Q

    def dense(self, t):
        """t in this view's memory format (a copy only when it is not already)."""
        return t.contiguous(memory_format=self.memory_format)


def _config(view: _View, interpreter: bool):
    """(BLOCK_P, BLOCK_C, BLOCK_Q, num_warps) of the tiles; 8 warps at 4096 elements keeps the two
    fp32 accumulators of the reduction kernels at 32 registers per thread on sm_90."""
    tile = _TILE_INTERPRETER if interpreter else _TILE
    if view.channels_last:
        block_q = 1
        block_c = min(_next_pow2(view.C), _MAX_BLOCK_C)
    else:
        block_q = min(_next_pow2(view.Q), tile)
        block_c = min(_next_pow2(view.C), max(1, _MIN_RUN // block_q))
    block_p = max(1, min(_next_pow2(view.P), tile // (block_c * block_q)))
    for axis, size, block in (("channel", view.C, block_c), ("plane", view.Q, block_q)):
        if _cdiv(size, block) > _MAX_GRID_YZ:
            raise ValueError(f"batch_norm_act: expected at most {_MAX_GRID_YZ * block} {axis} elements per "
                             f"program axis for this layout, got {size} (x shape [P, C, Q] = {view.sizes()})")
    n = block_p * block_c * block_q
    num_warps = 8 if n >= 4096 else (4 if n >= 1024 else (2 if n >= 256 else 1))
    return block_p, block_c, block_q, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(view: _View, block_p: int, block_c: int, device):
    """(SPLIT, rows per split) for the reductions: enough programs to fill the device."""
    if device.type == "cuda":
        programs = _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                                else torch.cuda.current_device())
    else:
        programs = _PROGRAMS_INTERPRETER
    p_blocks = _cdiv(view.P, block_p)
    split = max(1, min(p_blocks, _cdiv(programs, _cdiv(view.C, block_c)), _MAX_SPLIT))
    p_per_split = _cdiv(p_blocks, split) * block_p
    return _cdiv(view.P, p_per_split), p_per_split


def _grids(view: _View, blocks):
    block_p, block_c, block_q, _ = blocks
    P, C, Q = view.sizes()
    return (triton.cdiv(P, block_p), triton.cdiv(C, block_c), triton.cdiv(Q, block_q))


def _bn_forward(x, res, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    """Launch the forward on x (already dense in its view's format); returns (y, mean, rstd) with
    mean/rstd the fp32 batch statistics (training) or None (eval)."""
    view = _View(x)
    P, C, Q = view.sizes()
    blocks = _config(view, interpreter=x.device.type == "cpu")
    block_p, block_c, block_q, num_warps = blocks
    y = torch.empty_like(x, memory_format=view.memory_format)
    mean = rstd = None
    with device_guard(x):
        if training:
            mean, rstd = _bn_batch_stats(x, view, blocks, running_mean, running_var, momentum, eps)
            stat_a, stat_b = mean, rstd
        else:
            stat_a, stat_b = running_mean.contiguous(), running_var.contiguous()
        _bn_apply_kernel[_grids(view, blocks)](
            x, res if res is not None else x, y, weight, bias, stat_a, stat_b, eps, P, C, Q, *view.strides,
            HAS_RES=res is not None, RELU=relu, EVAL=not training,
            BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_Q=block_q, num_warps=num_warps,
        )
    return y, mean, rstd


def _bn_batch_stats(x, view, blocks, running_mean, running_var, momentum, eps):
    """Batch mean and rstd (fp32 [C]); updates the running buffers in place when given."""
    P, C, Q = view.sizes()
    block_p, block_c, block_q, num_warps = blocks
    split, p_per_split = _split(view, block_p, block_c, x.device)
    part = torch.empty((2, split, C), dtype=torch.float32, device=x.device)
    _bn_stats_partial_kernel[(triton.cdiv(C, block_c), split)](
        x, part, P, C, Q, *view.strides, p_per_split, split,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_Q=block_q, num_warps=num_warps,
    )
    mean = torch.empty(C, dtype=torch.float32, device=x.device)
    rstd = torch.empty(C, dtype=torch.float32, device=x.device)
    update = running_mean is not None
    rm = running_mean.contiguous() if update else mean
    rv = running_var.contiguous() if update else rstd
    n = view.count
    _bn_stats_finalize_kernel[(triton.cdiv(C, _FINAL_BLOCK_C),)](
        x, part, mean, rstd, rm, rv, C, split, view.strides[1], 1.0 / n, n / (n - 1), eps, momentum,
        UPDATE_RUNNING=update, BLOCK_S=_FINAL_BLOCK_S, BLOCK_C=_FINAL_BLOCK_C, num_warps=4,
    )
    if update:
        for buf, new in ((running_mean, rm), (running_var, rv)):
            if new is not buf:  # a strided buffer: the kernel updated a dense copy
                buf.copy_(new)
            elif hasattr(torch.autograd.graph, "increment_version"):
                # written through a raw pointer: a graph that saved the buffer must see it changed
                torch.autograd.graph.increment_version(buf)
    return mean, rstd


def _bn_backward(dy, x, y, weight, stat_a, stat_b, training, eps, relu, want_dres):
    """Launch the backward. dy, x, y dense in x's format; stat_a/stat_b = batch (mean, rstd) when
    training, running (mean, var) in eval. Returns (dx, sums [2, C] = (dbias, dweight), dres)."""
    view = _View(x)
    P, C, Q = view.sizes()
    blocks = _config(view, interpreter=x.device.type == "cpu")
    block_p, block_c, block_q, num_warps = blocks
    split, p_per_split = _split(view, block_p, block_c, x.device)
    dx = torch.empty_like(x, memory_format=view.memory_format)
    store_dres = want_dres and relu
    dres = torch.empty_like(x, memory_format=view.memory_format) if store_dres else None
    part = torch.empty((2, split, C), dtype=torch.float32, device=x.device)
    sums = torch.empty((2, C), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _bn_bwd_reduce_kernel[(triton.cdiv(C, block_c), split)](
            dy, y if relu else x, x, weight, stat_a, stat_b, dres if store_dres else dx, dx, part, eps,
            P, C, Q, *view.strides, p_per_split, split,
            RELU=relu, STORE_DRES=store_dres, EVAL=not training,
            BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_Q=block_q, num_warps=num_warps,
        )
        _bn_bwd_finalize_kernel[(triton.cdiv(C, _FINAL_BLOCK_C),)](
            part, sums, C, split, BLOCK_S=_FINAL_BLOCK_S, BLOCK_C=_FINAL_BLOCK_C, num_warps=4,
        )
        if training:
            _bn_bwd_dx_kernel[_grids(view, blocks)](
                dres if store_dres else dy, y if relu else x, x, weight, stat_a, stat_b, sums, dx, 1.0 / view.count,
                P, C, Q, *view.strides, RELU=relu and not store_dres,
                BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_Q=block_q, num_warps=num_warps,
            )
    if want_dres and not relu:
        dres = dy
    return dx, sums, dres


class BatchNormActFunction(torch.autograd.Function):
    """(x, weight, bias, residual) -> relu(bn(x) + residual); updates the running buffers in training.

    Saves x, the output y (only with the ReLU: its mask is y > 0; the next convolution keeps y
    alive anyway), the weight and the fp32 batch statistics (training) or the running buffers
    (eval, version-checked like any saved tensor). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu):
        view = _View(x)
        x = view.dense(x)
        res = view.dense(residual) if residual is not None else None
        w, b = weight.contiguous(), bias.contiguous()
        y, mean, rstd = _bn_forward(x, res, w, b, running_mean, running_var, training, momentum, eps, relu)
        stats = (mean, rstd) if training else (running_mean, running_var)
        ctx.save_for_backward(x, y if relu else None, w, *stats)
        ctx.training, ctx.eps, ctx.relu = training, eps, relu
        ctx.has_res = residual is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, y, w, stat_a, stat_b = ctx.saved_tensors
        view = _View(x)
        dy = view.dense(dy.to(x.dtype))
        if not ctx.training:
            stat_a, stat_b = stat_a.contiguous(), stat_b.contiguous()
        dx, sums, dres = _bn_backward(dy, x, y, w, stat_a, stat_b, ctx.training, ctx.eps, ctx.relu,
                                      want_dres=ctx.has_res and ctx.needs_input_grad[3])
        need = ctx.needs_input_grad
        dw = sums[1].to(w.dtype) if need[1] else None
        db = sums[0].to(w.dtype) if need[2] else None
        return dx if need[0] else None, dw, db, dres, None, None, None, None, None, None


def _check_vector(name, t, x, C):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"batch_norm_act: {name} expected a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != (C,):
        raise ValueError(f"batch_norm_act: {name} expected shape ({C},) (C of x {tuple(x.shape)}), "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"batch_norm_act: {name} expected on {x.device} (as x), got {t.device}")
    if t.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"batch_norm_act: {name} expected dtype torch.float32 or {x.dtype} (as x), got {t.dtype}")


def _check_inputs(x, weight, bias, running_mean, running_var, training, momentum, eps, relu, residual):
    """Validate; returns (momentum, eps) as floats."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"batch_norm_act: x expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"batch_norm_act: x expected rank 4 [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"batch_norm_act: x dtype expected one of {_DTYPES}, got {x.dtype}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vector(name, t, x, C)
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm_act: running_mean and running_var expected both given or both None, got "
                         f"running_mean {'None' if running_mean is None else 'a tensor'} and running_var "
                         f"{'None' if running_var is None else 'a tensor'}")
    for name, flag in (("training", training), ("relu", relu)):
        if not isinstance(flag, bool):
            raise ValueError(f"batch_norm_act: {name} expected a bool, got {flag!r}")
    if not training and running_mean is None:
        raise ValueError("batch_norm_act: eval mode (training=False) expected running_mean and running_var, got None")
    if training and x.numel() // max(1, C) <= 1:
        raise ValueError(f"batch_norm_act: training expected more than 1 value per channel, got x of shape "
                         f"{tuple(x.shape)}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"batch_norm_act: momentum expected a float in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"batch_norm_act: eps expected a finite float > 0, got {eps!r}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise ValueError(f"batch_norm_act: residual expected a torch.Tensor or None, got {type(residual).__name__}")
        for what, got, want in (("shape", tuple(residual.shape), tuple(x.shape)), ("dtype", residual.dtype, x.dtype),
                                ("device", residual.device, x.device)):
            if got != want:
                raise ValueError(f"batch_norm_act: residual expected {what} {want} (as x), got {got}")
    return float(momentum), float(eps)


def _triton_ok(x, backend):
    """use_triton plus this op's limits (fp64 or empty x -> twin under auto; fp64 refused if forced)."""
    if not use_triton(x, backend):
        return False
    if x.dtype not in _TRITON_DTYPES:
        if backend == "triton":
            raise ValueError(f"batch_norm_act: backend='triton' expects x dtype in {_TRITON_DTYPES}, got {x.dtype}")
        return False
    return x.numel() > 0


def batch_norm_act(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, relu=True,
                   residual=None, backend="auto"):
    """relu(batch_norm(x) + residual), fused; differentiable in x, weight, bias and residual.

    Args:
        x: [N, C, H, W] fp16/bf16/fp32 (fp64: twin only), contiguous NCHW or channels_last
            (anything else is copied to NCHW); the output has x's memory format and dtype.
        weight, bias: [C] fp32 (or x's dtype), or None (1 and 0); may be views (slices) of a
            bigger parameter.
        running_mean, running_var: [C] buffers (may be slices of bigger ones) or both None.
            Training updates them in place like ``nn.BatchNorm2d``: r = (1 - momentum) r +
            momentum * batch value, unbiased variance for running_var. Eval reads them.
        training: batch statistics (True) or the running ones (False).
        momentum: float in [0, 1]; eps: float > 0 added to the variance.
        relu: apply the ReLU last. residual: optional tensor like x, added before the ReLU.
        backend: "auto" | "triton" | "torch" (see ``use_triton``).

    Raises:
        ValueError naming expected vs given on a bad rank, shape, dtype or device, eval without
        running statistics, training with one value per channel, momentum outside [0, 1] or eps <= 0.
    """
    momentum, eps = _check_inputs(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                                  residual)
    if not _triton_ok(x, backend):
        return _batch_norm_act_torch(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                                     residual)
    C = x.shape[1]
    if weight is None:
        weight = torch.ones(C, dtype=torch.float32, device=x.device)
    if bias is None:
        bias = torch.zeros(C, dtype=torch.float32, device=x.device)
    return BatchNormActFunction.apply(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                                      relu)


def _batch_norm_act_torch(x, weight, bias, running_mean, running_var, training, momentum, eps, relu, residual):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def batch_norm_act_torch(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, relu=True,
                         residual=None):
    """Plain-PyTorch twin of ``batch_norm_act``: F.batch_norm, then the add, then F.relu (same checks)."""
    momentum, eps = _check_inputs(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                                  residual)
    return _batch_norm_act_torch(x, weight, bias, running_mean, running_var, training, momentum, eps, relu, residual)
