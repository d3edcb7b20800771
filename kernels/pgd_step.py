"""One fused pass of the L-inf PGD update, and the PGD random start.

    pgd_step:          x_next = clamp(min(max(x_adv + alpha * sign(grad), x_nat - eps), x_nat + eps), lo, hi)
    pgd_random_start:  x_0    = clamp(x_nat + U(-eps, eps), lo, hi)
    fgsm_step:         pgd_step from x_nat with alpha = eps  ->  clamp(x_nat + eps * sign(grad), lo, hi)

These are update rules, not differentiable functions: they run under ``torch.no_grad()``,
treat their inputs as detached, and return tensors that do not require grad (an in-place
update of a leaf that requires grad is allowed, as for any optimizer step).

alpha and eps are each a Python float or a tensor whose shape is a leading prefix of x's
shape (e.g. [B] for x [B, 3, H, W], [B, E] for per-expert inputs [B, E, 3, H, W]); a tensor
is broadcast over the remaining dims. sign(0) = 0, like torch.sign.

The arithmetic is done in fp32 (fp64 for fp64 inputs, on the torch backend) and rounded
once to the input dtype, on both backends, so the Triton kernels and the torch twins agree
bit for bit on CPU (interpreter).

Validation: by default every call checks its arguments, which costs host-device syncs (an
alpha/eps tensor's entries, a NaN in grad). A NaN gradient is refused there (ValueError naming
``grad``): a step along an undefined direction would silently stall or poison the attack.
Attack loops check alpha/eps once and then call with ``validate=False``: no checks, no syncs;
a NaN grad entry then gives sign 0 (no step for that element) on both backends.
"""
import math

import torch

from .dispatch import device_guard, triton_available, use_triton

