"""PGD-10 against the whole mixture, images/s, side by side in one group per size.

- ``fastmoe-auto``: ``fm.attacks.pgd`` on ``FastSoftMoE(backend="auto", executor="auto")``
  (fused ``pgd_step``, grouped experts, the executor auto picks; the row records the pick);
- ``fastmoe-grouped`` / ``fastmoe-loop``: the same with the executor forced, so the report can
  check auto's pick for the attack's pass (eval-mode BN, gradient w.r.t. the input only);
- ``reference``: a plain eager PGD written here (``autograd.grad``, ``sign``, ``clamp``) on the
  ``ReferenceSoftMoE`` twin with the same weights: the group's reference row;
- ``torchattacks``: ``torchattacks.PGD`` on the ``ReferenceSoftMoE``, when it imports.

All rows: eps 8/255, alpha 2/255, random start, eval mode (what ``fm.attacks.pgd`` does).
"""
import importlib

import pytest
import torch
from bench_utils import QUICK, eager_pgd, expert_flops, models, run, skip_on_oom, skip_unless_device

E, K, HW = 9, 10, 32
EPS, ALPHA = 8 / 255, 2 / 255
STEPS = 2 if QUICK else 10
# (device, width, batch, precision)
CONFIGS = [("cpu", 4, 4, "fp32"), ("cuda", 4, 4, "bf16")] if QUICK else \
          [("cpu", 8, 32, "fp32"), ("cuda", 64, 256, "fp32"), ("cuda", 64, 256, "bf16")]
PATHS = ("reference", "fastmoe-auto", "fastmoe-grouped", "fastmoe-loop", "torchattacks")
ROUNDS = {"cpu": 7, "cuda": 5}  # w8 b32 on CPU is near a tie between the executors: more rounds


def _rows():
    out = []
    for cfg in CONFIGS:
        for path in PATHS:
            marks = [pytest.mark.cuda] if cfg[0] == "cuda" else []
            out.append(pytest.param(cfg, path, marks=marks, id=f"{cfg[0]}-w{cfg[1]}-b{cfg[2]}-{cfg[3]}-{path}"))
    return out


@pytest.mark.parametrize("cfg, path", _rows())
def test_pgd(benchmark, cfg, path):
    device, width, batch, prec = cfg
    skip_unless_device(device)
    try:
        attacks = importlib.import_module("fastmoe_adv.attacks")
    except ImportError as exc:
        pytest.skip(f"fastmoe_adv.attacks not importable yet: {exc}")
    layout = "cl" if device == "cuda" else "nchw"   # GPU rows channels_last, as the experts benchmark
    ref, fast = models(device, width, layout, E, K)
    ref.eval(), fast.eval()
    x = torch.rand(batch, 3, HW, HW, device=device)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, K, (batch,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    info = {"width": width, "batch": batch, "experts": E, "precision": prec, "steps": STEPS, "eps": EPS,
            "alpha": ALPHA, "layout": layout}

    if path == "reference":
        attack = lambda: eager_pgd(ref, x, y, EPS, ALPHA, STEPS)  # noqa: E731
        info["executor"] = "modulelist"
    elif path == "torchattacks":
        try:
            torchattacks = importlib.import_module("torchattacks")
        except Exception as exc:  # noqa: BLE001 (ImportError, or a broken install)
            pytest.skip(f"torchattacks not importable: {type(exc).__name__}: {exc}")
        atk = torchattacks.PGD(ref, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
        attack = lambda: atk(x, y)  # noqa: E731
        info["executor"] = "modulelist"
        info["torchattacks_version"] = getattr(torchattacks, "__version__", "?")
    else:
        executor = path.split("-", 1)[1]
        fast.executor = executor
        attack = lambda: attacks.pgd(fast, x, y, EPS, ALPHA, STEPS, random_start=True, generator=gen)  # noqa: E731
        info["executor"] = executor
        info["backend"] = fast.backend

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"):
            return attack()

    with skip_on_oom(device):
        if path.startswith("fastmoe"):
            info["auto_pick"], info["auto_reason"] = _auto_pick(fast, x, prec, device)
        step()  # warm-up, untimed (cuDNN algorithm search; auto's probe, if any, ran just above)
        run(benchmark, step, device=device, group=f"attack pgd-{STEPS} {device} w{width} b{batch} {prec}",
            path=path, images=batch, flops=expert_flops(width, HW, HW, batch, E, "fwd+bwd-input") * STEPS,
            reference=path == "reference", rounds_full=ROUNDS[device], warmup=0, **info)


def _auto_pick(fast, x, prec, device):
    """What executor="auto" picks for the attack's own expert call: eval-mode BN, grad mode on,
    a normalized input that requires grad, under the row's autocast."""
    from fastmoe_adv import autotune
    xn = fast.normalize(x).detach().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"), torch.enable_grad():
        decision = autotune.decide(fast.experts, xn)
    return decision.executor, decision.reason
