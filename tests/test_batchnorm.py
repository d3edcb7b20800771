"""kernels/batchnorm.py: the Triton kernels (CPU interpreter, backend="triton") against the torch twin.

Checked: the output, the gradients of x, weight, bias and residual, and the running buffers after
the step, in fp32 against the twin run in fp64 on the same values; odd shapes (N=3, C=5 and 9*3,
H=W=5 and 7), NCHW and channels_last, ReLU and residual on and off, training and eval, parameters
and buffers that are slices of bigger ones (as GroupedBatchNorm2d passes them); several splits
and loop steps per program; a large mean; fp16/bf16 inputs against an fp32 reference; fp64
gradcheck of the twin; bad inputs; the dispatcher; the sm_90 compile. The tests marked cuda run
the compiled kernels on a GPU instead (TRITON_INTERPRET=0 pytest tests/test_batchnorm.py -m cuda).
"""
import importlib

import pytest
import torch
from helpers import assert_kernels_compile_for_sm90, rel_err

import fastmoe_adv.grouped as grouped
from fastmoe_adv.kernels import batch_norm_act, batch_norm_act_torch, dispatch

bn_mod = importlib.import_module("fastmoe_adv.kernels.batchnorm")  # the module, not the function


def cuda_compiled(test):
    """The compiled kernels on a GPU: TRITON_INTERPRET=0 pytest tests/test_batchnorm.py -m cuda."""
    for mark in (
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(not dispatch.triton_available(), reason="needs triton"),
        pytest.mark.skipif(dispatch.interpreter_enabled(),
                           reason="kernels are interpreted: run with TRITON_INTERPRET=0 to test the compiled ones"),
    ):
        test = mark(test)
    return test


@pytest.fixture(autouse=True)
def _needs_interpreter(request):
    """Every test but the CUDA ones runs the kernels on CPU tensors under the interpreter."""
    if request.node.get_closest_marker("cuda") is None and not dispatch.interpreter_enabled():
        pytest.skip("needs triton with TRITON_INTERPRET=1 (set by tests/conftest.py)")


# fp32 kernel vs the fp64 twin on the same values: the kernel's own fp32 rounding only. The weight
# gradient is a sum of N*H*W products of size ~|dy|, hence the absolute part.
FP32_TOL = dict(rtol=2e-5, atol=2e-5)
LO, HI = 1, 2  # the active experts: channel slice [LO*C, HI*C) of parameters for 3 experts


class Case:
    """Random (never zero) inputs; weight, bias and running buffers are slices of 3-expert tensors."""

    def __init__(self, shape, channels_last=False, residual=True, dtype=torch.float32, mean=0.5, std=2.0,
                 device="cpu"):
        n, c, h, w = shape
        self.c = c
        self.x = (torch.randn(shape, device=device) * std + mean).to(dtype)
        if channels_last:
            self.x = self.x.to(memory_format=torch.channels_last)
        self.residual = torch.randn(shape, device=device).to(dtype) if residual else None
        self.weight = 0.5 + torch.rand(3 * c, device=device)
        self.bias = 0.2 * torch.randn(3 * c, device=device)
        self.running_mean = 0.1 * torch.randn(3 * c, device=device)
        self.running_var = 0.5 + torch.rand(3 * c, device=device)
        self.dy = torch.randn(shape, device=device)  # plain NCHW, whatever x's format: the op must cope

    def run(self, fn, training, relu, dtype=None, **kw):
        """(y, dx, dweight, dbias, dresidual, running_mean, running_var) for loss = <y, dy>, on copies
        of every tensor (cast to ``dtype`` when given)."""
        cast = (lambda t: t.detach().clone()) if dtype is None else (lambda t: t.detach().to(dtype))
        x, w, b = cast(self.x), cast(self.weight), cast(self.bias)
        leaves = [x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)]
        res = None
        if self.residual is not None:
            res = cast(self.residual).requires_grad_(True)
            leaves.append(res)
        rm, rv = cast(self.running_mean), cast(self.running_var)
        s = slice(LO * self.c, HI * self.c)
        y = fn(x, w[s], b[s], rm[s], rv[s], training=training, relu=relu, residual=res, **kw)
        grads = torch.autograd.grad((y.to(self.dy.dtype) * self.dy.to(y.dtype)).sum(), leaves)
        dres = grads[3] if res is not None else None
        return y, grads[0], grads[1], grads[2], dres, rm, rv


