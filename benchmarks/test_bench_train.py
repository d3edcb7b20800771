"""Training steps, images/s: ours against a per-expert eager twin, side by side.

Phase 1 (expert pre-training), one step = nine experts on their own streams ``x [B,E,3,H,W]``:
attack every expert against itself by its role (clean / FGSM eps 0.03 / PGD), one forward/
backward on the adversarial streams (loss: sum over experts of each one's mean CE), one SGD step.
- ``fastmoe``: ``fastmoe_adv.train.phase1_step`` (``attacks.attack_experts``: all experts in one
  grouped pass per attack step) on ``FastSoftMoE(executor="auto")``;
- ``fastmoe+graph`` (CUDA): the same step with ``graph=True`` (``TrainConfig.cuda_graphs``): each
  attack step and the training forward+backward the replay of a captured CUDA graph, the SGD
  step eager (the rows record ``graphed: True``; without CUDA they skip: the graphed code would
  run uncaptured);
- ``reference``: the nine ``ResNet18`` of the ``ReferenceSoftMoE`` twin, one after another, each
  attacked with the eager FGSM/PGD of ``bench_utils`` and trained on its own stream; one SGD step.
Images per step: B*E (every expert's stream).

Phase 2 (joint training), one step = PGD against the whole mixture, then CE on the mixture's
output and one SGD step over experts and gate.
- ``fastmoe``: ``fastmoe_adv.train.phase2_step``; ``fastmoe+graph`` (CUDA): with ``graph=True``;
- ``reference``: eager PGD on ``ReferenceSoftMoE`` + SGD.
Images per step: B.

PGD step counts are tiny on CPU (2; 1 in quick mode), 10 on CUDA.
"""
import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_utils import (
    QUICK,
    eager_fgsm,
    eager_pgd,
    expert_flops,
    graph_row,
    models,
    run,
    skip_on_oom,
    skip_unless_device,
    skip_unless_graphs,
)

from fastmoe_adv import attacks
from fastmoe_adv.train import Phase2Attack, TrainConfig, phase1_step, phase2_step
from fastmoe_adv.train.steps import ExpertsNet

E, K, HW = 9, 10, 32
FGSM_EPS, PGD_EPS, PGD_ALPHA = 0.03, 8 / 255, 2 / 255
# (device, width, batch, precision, pgd steps); phase 1's batch is per expert.
CONFIGS = [("cpu", 4, 4, "fp32", 1), ("cuda", 4, 4, "bf16", 1)] if QUICK else \
          [("cpu", 8, 32, "fp32", 2), ("cuda", 64, 128, "fp32", 10), ("cuda", 64, 128, "bf16", 10)]
ROUNDS = {"cpu": 3, "cuda": 3}


def _rows():
    out = []
    for cfg in CONFIGS:
        for phase in ("phase1", "phase2"):
            for path in ("fastmoe", "fastmoe+graph", "reference"):
                marks = [pytest.mark.cuda] if cfg[0] == "cuda" else []
                out.append(pytest.param(cfg, phase, path, marks=marks,
                                        id=f"{cfg[0]}-w{cfg[1]}-b{cfg[2]}-{cfg[3]}-{phase}-{path}"))
    return out


class _Expert(nn.Module):
    """Expert ``e`` of a ``ReferenceSoftMoE`` on raw [0, 1] images."""

    def __init__(self, moe, e):
        super().__init__()
        self.moe, self.e = moe, e

    def forward(self, x):
        return self.moe.experts[self.e](self.moe.normalize(x))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


