"""FastSoftMoE on a GPU: fp32 against the reference twin, bf16 autocast against fp32."""
import pytest
import torch
from helpers import grouped_grads_per_expert, random_reference, rel_err

import fastmoe_adv as fm

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# cuDNN picks different algorithms for grouped and plain convolutions; TF32 is switched off so
# that fp32 means fp32 and the tolerance below is the engine's, not TF32's.
FP32_TOL = 1e-4
BF16_TOL = 5e-2   # bf16 keeps 8 mantissa bits; 20 layers deep the logits stay within a few percent


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("executor", ["grouped", "loop"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("train", [True, False])
def test_fp32_matches_reference(executor, backend, train):
    ref = random_reference(9, 16, mix="logits").cuda().train(train)
    fast = fm.FastSoftMoE.from_reference(ref, backend=backend, executor=executor).train(train)
    x = torch.rand(37, 3, 32, 32, device="cuda")
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(xr), fast(xf)
    assert rel_err(out_f, out_r) <= FP32_TOL
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (out_f * g).sum().backward()
    assert rel_err(xf.grad, xr.grad) <= FP32_TOL
    for e, grads in enumerate(grouped_grads_per_expert(fast.experts)):
        for k, p in ref.experts[e].named_parameters():
            assert rel_err(grads[k], p.grad) <= FP32_TOL, (e, k)


@pytest.mark.parametrize("executor", ["grouped", "loop"])
def test_bf16_autocast_close_to_fp32_reference(executor):
    ref = random_reference(9, 64, mix="probs").cuda().eval()
    fast = fm.FastSoftMoE.from_reference(ref, executor=executor).eval().to(memory_format=torch.channels_last)
    x = torch.rand(64, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = ref(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(x)
    assert rel_err(got.float(), want) <= BF16_TOL
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