def _assert_close(got, want, **tol):
    names = ("y", "dx", "dweight", "dbias", "dresidual", "running_mean", "running_var")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b.to(a.dtype), **tol, msg=lambda m, n=name: f"{n}: {m}")


def _triton(case, training, relu):
    return case.run(batch_norm_act, training, relu, backend="triton")


def _twin64(case, training, relu):
    return case.run(batch_norm_act_torch, training, relu, dtype=torch.float64)


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("relu", (True, False), ids=("relu", "no_relu"))
@pytest.mark.parametrize("residual", (True, False), ids=("res", "no_res"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("shape", ((3, 5, 5, 5), (3, 27, 7, 7)), ids=("3x5x5x5", "3x27x7x7"))
def test_fp32_matches_twin(shape, channels_last, residual, relu, training):
    case = Case(shape, channels_last, residual)
    got = _triton(case, training, relu)
    _assert_close(got, _twin64(case, training, relu), **FP32_TOL)
    want_format = torch.channels_last if channels_last else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=want_format), "the output keeps x's memory format"
    # the running buffers change only inside the slice, and only in training
    for buf, before in ((got[5], case.running_mean), (got[6], case.running_var)):
        outside = torch.cat([buf[:LO * case.c] - before[:LO * case.c], buf[HI * case.c:] - before[HI * case.c:]])
        assert torch.equal(outside, torch.zeros_like(outside))
        inside = buf[LO * case.c:HI * case.c]
        assert torch.equal(inside, before[LO * case.c:HI * case.c]) != training


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("shape", ((3, 9, 2, 3), (5, 9, 1, 1)), ids=("2x3_planes", "1x1_planes"))
def test_small_planes(shape, channels_last):
    # NCHW with tiny planes packs several channels per program (BLOCK_C > 1, a partial block);
    # 1x1 planes are the same memory in both formats and take the channels_last path
    case = Case(shape, channels_last)
    blocks = bn_mod._config(bn_mod._View(case.x), interpreter=True)
    assert blocks[1] > 1 and shape[1] % blocks[1] != 0
    for training in (True, False):
        _assert_close(_triton(case, training, True), _twin64(case, training, True), **FP32_TOL)


def _force_small_tiles(monkeypatch, tile=16, programs=12, final_block_s=2):
    """Tiny tiles and many programs: several splits, several loop steps per program, several
    finalize steps; the test asserts they really happen."""
    monkeypatch.setattr(bn_mod, "_TILE_INTERPRETER", tile)
    monkeypatch.setattr(bn_mod, "_PROGRAMS_INTERPRETER", programs)
    monkeypatch.setattr(bn_mod, "_FINAL_BLOCK_S", final_block_s)


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
def test_several_splits_and_loop_steps(channels_last, monkeypatch):
    _force_small_tiles(monkeypatch)
    case = Case((3, 9, 5, 7), channels_last)
    view = bn_mod._View(case.x)
    block_p, block_c, block_q, _ = bn_mod._config(view, interpreter=True)
    split, p_per_split = bn_mod._split(view, block_p, block_c, case.x.device)
    assert split > bn_mod._FINAL_BLOCK_S, "finalize loops over several partial rows"
    assert p_per_split > block_p or view.Q > block_q, "a reduction program loops over several tiles"
    assert view.P % p_per_split != 0 or view.Q % block_q != 0 or view.P % block_p != 0, "a partial tile"
    for training in (True, False):
        _assert_close(_triton(case, training, True), _twin64(case, training, True), **FP32_TOL)


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
def test_gpu_block_config_under_interpreter(channels_last, monkeypatch):
    # The exact GPU tiles (4096 elements, 64 channels per channels_last program) on a grouped
    # shape with two channel blocks, and a GPU-like split.
    monkeypatch.setattr(bn_mod, "_TILE_INTERPRETER", bn_mod._TILE)
    monkeypatch.setattr(bn_mod, "_PROGRAMS_INTERPRETER", 8)
    case = Case((4, 9 * 8, 8, 8), channels_last)
    blocks = bn_mod._config(bn_mod._View(case.x), interpreter=True)
    assert blocks[:3] == ((64, 64, 1) if channels_last else (4, 1, 64))
    _assert_close(_triton(case, True, True), _twin64(case, True, True), **FP32_TOL)


def test_large_mean_does_not_cancel_the_variance():
    # mean 1000, std 1: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance. x itself
    # carries the fp32 rounding of 1000 (6e-5 absolute), so the check is on the error relative to
    # each tensor's largest entry; the fp32 torch twin is ~10x further off than the kernel here.
    case = Case((3, 5, 7, 7), channels_last=True, mean=1000.0, std=1.0)
    got, want = _triton(case, True, True), _twin64(case, True, True)
    for name, a, b in zip(("y", "dx", "dweight", "dbias", "dresidual", "running_mean", "running_var"), got, want):
        assert rel_err(a, b) < 5e-5, name


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
def test_low_precision_against_fp32_reference(dtype, training, channels_last):
    case = Case((3, 27, 5, 5), channels_last, dtype=dtype)
    case.dy = case.dy.to(dtype).float()  # the loss rounds dy to the dtype: give the reference the same dy
    y, dx, dw, db, dres, rm, rv = _triton(case, training, True)
    ref = _twin64(case, training, True)
    assert y.dtype == dx.dtype == dres.dtype == dtype and dw.dtype == rm.dtype == torch.float32
    # y and dx are computed in fp32 and rounded once: half an ulp of the dtype (2^-8 relative for
    # bf16, 2^-11 for fp16) above the fp32 error, checked against one ulp (finfo.eps); the
    # statistics, dweight, dbias and the running buffers stay fp32.
    ulp = torch.finfo(dtype).eps
    for name, a, b in (("y", y, ref[0]), ("dx", dx, ref[1]), ("dresidual", dres, ref[4])):
        torch.testing.assert_close(a.double(), b, rtol=ulp, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for name, a, b in (("dweight", dw, ref[2]), ("dbias", db, ref[3]), ("running_mean", rm, ref[5]),
                       ("running_var", rv, ref[6])):
        torch.testing.assert_close(a.double(), b, **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_twin_gradcheck_fp64():
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w = (0.5 + torch.rand(3, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x, w, b, r):
        return batch_norm_act(x, w, b, rm, rv, training=True, residual=r)  # fp64: the twin under "auto"

    assert torch.autograd.gradcheck(f, (x, w, b, r), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_deterministic():
    case = Case((3, 27, 7, 7), channels_last=True)
    first, second = _triton(case, True, True), _triton(case, True, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_matches_grouped_batchnorm_module():
    # The op on the slice of a GroupedBatchNorm2d equals the module's own run (buffers included).
    torch.manual_seed(1)
    mod = grouped.GroupedBatchNorm2d(3, 4)
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.normal_()
        mod.running_var.uniform_(0.5, 1.5)
    twin = grouped.GroupedBatchNorm2d(3, 4)
    twin.load_state_dict(mod.state_dict())
    x = torch.randn(3, 8, 5, 5).to(memory_format=torch.channels_last)
    s = slice(4, 12)
    y = batch_norm_act(x, mod.weight[s], mod.bias[s], mod.running_mean[s], mod.running_var[s], training=True,
                       momentum=mod.momentum, eps=mod.eps, relu=False, backend="triton")
    torch.testing.assert_close(y, twin(x, 1, 3), **FP32_TOL)
    torch.testing.assert_close(mod.running_mean, twin.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mod.running_var, twin.running_var, rtol=1e-6, atol=1e-7)


def _block(bn, x, convs, bns, training):
    """A grouped ResNet basic block with a downsample, 3 experts: relu(bn1(conv1 x)), then
    relu(bn2(conv2 .) + bn_d(conv_d x)); ``bns`` holds each BN's (weight, bias, running_mean, running_var)."""
    conv = torch.nn.functional.conv2d
    out = bn(conv(x, convs[0], stride=2, padding=1, groups=3), *bns[0], training=training)
    short = bn(conv(x, convs[2], stride=2, groups=3), *bns[2], training=training, relu=False)
    return bn(conv(out, convs[1], padding=1, groups=3), *bns[1], training=training, residual=short)


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_basic_block_composition(training):
    # the three uses in a block chained through convolutions: every parameter gradient, the
    # input gradient and every running buffer match the fp32 twin (both round in fp32)
    x = torch.randn(3, 3 * 2, 9, 9).to(memory_format=torch.channels_last)
    convs = [0.3 * torch.randn(3 * 4, 2, 3, 3), 0.3 * torch.randn(3 * 4, 4, 3, 3), 0.5 * torch.randn(3 * 4, 2, 1, 1)]
    bns = [(0.5 + torch.rand(12), 0.2 * torch.randn(12), 0.1 * torch.randn(12), 0.5 + torch.rand(12))
           for _ in range(3)]
    dy = torch.randn(3, 12, 5, 5)
    results = []
    for fn in (lambda *a, **kw: batch_norm_act(*a, backend="triton", **kw), batch_norm_act_torch):
        leaves = [t.clone().requires_grad_(True) for t in [x, *convs] + [t for b in bns for t in b[:2]]]
        bufs = [t.clone() for b in bns for t in b[2:]]
        y = _block(fn, leaves[0], leaves[1:4], [(*leaves[4 + 2 * i:6 + 2 * i], *bufs[2 * i:2 * i + 2])
                                               for i in range(3)], training)
        results.append([y, *torch.autograd.grad((y * dy).sum(), leaves), *bufs])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"result {i}: {m}")


def test_strided_buffers_and_inputs_and_no_affine():
    # running buffers with stride 2, weight/bias None, x neither NCHW nor channels_last dense,
    # residual in the other memory format
    x = torch.randn(3, 5, 7, 6).transpose(2, 3)
    res = torch.randn(3, 5, 6, 7).to(memory_format=torch.channels_last)
    bufs = [0.1 * torch.randn(10), 0.5 + torch.rand(10)]
    twin_bufs = [b.clone() for b in bufs]
    y = batch_norm_act(x, None, None, bufs[0][::2], bufs[1][::2], training=True, residual=res, backend="triton")
    want = batch_norm_act_torch(x, None, None, twin_bufs[0][::2], twin_bufs[1][::2], training=True, residual=res)
    torch.testing.assert_close(y, want, **FP32_TOL)
    for a, b in zip(bufs, twin_bufs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_running_buffer_version_bumped():
    x = torch.randn(3, 5, 4, 4)
    rm, rv = torch.zeros(5), torch.ones(5)
    v0 = rm._version
    batch_norm_act(x, None, None, rm, rv, training=True, backend="triton")
    assert rm._version > v0


def test_backend_dispatch(monkeypatch):
    x = torch.randn(3, 5, 4, 4)
    rm, rv = torch.zeros(5), torch.ones(5)
    with pytest.raises(ValueError, match="backend"):
        batch_norm_act(x, None, None, rm, rv, training=True, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        batch_norm_act(x.double(), None, None, rm.double(), rv.double(), training=True, backend="triton")

    def refuse(*args):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(bn_mod.BatchNormActFunction, "apply", refuse)
    want = batch_norm_act_torch(x, None, None, rm.clone(), rv.clone(), training=True)
    torch.testing.assert_close(batch_norm_act(x, None, None, rm.clone(), rv.clone(), training=True,
                                              backend="torch"), want)
    x64 = x.double()
    torch.testing.assert_close(batch_norm_act(x64, None, None, rm.double(), rv.double(), training=True),
                               batch_norm_act_torch(x64, None, None, rm.double(), rv.double(), training=True))


def _bad_calls():
    x = torch.randn(3, 5, 4, 4)
    v = torch.ones(5)
    ok = dict(training=True)
    return [
        ("rank 4", (torch.randn(3, 5, 4), v, v, v, v), ok),
        ("dtype expected one of", (x.long(), v, v, v, v), ok),
        (r"weight expected shape \(5,\)", (x, torch.ones(4), v, v, v), ok),
        ("running_var expected dtype", (x, v, v, v, v.long()), ok),
        ("bias expected on cpu", (x, v, torch.ones(5, device="meta"), v, v), ok),
        ("both given or both None", (x, v, v, v, None), ok),
        ("eval mode", (x, v, v, None, None), dict(training=False)),
        ("more than 1 value per channel", (torch.randn(1, 5, 1, 1), v, v, v, v), ok),
        ("training expected a bool", (x, v, v, v, v), dict(training=1)),
        ("momentum expected a float", (x, v, v, v, v), dict(training=True, momentum=1.5)),
        ("eps expected a finite float", (x, v, v, v, v), dict(training=True, eps=0.0)),
        (r"residual expected shape \(3, 5, 4, 4\)", (x, v, v, v, v), dict(training=True, residual=x[:2])),
        ("residual expected dtype", (x, v, v, v, v), dict(training=True, residual=x.half())),
    ]


@pytest.mark.parametrize("fn", (batch_norm_act, batch_norm_act_torch), ids=("fused", "twin"))
def test_bad_inputs(fn):
    for match, args, kw in _bad_calls():
        with pytest.raises(ValueError, match=match):
            fn(*args, **kw)


def test_kernels_compile_for_sm90(tmp_path):
    assert_kernels_compile_for_sm90("batchnorm", tmp_path)


def test_half_parameters_and_buffers():
    # a model cast to fp16 as a whole: weight, bias and running buffers in x's dtype
    x = torch.randn(3, 5, 4, 4).half().requires_grad_(True)
    w = (0.5 + torch.rand(5)).half().requires_grad_(True)
    b = torch.randn(5).half().requires_grad_(True)
    bufs = [(0.1 * torch.randn(5)).half(), (0.5 + torch.rand(5)).half()]
    bufs64 = [t.double() for t in bufs]
    y = batch_norm_act(x, w, b, *bufs, training=True, backend="triton")
    dy = torch.randn(3, 5, 4, 4).half().double()  # fp16 values: both sides see the same dy
    dx, dw, db = torch.autograd.grad((y.double() * dy).sum(), (x, w, b))
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    want = batch_norm_act_torch(x64, w64, b64, *(t.clone() for t in bufs64), training=True)
    want_grads = torch.autograd.grad((want * dy).sum(), (x64, w64, b64))
    batch_norm_act_torch(x64, w64, b64, *bufs64, training=True)  # the fp64 running update
    ulp = torch.finfo(torch.float16).eps
    for name, a, b_ in (("y", y, want), ("dx", dx, want_grads[0]), ("dweight", dw, want_grads[1]),
                        ("dbias", db, want_grads[2]), ("running_mean", bufs[0], bufs64[0]),
                        ("running_var", bufs[1], bufs64[1])):
        assert a.dtype == torch.float16, name
        torch.testing.assert_close(a.double(), b_, rtol=ulp, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_eval_input_gradient_only():
    # an attack step: eval mode, parameters frozen, only the input (and residual) need gradients
    case = Case((3, 27, 5, 5), channels_last=True)
    x = case.x.clone().requires_grad_(True)
    res = case.residual.clone().requires_grad_(True)
    s = slice(LO * case.c, HI * case.c)
    args = (case.weight[s], case.bias[s], case.running_mean[s], case.running_var[s])
    y = batch_norm_act(x, *args, training=False, residual=res, backend="triton")
    got = torch.autograd.grad((y * case.dy).sum(), (x, res))
    x64, res64 = x.detach().double().requires_grad_(True), res.detach().double().requires_grad_(True)
    want_y = batch_norm_act_torch(x64, *(a.double() for a in args), training=False, residual=res64)
    want = torch.autograd.grad((want_y * case.dy.double()).sum(), (x64, res64))
    torch.testing.assert_close(y, want_y.float(), **FP32_TOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), **FP32_TOL)


def test_empty_batch_in_eval():
    x = torch.randn(0, 5, 4, 4)
    y = batch_norm_act(x, None, None, torch.zeros(5), torch.ones(5), training=False, backend="triton")
    assert y.shape == x.shape


NAMES = ("y", "dx", "dweight", "dbias", "dresidual", "running_mean", "running_var")


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "cl"))
@pytest.mark.parametrize("shape", ((16, 9 * 8, 16, 16), (8, 9 * 64, 4, 4), (3, 27, 7, 7)),
                         ids=("16x72x16x16", "8x576x4x4", "3x27x7x7"))
@cuda_compiled
def test_cuda_fp32_matches_twin(shape, channels_last, training):
    # several splits and channel blocks at the real tile sizes; errors relative to each tensor's
    # largest entry (the sums of N*H*W terms are reduced in another order than in the twin)
    case = Case(shape, channels_last, device="cuda")
    got, want = _triton(case, training, True), _twin64(case, training, True)
    for name, a, b in zip(NAMES, got, want):
        assert rel_err(a, b) < 2e-5, name


@cuda_compiled
def test_cuda_bf16_channels_last_against_fp32_reference():
    # the grouped model's layout under autocast; y, dx and dresidual are bf16, rounded once (half
    # an ulp, 2^-8 relative; checked against one ulp of the largest entry), the rest fp32
    case = Case((32, 9 * 64, 16, 16), channels_last=True, dtype=torch.bfloat16, device="cuda")
    case.dy = case.dy.to(torch.bfloat16).float()
    got, want = _triton(case, True, True), _twin64(case, True, True)
    for name, a, b in zip(NAMES, got, want):
        assert rel_err(a, b) < (2 ** -7 if a.dtype == torch.bfloat16 else 1e-4), name