# ----------------------------------------------------------------------------- phase 1
def _phase1_reference(ref, prec, device, steps):
    experts = [_Expert(ref, e) for e in range(E)]
    opt = _sgd(ref.experts.parameters())

    def step(x, y):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"):
            adv = []
            for e, (role, m) in enumerate(zip(ref.roles, experts)):
                xe, ye = x[:, e], y[:, e]
                if role == "fgsm":
                    xe = eager_fgsm(m, xe, ye, FGSM_EPS)
                elif role == "pgd":
                    xe = eager_pgd(m, xe, ye, PGD_EPS, PGD_ALPHA, steps)
                adv.append(xe)
            ref.train()
            loss = sum(F.cross_entropy(m(xe).float(), y[:, e]) for e, (m, xe) in enumerate(zip(experts, adv)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _phase1_fastmoe(fast, prec, device, steps, generator, graph):
    net = ExpertsNet(fast)
    opt = _sgd(fast.experts.parameters())
    plan = attacks.make_plan(fast.roles, fgsm_eps=FGSM_EPS, pgd_steps=steps, pgd_eps=PGD_EPS, pgd_alpha=PGD_ALPHA)
    return (lambda x, y: phase1_step(fast, net, opt, x, y, plan, generator=generator, bf16=prec == "bf16",
                                     graph=graph)), f"train.phase1_step(graph={graph})"


# ----------------------------------------------------------------------------- phase 2
def _phase2_reference(ref, prec, device, steps):
    opt = _sgd(ref.parameters())

    def step(x, y):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"):
            x_adv = eager_pgd(ref, x, y, PGD_EPS, PGD_ALPHA, steps)
            ref.train()
            loss = F.cross_entropy(ref(x_adv).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _phase2_fastmoe(fast, prec, device, steps, generator, layout_cl, graph):
    opt = _sgd(fast.parameters())
    cfg = TrainConfig(width=fast.width, bf16=prec == "bf16", channels_last=layout_cl, pgd_eps=PGD_EPS,
                      pgd_alpha=PGD_ALPHA, cuda_graphs=graph)
    attack = Phase2Attack("pgd", PGD_EPS, PGD_ALPHA, steps)
    return (lambda x, y: phase2_step(fast, fast, opt, x, y, attack, cfg, generator=generator, graph=graph)), \
        f"train.phase2_step(graph={graph})"


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("cfg, phase, path", _rows())
def test_train_step(benchmark, cfg, phase, path):
    device, width, batch, prec, steps = cfg
    skip_unless_device(device)
    graph = path == "fastmoe+graph"
    if graph:
        skip_unless_graphs(device)
    cl = device == "cuda"   # GPU rows channels_last (as train.py's channels_last option)
    ref, fast = models(device, width, "cl" if cl else "nchw", E, K)
    fast.executor, fast.bn_backend = "auto", "torch"
    ref.train(), fast.train()
    gen = torch.Generator(device=device).manual_seed(0)
    info = {"width": width, "batch": batch, "experts": E, "precision": prec, "pgd_steps": steps,
            "layout": "cl" if cl else "nchw", "phase": phase, "graphed": graph}
    if phase == "phase1":
        x = torch.rand(batch, E, 3, HW, HW, device=device)
        y = torch.randint(0, K, (batch, E), device=device)
        images = batch * E
        # per expert: PGD experts `steps` attack steps, FGSM experts 1, then one training pass
        roles = ref.roles
        attack_passes = sum(steps if r == "pgd" else 1 if r == "fgsm" else 0 for r in roles)
        flops = expert_flops(width, HW, HW, batch, attack_passes, "fwd+bwd-input") + \
            expert_flops(width, HW, HW, batch, E, "fwd+bwd")
        if path == "reference":
            step, how = _phase1_reference(ref, prec, device, steps), "per-expert eager loop"
        else:
            step, how = _phase1_fastmoe(fast, prec, device, steps, gen, graph)
    else:
        x = torch.rand(batch, 3, HW, HW, device=device)
        y = torch.randint(0, K, (batch,), device=device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        images = batch
        flops = expert_flops(width, HW, HW, batch, E * steps, "fwd+bwd-input") + \
            expert_flops(width, HW, HW, batch, E, "fwd+bwd")
        if path == "reference":
            step, how = _phase2_reference(ref, prec, device, steps), "eager PGD + SGD on ReferenceSoftMoE"
        else:
            step, how = _phase2_fastmoe(fast, prec, device, steps, gen, cl, graph)
    info["implementation"] = how
    info["model"] = type(ref if path == "reference" else fast).__name__
    info["executor"] = "modulelist" if path == "reference" else "auto+graph" if graph else "auto"
    with skip_on_oom(device), (graph_row(device) if graph else contextlib.nullcontext()) as graph_status:
        step(x, y)  # warm-up, untimed (cuDNN algorithm search, executor="auto" probes, graph captures)
        if graph:
            info.update(graph_status())
        if path != "reference":
            from fastmoe_adv import autotune
            info["auto_decisions"] = [f"{d.executor} [{d.source}]" for d in autotune.decisions()[-4:]]
        run(benchmark, lambda: step(x, y), device=device,
            group=f"train {phase} {device} w{width} b{batch} {prec} pgd-{steps}", path=path, images=images,
            flops=flops, reference=path == "reference", rounds_full=ROUNDS[device], warmup=0, **info)
