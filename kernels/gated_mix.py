"""Gated mixture of expert logits: one fused forward kernel, one fused backward kernel.

    weights  w[b, e] = softmax_e(gate_logits[b, e] / temperature)
    mode "logits":  out[b, k] = sum_e w[b, e] * z[b, e, k]
    mode "probs":   out[b, k] = log sum_e w[b, e] * softmax_k(z[b, e, :])[k]
                              = logsumexp_e(log w[b, e] + log_softmax_k(z[b, e, :])[k])
                    (computed in log space, so tiny weights or probabilities do not underflow)

Layers: private ``@triton.jit`` kernels, host launchers (``_gated_mix_forward`` /
``_gated_mix_backward``) that check inputs, make them contiguous and allocate outputs, one
``torch.autograd.Function``, and the public ``gated_mix`` that dispatches to it or to the
plain-PyTorch twin ``gated_mix_torch``.

The returned weights (``return_weights=True``) are a differentiable output on both backends:
a loss that uses them sends gradient into ``gate_logits`` through them as well.

Precision: fp16/bf16/fp32 inputs accumulate in fp32, fp64 inputs in fp64. Compiled Triton
passes Python float arguments as fp32, so on GPU 1/temperature is rounded to fp32; with fp64
inputs that bounds agreement with the twin to ~1e-7 relative unless 1/temperature is exact
in fp32 (1, 0.5, 2, ...). The CPU interpreter keeps it in double.
"""
import math

import torch

from .dispatch import device_guard, triton_available, use_triton

__all__ = ["gated_mix", "gated_mix_torch", "MODES", "MAX_EXPERTS", "MAX_CLASSES"]

