"""PGD-10 and APGD-CE against the whole mixture, images/s, side by side in one group per size.
Every row records the model it attacks (``model``: FastSoftMoE or ReferenceSoftMoE).

- ``fastmoe-auto``: ``fm.attacks.pgd`` on ``FastSoftMoE(backend="auto", executor="auto")``
  (fused ``pgd_step``, grouped experts, the executor auto picks; the row records the pick);
- ``fastmoe-grouped`` / ``fastmoe-loop``: the same with the executor forced, so the report can
  check auto's pick for the attack's pass (eval-mode BN, gradient w.r.t. the input only);
- ``fastmoe-auto+graph`` / ``fastmoe-grouped+graph`` / ``fastmoe-loop+graph`` (CUDA): the same
  with ``graph=True``, each PGD iteration the replay of one captured CUDA graph (the rows record
  ``graphed: True``; without CUDA they skip: the graphed code would run uncaptured);
- ``reference``: a plain eager PGD written here (``autograd.grad``, ``sign``, ``clamp``) on the
  ``ReferenceSoftMoE`` twin with the same weights: the group's reference row;
- ``torchattacks``: ``torchattacks.PGD`` on the ``ReferenceSoftMoE``, when it imports;
- ``torchattacks-fastmoe``: ``torchattacks.PGD`` on the same ``FastSoftMoE`` as the ``fastmoe-*``
  rows (executor auto), when it imports: the same engine under someone else's attack loop.

PGD rows: eps 8/255, alpha 2/255, random start, eval mode (what ``fm.attacks.pgd`` does).

APGD-CE rows (100 iterations, 5 in quick mode; eps 8/255, one restart, eval mode):
- ``fastmoe-apgd``: ``fastmoe_adv.apgd.apgd`` on ``FastSoftMoE`` (fused step, grouped experts);
- ``torchattacks-apgd``: ``torchattacks.APGD`` on the ``ReferenceSoftMoE`` with the same weights and
  images, the group's reference row, when torchattacks imports.
Both rows also record the robust accuracy their examples leave (labels: the clean predictions).
"""
import contextlib
import importlib

import pytest
import torch
from bench_utils import (
    QUICK,
    eager_pgd,
    expert_flops,
    graph_row,
    models,
    run,
    skip_on_oom,
    skip_unless_device,
    skip_unless_graphs,
)

from fastmoe_adv.constants import DEFAULT_ALPHA, DEFAULT_EPS

E, K, HW = 9, 10, 32
EPS, ALPHA = DEFAULT_EPS, DEFAULT_ALPHA
STEPS = 2 if QUICK else 10
# (device, width, batch, precision)
CONFIGS = [("cpu", 4, 4, "fp32"), ("cuda", 4, 4, "bf16")] if QUICK else \
          [("cpu", 8, 32, "fp32"), ("cuda", 64, 256, "fp32"), ("cuda", 64, 256, "bf16"), ("cuda", 64, 512, "bf16")]
# The rows a short GPU run needs first (a run cut short keeps them): ours eager and graphed, the references.
PATHS = ("reference", "fastmoe-auto", "fastmoe-auto+graph", "torchattacks", "torchattacks-fastmoe",
         "fastmoe-grouped", "fastmoe-grouped+graph", "fastmoe-loop", "fastmoe-loop+graph")
ROUNDS = {"cpu": 7, "cuda": 5}  # w8 b32 on CPU is near a tie between the executors: more rounds


def _rows(configs, paths):
    """One row per (config, path), CUDA rows marked."""
    return [pytest.param(cfg, path, marks=[pytest.mark.cuda] if cfg[0] == "cuda" else [],
                         id=f"{cfg[0]}-w{cfg[1]}-b{cfg[2]}-{cfg[3]}-{path}") for cfg in configs for path in paths]


@pytest.mark.parametrize("cfg, path", _rows(CONFIGS, PATHS))
def test_pgd(benchmark, cfg, path):
    device, width, batch, prec = cfg
    skip_unless_device(device)
    graphed = path.endswith("+graph")
    if graphed:
        skip_unless_graphs(device)
    layout = "cl" if device == "cuda" else "nchw"   # GPU rows channels_last, as the experts benchmark
    ref, fast = models(device, width, layout, E, K)
    ref.eval(), fast.eval()
    fast.bn_backend = "torch"
    # The models as built (the cache is shared with files that switch this off): each forward checks
    # its pixels, except inside fm.attacks.pgd, which checks once per call (attacks.attack_mode).
    ref.check_inputs = fast.check_inputs = True
    x = torch.rand(batch, 3, HW, HW, device=device)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, K, (batch,), device=device)
    info = {"width": width, "batch": batch, "experts": E, "precision": prec, "steps": STEPS, "eps": EPS,
            "alpha": ALPHA, "layout": layout, "graphed": graphed, "model_check_inputs": True}
    attack = _attack(path, ref, fast, x, y, info)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"):
            return attack()

    with skip_on_oom(device), (graph_row(device) if graphed else contextlib.nullcontext()) as graph_status:
        if path.startswith("fastmoe") or path == "torchattacks-fastmoe":
            info["auto_pick"], info["auto_reason"] = _auto_pick(fast, x, prec, device)
        step()  # warm-up, untimed (cuDNN algorithm search; auto's probe, if any, ran just above; graph capture)
        if graphed:
            info.update(graph_status())
        run(benchmark, step, device=device, group=f"attack pgd-{STEPS} {device} w{width} b{batch} {prec}",
            path=path, images=batch, flops=expert_flops(width, HW, HW, batch, E, "fwd+bwd-input") * STEPS,
            reference=path == "reference", rounds_full=ROUNDS[device], warmup=0, **info)