__all__ = [
    "pgd_step",
    "pgd_step_",
    "pgd_step_torch",
    "pgd_random_start",
    "pgd_random_start_torch",
    "fgsm_step",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Triton passes Python float scalars (alpha, eps, lo, hi) as fp32, so the kernels take
# fp16/bf16/fp32 data; fp64 runs on the torch twin ("auto") or is refused ("triton").
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK = 4096
_MAX_GRID = 2**31 - 1

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _per_group(ptr, scalar, inner, offs, mask, PER_GROUP: tl.constexpr):
        """The value (alpha or eps) of each element: one per group of ``inner`` elements, or a scalar."""
        if PER_GROUP:
            return tl.load(ptr + offs // inner, mask=mask, other=0.0)
        else:
            return scalar

    @triton.jit
    def _pgd_step_kernel(
        x_ptr,  # x_adv, flat [N]
        g_ptr,  # grad, flat [N]
        xn_ptr,  # x_nat, flat [N]
        out_ptr,  # x_next, flat [N] (may alias x_ptr: same offsets read then written)
        alpha_ptr,  # per-group alpha, fp32 [N // alpha_inner] (read only if ALPHA_PER_GROUP)
        eps_ptr,  # per-group eps, fp32 [N // eps_inner] (read only if EPS_PER_GROUP)
        alpha,  # scalar alpha
        eps,  # scalar eps
        alpha_inner,  # elements sharing one alpha value
        eps_inner,  # elements sharing one eps value
        lo,  # box lower bound
        hi,  # box upper bound
        N,  # number of elements
        ALPHA_PER_GROUP: tl.constexpr,  # alpha from alpha_ptr instead of the scalar
        EPS_PER_GROUP: tl.constexpr,  # eps from eps_ptr instead of the scalar
        BLOCK: tl.constexpr,  # elements per program
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = _per_group(alpha_ptr, alpha, alpha_inner, offs, mask, ALPHA_PER_GROUP)
        e = _per_group(eps_ptr, eps, eps_inner, offs, mask, EPS_PER_GROUP)
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        x = x + a * sign
        x = tl.minimum(tl.maximum(x, xn - e), xn + e)
        x = tl.minimum(tl.maximum(x, lo), hi)
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pgd_random_start_kernel(
        xn_ptr,  # x_nat, flat [N]
        u_ptr,  # uniform noise in [0, 1), fp32, flat [N]
        out_ptr,  # x_0, flat [N]
        eps_ptr,  # per-group eps, fp32 [N // eps_inner] (read only if EPS_PER_GROUP)
        eps,  # scalar eps
        eps_inner,  # elements sharing one eps value
        lo,  # box lower bound
        hi,  # box upper bound
        N,  # number of elements
        EPS_PER_GROUP: tl.constexpr,  # eps from eps_ptr instead of the scalar
        BLOCK: tl.constexpr,  # elements per program
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        xn = tl.load(xn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0)
        e = _per_group(eps_ptr, eps, eps_inner, offs, mask, EPS_PER_GROUP)
        x = xn + (u * 2.0 - 1.0) * e
        x = tl.minimum(tl.maximum(x, lo), hi)
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def _elementwise_config(n: int):
    """Pick (BLOCK, num_warps) for n elements; refuse grids the launcher cannot express."""
    block = max(128, min(_MAX_BLOCK, 1 << max(0, (n - 1).bit_length())))
    if (n + block - 1) // block > _MAX_GRID:
        raise ValueError(f"pgd kernels: expected at most {_MAX_GRID * block} elements, got {n}")
    num_warps = 8 if block >= 4096 else 4
    return block, num_warps


def _acc_torch_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_bound(name, value, x):
    """Validate alpha/eps: a float >= 0 or a tensor (>= 0) whose shape is a prefix of x's."""
    if _is_number(value):
        value = float(value)
        if not value >= 0 or math.isinf(value):  # also rejects NaN
            raise ValueError(f"{name}: expected a finite float >= 0, got {value}")
        return value
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a float or a tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    prefix = tuple(x.shape[: value.dim()])
    if value.dim() > x.dim() or tuple(value.shape) != prefix:
        raise ValueError(f"{name}: expected a tensor whose shape is a leading prefix of x's shape "
                         f"{tuple(x.shape)} (e.g. {tuple(x.shape[:1])}), got shape {tuple(value.shape)}")
    if value.dim() > 0 and value.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device}, got one on {value.device}")
    value = value.detach().to(device=x.device)
    if value.numel() > 0:
        bad = value.isnan() | (value < 0) | value.isinf()
        if bool(bad.any()):
            raise ValueError(f"{name}: expected every entry finite and >= 0, got min "
                             f"{value.min().item()} (or a NaN/inf entry)")
    return value


def _check_box(lo, hi):
    for name, v in (("lo", lo), ("hi", hi)):
        if not _is_number(v):
            raise ValueError(f"{name}: expected a Python float, got {type(v).__name__}")
    lo, hi = float(lo), float(hi)
    if not lo <= hi:
        raise ValueError(f"box: expected lo <= hi, got lo={lo}, hi={hi}")
    return lo, hi


def _check_x(name, t, ref=None, ref_name="x_adv"):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ref is None:
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: expected dtype in {_DTYPES}, got {t.dtype}")
        return
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (as {ref_name}), got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def _check_step(x_adv, grad, x_nat, alpha, eps, lo, hi, out):
    _check_x("x_adv", x_adv)
    _check_x("grad", grad, x_adv)
    _check_x("x_nat", x_nat, x_adv)
    if out is not None:
        _check_x("out", out, x_adv)
    alpha = _check_bound("alpha", alpha, x_adv)
    eps = _check_bound("eps", eps, x_adv)
    lo, hi = _check_box(lo, hi)
    if grad.numel() and bool(grad.detach().isnan().any()):
        raise ValueError(f"grad: expected no NaN entries (a step needs a direction), got "
                         f"{int(grad.detach().isnan().sum())} NaN of {grad.numel()}")
    return alpha, eps, lo, hi


def _prevalidated(alpha, eps, lo, hi):
    """validate=False: the caller checked alpha/eps once; only make floats floats for the launcher."""
    alpha = float(alpha) if _is_number(alpha) else alpha.detach()
    eps = float(eps) if _is_number(eps) else eps.detach()
    return alpha, eps, float(lo), float(hi)


def _triton_ok(x, backend, op):
    """use_triton plus this op's dtype limit (fp64 -> twin under auto, ValueError if forced)."""
    if not use_triton(x, backend):
        return False
    if x.dtype in _TRITON_DTYPES:
        return True
    if backend == "triton":
        raise ValueError(f"{op}: backend='triton' expects dtype in {_TRITON_DTYPES}, got {x.dtype}")
    return False


def _bound_args(value, x):
    """(pointer, scalar, inner, per_group) kernel arguments for alpha or eps."""
    if isinstance(value, float):
        return x, value, 1, False
    flat = value.to(torch.float32).contiguous().reshape(-1)
    inner = x.numel() // max(1, flat.numel())
    return flat, 0.0, max(1, inner), True


def _broadcast(value, x, acc):
    """alpha/eps as something that broadcasts against x in the compute dtype."""
    if isinstance(value, float):
        return value
    return value.to(acc).reshape(tuple(value.shape) + (1,) * (x.dim() - value.dim()))


def _write_out(result, out):
    if out is None:
        return result
    out.copy_(result)
    return out


@torch.no_grad()
def pgd_step(x_adv, grad, x_nat, alpha, eps, lo=0.0, hi=1.0, out=None, backend="auto", validate=True):
    """One L-inf PGD step, fused: clamp(min(max(x_adv + alpha*sign(grad), x_nat-eps), x_nat+eps), lo, hi).

    Not differentiable (an update rule): runs under no_grad, returns a tensor that does not
    require grad. ``out=x_adv`` (or ``pgd_step_``) updates x_adv in place and returns it.
    FGSM is this step taken from x_nat with alpha = eps (see ``fgsm_step``).

    Args:
        x_adv, grad, x_nat: same shape, dtype (fp16/bf16/fp32/fp64) and device.
        alpha, eps: float >= 0, or a tensor (entries >= 0) whose shape is a leading prefix of
            x's shape ([B] per sample, [B, E] per sample and expert), broadcast over the rest.
        lo, hi: box bounds (floats, lo <= hi).
        out: optional tensor (same shape/dtype/device) to write into; may be x_adv.
        backend: "auto" | "triton" | "torch". The Triton kernel takes fp16/bf16/fp32.
        validate: check every argument (syncs with the device). ``False`` is for loops that
            checked alpha/eps/shapes once: nothing is checked, nothing syncs, a NaN grad entry
            means no step for that element.

    Raises:
        ValueError (validate=True) on mismatched shapes/dtypes/devices, alpha/eps < 0 (any
        entry), lo > hi, an alpha/eps tensor whose shape is not a prefix of x's shape, or a NaN
        in grad.
    """
    if validate:
        alpha, eps, lo, hi = _check_step(x_adv, grad, x_nat, alpha, eps, lo, hi, out)
    else:
        alpha, eps, lo, hi = _prevalidated(alpha, eps, lo, hi)
    if not _triton_ok(x_adv, backend, "pgd_step"):
        return _pgd_step_torch(x_adv, grad, x_nat, alpha, eps, lo, hi, out)
    x = x_adv.detach().contiguous()
    g = grad.detach().contiguous()
    xn = x_nat.detach().contiguous()
    if out is not None and out.is_contiguous():
        dst = out
    else:
        dst = torch.empty_like(x)
    n = x.numel()
    if n > 0:
        block, num_warps = _elementwise_config(n)
        a_ptr, a_val, a_inner, a_group = _bound_args(alpha, x)
        e_ptr, e_val, e_inner, e_group = _bound_args(eps, x)
        with device_guard(x):
            _pgd_step_kernel[(triton.cdiv(n, block),)](
                x, g, xn, dst, a_ptr, e_ptr, a_val, e_val, a_inner, e_inner, lo, hi, n,
                ALPHA_PER_GROUP=a_group, EPS_PER_GROUP=e_group, BLOCK=block, num_warps=num_warps,
            )
    if out is not None and dst is not out:
        out.copy_(dst)
        return out
    if dst is out and hasattr(torch.autograd.graph, "increment_version"):
        # The kernel wrote through a raw pointer: tell autograd that `out` changed, so a graph
        # that saved it errors out instead of silently using the new values.
        torch.autograd.graph.increment_version(out)
    return dst


def pgd_step_(x_adv, grad, x_nat, alpha, eps, lo=0.0, hi=1.0, backend="auto", validate=True):
    """In-place ``pgd_step``: writes the step into x_adv and returns it (not differentiable)."""
    return pgd_step(x_adv, grad, x_nat, alpha, eps, lo, hi, out=x_adv, backend=backend, validate=validate)


def fgsm_step(x_nat, grad, eps, lo=0.0, hi=1.0, backend="auto", validate=True):
    """FGSM: clamp(x_nat + eps * sign(grad), lo, hi) = pgd_step from x_nat with alpha = eps."""
    if validate:  # eps first, under its own name: it is also the step size, but the user passed eps
        _check_x("x_nat", x_nat)
        eps = _check_bound("eps", eps, x_nat)
    return pgd_step(x_nat, grad, x_nat, eps, eps, lo, hi, backend=backend, validate=validate)


def _pgd_step_torch(x_adv, grad, x_nat, alpha, eps, lo, hi, out):
    acc = _acc_torch_dtype(x_adv.dtype)
    x = x_adv.detach().to(acc)
    xn = x_nat.detach().to(acc)
    a = _broadcast(alpha, x, acc)
    e = _broadcast(eps, x, acc)
    # nan_to_num: a NaN gradient entry means no step, as in the kernel (where NaN > 0 and NaN < 0 are false)
    x = x + a * torch.sign(grad.detach().to(acc)).nan_to_num(nan=0.0)
    x = torch.minimum(torch.maximum(x, xn - e), xn + e)
    x = x.clamp(lo, hi).to(x_adv.dtype)
    return _write_out(x, out)


@torch.no_grad()
def pgd_step_torch(x_adv, grad, x_nat, alpha, eps, lo=0.0, hi=1.0, out=None):
    """Plain-PyTorch twin of ``pgd_step`` (same checks and arithmetic; not differentiable)."""
    alpha, eps, lo, hi = _check_step(x_adv, grad, x_nat, alpha, eps, lo, hi, out)
    return _pgd_step_torch(x_adv, grad, x_nat, alpha, eps, lo, hi, out)


def _check_start(x_nat, eps, lo, hi, generator):
    _check_x("x_nat", x_nat)
    eps = _check_bound("eps", eps, x_nat)
    lo, hi = _check_box(lo, hi)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != x_nat.device.type:
            raise ValueError(f"generator: expected one on {x_nat.device.type} (as x_nat), "
                             f"got one on {generator.device}")
    return eps, lo, hi


def _uniform(x_nat, generator):
    """U[0, 1) noise in the compute dtype; both backends draw it here, so they match exactly."""
    return torch.rand(x_nat.shape, generator=generator, device=x_nat.device,
                      dtype=_acc_torch_dtype(x_nat.dtype))


@torch.no_grad()
def pgd_random_start(x_nat, eps, lo=0.0, hi=1.0, generator=None, backend="auto", validate=True):
    """PGD random start: clamp(x_nat + U(-eps, eps), lo, hi), noise drawn with ``generator``.

    The uniform noise is drawn with torch.rand (reproducible from the generator's state) and
    the scale, add and clamp are fused in one kernel; the torch twin draws the same noise, so
    for the same generator state both give the same tensor (bit-identical on CPU; on CUDA the
    compiler may fuse the multiply-add, a last-bit difference). Not differentiable.

    Args:
        x_nat: clean inputs (fp16/bf16/fp32/fp64).
        eps: float >= 0 or a tensor (entries >= 0) whose shape is a leading prefix of x's shape.
        lo, hi: box bounds (floats, lo <= hi).
        generator: optional torch.Generator on x_nat's device type.
        backend: "auto" | "triton" | "torch".
        validate: False skips the checks (for callers that checked eps once).
    """
    if validate:
        eps, lo, hi = _check_start(x_nat, eps, lo, hi, generator)
    else:
        _, eps, lo, hi = _prevalidated(0.0, eps, lo, hi)
    if not _triton_ok(x_nat, backend, "pgd_random_start"):
        return _pgd_random_start_torch(x_nat, eps, lo, hi, generator)
    xn = x_nat.detach().contiguous()
    u = _uniform(xn, generator)
    dst = torch.empty_like(xn)
    n = xn.numel()
    if n > 0:
        block, num_warps = _elementwise_config(n)
        e_ptr, e_val, e_inner, e_group = _bound_args(eps, xn)
        with device_guard(xn):
            _pgd_random_start_kernel[(triton.cdiv(n, block),)](
                xn, u, dst, e_ptr, e_val, e_inner, lo, hi, n,
                EPS_PER_GROUP=e_group, BLOCK=block, num_warps=num_warps,
            )
    return dst


def _pgd_random_start_torch(x_nat, eps, lo, hi, generator):
    acc = _acc_torch_dtype(x_nat.dtype)
    u = _uniform(x_nat, generator)
    e = _broadcast(eps, u, acc)
    x = x_nat.detach().to(acc) + (u * 2.0 - 1.0) * e
    return x.clamp(lo, hi).to(x_nat.dtype)


@torch.no_grad()
def pgd_random_start_torch(x_nat, eps, lo=0.0, hi=1.0, generator=None):
    """Plain-PyTorch twin of ``pgd_random_start`` (same noise for the same generator state)."""
    eps, lo, hi = _check_start(x_nat, eps, lo, hi, generator)
    return _pgd_random_start_torch(x_nat, eps, lo, hi, generator)