MODES = ("logits", "probs")
MAX_EXPERTS = 64  # E: all experts of a row live in one tile (softmax over E in registers)
MAX_CLASSES = 1024  # K: looped over in chunks of BLOCK_K
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TILE = 1024  # elements of one [BLOCK_B, BLOCK_E, BLOCK_K] tile (see _gated_mix_config)
_MIN_BLOCK_K = 16  # at least 64 contiguous bytes per fp32 row segment
_TILE_INTERPRETER = 16384  # CPU interpreter (tests): fewer, larger programs

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gate_softmax(g_ptr, offs_b, offs_e, mask_be, mask_e, E, inv_temp, ACC: tl.constexpr):
        """Gate softmax over E for a [BLOCK_B, BLOCK_E] tile: (scaled logits, row max, row sum,
        weights). Padded experts get -inf; padded rows stay finite (loaded as 0)."""
        g = tl.load(g_ptr + offs_b[:, None] * E + offs_e[None, :], mask=mask_be, other=0.0).to(ACC)
        g = tl.where(mask_e[None, :], g * inv_temp, float("-inf"))
        g_max = tl.max(g, axis=1)
        g_exp = tl.exp(g - g_max[:, None])
        g_sum = tl.sum(g_exp, axis=1)
        return g, g_max, g_sum, g_exp / g_sum[:, None]

    @triton.jit
    def _expert_lse(z_rows, mask_z_be, K, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        """logsumexp over K of every expert's logits, online over BLOCK_K chunks -> [BLOCK_B, BLOCK_E]."""
        m = tl.full([BLOCK_B, BLOCK_E], float("-inf"), ACC)
        s = tl.zeros([BLOCK_B, BLOCK_E], ACC)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            z = tl.load(z_rows + offs_k[None, None, :], mask=mask_z_be & mask_k[None, None, :], other=0.0)
            z = tl.where(mask_k[None, None, :], z.to(ACC), float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=2))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, :, None]), axis=2)
            m = m_new
        return m + tl.log(s)

    @triton.jit
    def _gated_mix_fwd_kernel(
        z_ptr,  # expert logits [B, E, K], contiguous
        g_ptr,  # gate logits [B, E], contiguous
        out_ptr,  # mixed output [B, K]
        w_ptr,  # gate weights out [B, E]
        B,  # rows
        E,  # experts
        K,  # classes
        inv_temp,  # 1 / temperature
        MODE: tl.constexpr,  # 0: mix logits, 1: log of mixed probabilities
        ACC: tl.constexpr,  # accumulation dtype (fp32, or fp64 for fp64 inputs)
        BLOCK_B: tl.constexpr,  # rows per program
        BLOCK_E: tl.constexpr,  # >= E, power of two
        BLOCK_K: tl.constexpr,  # classes per chunk
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_e = tl.arange(0, BLOCK_E)
        mask_b = offs_b < B
        mask_e = offs_e < E
        mask_be = mask_b[:, None] & mask_e[None, :]

        g, g_max, g_sum, w = _gate_softmax(g_ptr, offs_b, offs_e, mask_be, mask_e, E, inv_temp, ACC)
        tl.store(w_ptr + offs_b[:, None] * E + offs_e[None, :], w.to(w_ptr.dtype.element_ty), mask=mask_be)

        z_rows = z_ptr + offs_b[:, None, None] * E * K + offs_e[None, :, None] * K  # [BB, BE, 1]
        mask_z_be = mask_be[:, :, None]
        if MODE == 0:
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                z = tl.load(z_rows + offs_k[None, None, :], mask=mask_z_be & mask_k[None, None, :], other=0.0)
                out = tl.sum(w[:, :, None] * z.to(ACC), axis=1)
                tl.store(out_ptr + offs_b[:, None] * K + offs_k[None, :], out.to(out_ptr.dtype.element_ty),
                         mask=mask_b[:, None] & mask_k[None, :])
        else:
            log_w = (g - g_max[:, None]) - tl.log(g_sum)[:, None]  # -inf on padded experts
            # Pass 1: lse_z[b, e] = logsumexp_k z[b, e, k], online over K chunks.
            lse_z = _expert_lse(z_rows, mask_z_be, K, ACC, BLOCK_B, BLOCK_E, BLOCK_K)
            # Pass 2: out[b, k] = logsumexp_e(log w + z - lse_z).
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                z = tl.load(z_rows + offs_k[None, None, :], mask=mask_z_be & mask_k[None, None, :], other=0.0)
                a = log_w[:, :, None] + (z.to(ACC) - lse_z[:, :, None])
                a_max = tl.max(a, axis=1)
                out = a_max + tl.log(tl.sum(tl.exp(a - a_max[:, None, :]), axis=1))
                tl.store(out_ptr + offs_b[:, None] * K + offs_k[None, :], out.to(out_ptr.dtype.element_ty),
                         mask=mask_b[:, None] & mask_k[None, :])

    # VJP. Given dy = dL/dout [B, K] and dW = dL/dweights [B, E] (zero when weights unused),
    # with w = softmax(g / T) and u[b, e] = dL/dlog w[b, e]:
    #   logits: dz[b,e,k] = w[b,e] dy[b,k]
    #           u[b,e]    = w[b,e] (sum_k dy[b,k] z[b,e,k] + dW[b,e])
    #   probs:  r[b,e,k]  = exp(log w[b,e] + log_softmax(z[b,e,:])[k] - out[b,k])   (sum_e r = 1)
    #           q[b,e,k]  = dy[b,k] r[b,e,k];   s[b,e] = sum_k q[b,e,k]
    #           dz[b,e,k] = q[b,e,k] - softmax(z[b,e,:])[k] s[b,e]
    #           u[b,e]    = s[b,e] + w[b,e] dW[b,e]
    #   both:   dg[b,e]   = (u[b,e] - w[b,e] sum_e' u[b,e']) / T
    # w, lse_z and out are recomputed from z and g (cheap) instead of being saved.
    @triton.jit
    def _gated_mix_bwd_kernel(
        z_ptr,  # expert logits [B, E, K], contiguous
        g_ptr,  # gate logits [B, E], contiguous
        dy_ptr,  # grad of output [B, K], contiguous
        dw_ptr,  # grad of weights [B, E], contiguous (read only if HAS_DW)
        dz_ptr,  # grad of expert logits out [B, E, K]
        dg_ptr,  # grad of gate logits out [B, E]
        B,  # rows
        E,  # experts
        K,  # classes
        inv_temp,  # 1 / temperature
        MODE: tl.constexpr,  # 0: mix logits, 1: log of mixed probabilities
        HAS_DW: tl.constexpr,  # weights output received a gradient
        ACC: tl.constexpr,  # accumulation dtype
        BLOCK_B: tl.constexpr,  # rows per program
        BLOCK_E: tl.constexpr,  # >= E, power of two
        BLOCK_K: tl.constexpr,  # classes per chunk
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_e = tl.arange(0, BLOCK_E)
        mask_b = offs_b < B
        mask_e = offs_e < E
        mask_be = mask_b[:, None] & mask_e[None, :]
        offs_be = offs_b[:, None] * E + offs_e[None, :]

        g, g_max, g_sum, w = _gate_softmax(g_ptr, offs_b, offs_e, mask_be, mask_e, E, inv_temp, ACC)

        z_rows = z_ptr + offs_b[:, None, None] * E * K + offs_e[None, :, None] * K
        dz_rows = dz_ptr + offs_b[:, None, None] * E * K + offs_e[None, :, None] * K
        mask_z_be = mask_be[:, :, None]
        if MODE == 0:
            u = tl.zeros([BLOCK_B, BLOCK_E], ACC)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                mask_z = mask_z_be & mask_k[None, None, :]
                z = tl.load(z_rows + offs_k[None, None, :], mask=mask_z, other=0.0).to(ACC)
                dy = tl.load(dy_ptr + offs_b[:, None] * K + offs_k[None, :],
                             mask=mask_b[:, None] & mask_k[None, :], other=0.0).to(ACC)
                u += tl.sum(z * dy[:, None, :], axis=2)
                dz = w[:, :, None] * dy[:, None, :]
                tl.store(dz_rows + offs_k[None, None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask_z)
            u = w * u
        else:
            log_w = (g - g_max[:, None]) - tl.log(g_sum)[:, None]
            # Pass 1: lse_z[b, e] over K (online).
            lse_z = _expert_lse(z_rows, mask_z_be, K, ACC, BLOCK_B, BLOCK_E, BLOCK_K)
            # Pass 2: u[b, e] = s[b, e] = sum_k dy r.
            u = tl.zeros([BLOCK_B, BLOCK_E], ACC)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                z = tl.load(z_rows + offs_k[None, None, :], mask=mask_z_be & mask_k[None, None, :], other=0.0)
                dy = tl.load(dy_ptr + offs_b[:, None] * K + offs_k[None, :],
                             mask=mask_b[:, None] & mask_k[None, :], other=0.0).to(ACC)
                a = log_w[:, :, None] + (z.to(ACC) - lse_z[:, :, None])
                a_max = tl.max(a, axis=1)
                out = a_max + tl.log(tl.sum(tl.exp(a - a_max[:, None, :]), axis=1))
                u += tl.sum(dy[:, None, :] * tl.exp(a - out[:, None, :]), axis=2)
            # Pass 3: dz = q - softmax(z) * s.
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                mask_z = mask_z_be & mask_k[None, None, :]
                z = tl.load(z_rows + offs_k[None, None, :], mask=mask_z, other=0.0).to(ACC)
                dy = tl.load(dy_ptr + offs_b[:, None] * K + offs_k[None, :],
                             mask=mask_b[:, None] & mask_k[None, :], other=0.0).to(ACC)
                log_p = z - lse_z[:, :, None]
                a = log_w[:, :, None] + log_p
                a_max = tl.max(a, axis=1)
                out = a_max + tl.log(tl.sum(tl.exp(a - a_max[:, None, :]), axis=1))
                q = dy[:, None, :] * tl.exp(a - out[:, None, :])
                dz = q - tl.exp(log_p) * u[:, :, None]
                tl.store(dz_rows + offs_k[None, None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask_z)
        if HAS_DW:
            dw = tl.load(dw_ptr + offs_be, mask=mask_be, other=0.0).to(ACC)
            u += w * dw
        u = tl.where(mask_e[None, :], u, 0.0)
        dg = (u - w * tl.sum(u, axis=1)[:, None]) * inv_temp
        tl.store(dg_ptr + offs_be, dg.to(dg_ptr.dtype.element_ty), mask=mask_be)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _gated_mix_config(B: int, E: int, K: int, interpreter: bool = False):
    """Pick (BLOCK_B, BLOCK_E, BLOCK_K, num_warps); refuse sizes the kernels cannot handle.

    A tile is [BLOCK_B, BLOCK_E, BLOCK_K] with all experts of a row in it. On GPU, _TILE = 1024
    elements at 4 warps keeps the probs-mode backward at ~128 registers/thread on sm_90 without
    spills (4096 needed 200+); small E*K rows are packed several to a program instead. The CPU
    interpreter pays per program, not per element, so it gets bigger tiles (_TILE_INTERPRETER).
    """
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"gated_mix: expected 1 <= E <= {MAX_EXPERTS} experts, got E={E}")
    if not 1 <= K <= MAX_CLASSES:
        raise ValueError(f"gated_mix: expected 1 <= K <= {MAX_CLASSES} classes, got K={K}")
    tile_budget = _TILE_INTERPRETER if interpreter else _TILE
    block_e = max(2, _next_pow2(E))
    block_k = max(2, min(_next_pow2(K), max(_MIN_BLOCK_K, tile_budget // block_e)))
    block_b = max(1, min(_next_pow2(B), tile_budget // (block_e * block_k)))
    tile = block_b * block_e * block_k
    num_warps = 4 if tile >= 1024 else (2 if tile >= 256 else 1)
    return block_b, block_e, block_k, num_warps


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _mode_id(mode) -> int:
    if mode not in MODES:
        raise ValueError(f"gated_mix: mode expected one of {MODES}, got {mode!r}")
    return MODES.index(mode)


def _check_inputs(expert_logits, gate_logits, mode, temperature):
    """Validate and return (B, E, K, mode_id, temperature as float)."""
    for name, t in (("expert_logits", expert_logits), ("gate_logits", gate_logits)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"gated_mix: {name} expected a torch.Tensor, got {type(t).__name__}")
    if expert_logits.dim() != 3:
        raise ValueError(f"gated_mix: expert_logits expected rank 3 [B, E, K], got shape "
                         f"{tuple(expert_logits.shape)}")
    if gate_logits.dim() != 2:
        raise ValueError(f"gated_mix: gate_logits expected rank 2 [B, E], got shape {tuple(gate_logits.shape)}")
    B, E, K = expert_logits.shape
    if tuple(gate_logits.shape) != (B, E):
        raise ValueError(f"gated_mix: gate_logits expected shape {(B, E)} to match expert_logits "
                         f"{(B, E, K)}, got {tuple(gate_logits.shape)}")
    if expert_logits.device != gate_logits.device:
        raise ValueError(f"gated_mix: inputs expected on one device, got expert_logits on "
                         f"{expert_logits.device} and gate_logits on {gate_logits.device}")
    if expert_logits.dtype not in _DTYPES:
        raise ValueError(f"gated_mix: expert_logits dtype expected one of {_DTYPES}, got {expert_logits.dtype}")
    if gate_logits.dtype != expert_logits.dtype:
        raise ValueError(f"gated_mix: gate_logits dtype expected {expert_logits.dtype} (same as "
                         f"expert_logits), got {gate_logits.dtype}")
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"gated_mix: expected 1 <= E <= {MAX_EXPERTS} experts, got E={E}")
    if not 1 <= K <= MAX_CLASSES:
        raise ValueError(f"gated_mix: expected 1 <= K <= {MAX_CLASSES} classes, got K={K}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"gated_mix: temperature expected a Python float > 0, got {temperature!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"gated_mix: temperature expected a finite float > 0, got {temperature}")
    return B, E, K, _mode_id(mode), temperature


def _gated_mix_forward(z, g, mode_id: int, temperature: float):
    """Launch the forward kernel on contiguous z [B, E, K], g [B, E]; returns (out, weights)."""
    B, E, K = z.shape
    out = torch.empty((B, K), dtype=z.dtype, device=z.device)
    w = torch.empty((B, E), dtype=g.dtype, device=g.device)
    if B == 0:
        return out, w
    block_b, block_e, block_k, num_warps = _gated_mix_config(B, E, K, interpreter=z.device.type == "cpu")
    grid = (triton.cdiv(B, block_b),)
    with device_guard(z):
        _gated_mix_fwd_kernel[grid](
            z, g, out, w, B, E, K, 1.0 / temperature,
            MODE=mode_id, ACC=_acc_dtype(z.dtype),
            BLOCK_B=block_b, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=num_warps,
        )
    return out, w


def _gated_mix_backward(z, g, dy, dw, mode_id: int, temperature: float):
    """Launch the backward kernel; dy [B, K] and dw [B, E] (or None) contiguous; returns (dz, dg)."""
    B, E, K = z.shape
    dz = torch.empty_like(z)
    dg = torch.empty_like(g)
    if B == 0:
        return dz, dg
    block_b, block_e, block_k, num_warps = _gated_mix_config(B, E, K, interpreter=z.device.type == "cpu")
    grid = (triton.cdiv(B, block_b),)
    with device_guard(z):
        _gated_mix_bwd_kernel[grid](
            z, g, dy, dw if dw is not None else dy, dz, dg, B, E, K, 1.0 / temperature,
            MODE=mode_id, HAS_DW=dw is not None, ACC=_acc_dtype(z.dtype),
            BLOCK_B=block_b, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=num_warps,
        )
    return dz, dg


class GatedMixFunction(torch.autograd.Function):
    """(expert_logits, gate_logits) -> (out, weights), both outputs differentiable.

    Saves only the (contiguous) inputs; the backward recomputes weights and softmaxes.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, expert_logits, gate_logits, mode_id, temperature):
        z = expert_logits.contiguous()
        g = gate_logits.contiguous()
        out, w = _gated_mix_forward(z, g, mode_id, temperature)
        ctx.save_for_backward(z, g)
        ctx.mode_id = mode_id
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return out, w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_weights):
        z, g = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros((z.shape[0], z.shape[2]), dtype=z.dtype, device=z.device)
        grad_out = grad_out.to(z.dtype).contiguous()
        if grad_weights is not None:
            grad_weights = grad_weights.to(g.dtype).contiguous()
        dz, dg = _gated_mix_backward(z, g, grad_out, grad_weights, ctx.mode_id, ctx.temperature)
        return dz, dg, None, None


def gated_mix(expert_logits, gate_logits, mode="logits", temperature=1.0, return_weights=False, backend="auto"):
    """Mix expert logits with softmax gate weights; differentiable in both inputs.

    Args:
        expert_logits: [B, E, K] float16/bfloat16/float32/float64, E <= 64, K <= 1024.
        gate_logits: [B, E], same dtype and device.
        mode: "logits" -> out = sum_e w_e z_e; "probs" -> out = log sum_e w_e softmax(z_e)
            (log of the mixture of probabilities, computed in log space).
        temperature: float > 0; w = softmax(gate_logits / temperature).
        return_weights: also return the weights [B, E] (a differentiable output).
        backend: "auto" | "triton" | "torch" (see ``use_triton``).

    Returns:
        out [B, K] in the input dtype (accumulated in fp32, fp64 for fp64 inputs),
        or (out, weights) when return_weights.

    Raises:
        ValueError on bad rank, mismatched B/E, device or dtype, E > 64, K > 1024,
        temperature <= 0 or an unknown mode (the message names expected vs given).

    Values are not checked: a NaN or Inf in a row's inputs gives a NaN in that row's output (both
    backends; other rows are unaffected). Refusing them would cost a device sync per call in
    the hot loop; ``FastSoftMoE`` checks its images before they reach the experts instead.
    """
    B, E, K, mode_id, temperature = _check_inputs(expert_logits, gate_logits, mode, temperature)
    if not use_triton(expert_logits, backend):
        return gated_mix_torch(expert_logits, gate_logits, mode, temperature, return_weights)
    out, w = GatedMixFunction.apply(expert_logits, gate_logits, mode_id, temperature)
    return (out, w) if return_weights else out


def gated_mix_torch(expert_logits, gate_logits, mode="logits", temperature=1.0, return_weights=False):
    """Plain-PyTorch twin of ``gated_mix`` (same checks, same maths, autograd does the backward)."""
    _, _, _, mode_id, temperature = _check_inputs(expert_logits, gate_logits, mode, temperature)
    dtype = expert_logits.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = expert_logits.to(acc)
    g = gate_logits.to(acc) / temperature
    w = torch.softmax(g, dim=-1)
    if mode_id == 0:
        out = torch.bmm(w.unsqueeze(1), z).squeeze(1)
    else:
        log_w = torch.log_softmax(g, dim=-1)
        out = torch.logsumexp(log_w.unsqueeze(-1) + torch.log_softmax(z, dim=-1), dim=1)
    out = out.to(dtype)
    return (out, w.to(dtype)) if return_weights else out