def _attack(path, ref, fast, x, y, info):
    """The row's PGD-10 as a callable; records the model it attacks (and how) in ``info``."""
    if path == "reference":
        info.update(executor="modulelist", model=type(ref).__name__)
        return lambda: eager_pgd(ref, x, y, EPS, ALPHA, STEPS)
    if path.startswith("torchattacks"):
        try:
            torchattacks = importlib.import_module("torchattacks")
        except Exception as exc:  # noqa: BLE001 (ImportError, or a broken install)
            pytest.skip(f"torchattacks not importable: {type(exc).__name__}: {exc}")
        model = fast if path == "torchattacks-fastmoe" else ref
        if model is fast:
            fast.executor = "auto"
        info.update(executor=fast.executor if model is fast else "modulelist", model=type(model).__name__,
                    torchattacks_version=getattr(torchattacks, "__version__", "?"),
                    note=f"torchattacks.PGD on {type(model).__name__}")
        atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
        return lambda: atk(x, y)
    attacks = importlib.import_module("fastmoe_adv.attacks")
    executor = path.split("-", 1)[1].removesuffix("+graph")
    fast.executor = executor
    gen = torch.Generator(device=x.device).manual_seed(0)
    graph = path.endswith("+graph")
    info.update(executor=executor + ("+graph" if graph else ""), backend=fast.backend, model=type(fast).__name__)
    return lambda: attacks.pgd(fast, x, y, EPS, ALPHA, STEPS, random_start=True, generator=gen, graph=graph)


def _auto_pick(fast, x, prec, device):
    """What executor="auto" picks for the attack's own expert call: eval-mode BN, grad mode on,
    a normalized input that requires grad, under the row's autocast."""
    from fastmoe_adv import autotune
    xn = fast.normalize(x).detach().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"), torch.enable_grad():
        decision = autotune.decide(fast.experts, xn)
    return decision.executor, decision.reason


APGD_STEPS = 5 if QUICK else 100
# (device, width, batch, precision): 100 APGD iterations are ten PGD-10 calls, so the CPU row is smaller.
APGD_CONFIGS = [("cpu", 4, 4, "fp32"), ("cuda", 4, 4, "bf16")] if QUICK else \
               [("cpu", 4, 8, "fp32"), ("cuda", 64, 256, "fp32"), ("cuda", 64, 256, "bf16")]
APGD_PATHS = ("torchattacks-apgd", "fastmoe-apgd")


@pytest.mark.parametrize("cfg, path", _rows(APGD_CONFIGS, APGD_PATHS))
def test_apgd(benchmark, cfg, path):
    device, width, batch, prec = cfg
    skip_unless_device(device)
    apgd_mod = importlib.import_module("fastmoe_adv.apgd")
    layout = "cl" if device == "cuda" else "nchw"
    ref, fast = models(device, width, layout, E, K)
    ref.eval(), fast.eval()
    fast.executor = "auto"
    x = torch.rand(batch, 3, HW, HW, device=device, generator=torch.Generator(device=device).manual_seed(1))
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = ref(x).argmax(1)  # clean predictions: the robust accuracy starts at 100%
    info = {"width": width, "batch": batch, "experts": E, "precision": prec, "steps": APGD_STEPS, "eps": EPS,
            "layout": layout, "loss": "ce", "restarts": 1}
    if path == "torchattacks-apgd":
        try:
            torchattacks = importlib.import_module("torchattacks")
        except Exception as exc:  # noqa: BLE001 (ImportError, or a broken install)
            pytest.skip(f"torchattacks not importable: {type(exc).__name__}: {exc}")
        atk = torchattacks.APGD(ref, eps=EPS, steps=APGD_STEPS, loss="ce", seed=0)
        attack = lambda: atk(x, y)  # noqa: E731
        model = ref
        info["torchattacks_version"] = getattr(torchattacks, "__version__", "?")
    else:
        attack = lambda: apgd_mod.apgd(fast, x, y, EPS, APGD_STEPS,  # noqa: E731
                                       generator=torch.Generator(device=device).manual_seed(0))
        model = fast
        info["backend"] = fast.backend
    info["model"] = type(model).__name__

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"):
            return attack()

    with skip_on_oom(device):
        x_adv = step()  # warm-up, untimed; its examples give the row's robust accuracy
        with torch.no_grad():
            info["robust_accuracy"] = float((ref(x_adv).argmax(1) == y).float().mean())
        # APGD runs two forward/backward passes' worth per iteration at most; count one, as the PGD rows.
        run(benchmark, step, device=device, group=f"attack apgd-ce-{APGD_STEPS} {device} w{width} b{batch} {prec}",
            path=path, images=batch, flops=expert_flops(width, HW, HW, batch, E, "fwd+bwd-input") * APGD_STEPS,
            reference=path == "torchattacks-apgd", rounds_full=3, warmup=0, **info)
