"""Two-process DDP on CPU (gloo, torch.multiprocessing.spawn with torchrun's environment).

What is checked, and the tolerance:
- one phase-1 step and one phase-2 step through DDP, each rank on its half of a fixed global
  batch, give the same parameters as a single process that computes the gradient of the mean
  loss over the global batch, with BatchNorm seeing each half separately (as each rank's BN
  does: ``GroupedBatchNorm2d`` is not synchronized across ranks) and each half's PGD random
  start drawn from that rank's generator. The two sides can differ only in the order of float
  additions (gloo's all-reduce of the gradients), so the test allows 1e-5 relative to the
  largest update of each tensor (measured: bit-identical on CPU). BN running statistics are NOT
  compared: with DDP each rank updates its own from its half, and rank 0's are broadcast;
- the two replicas stay bit-identical (DDP);
- ``pretrain`` and ``train`` run end to end under 2 processes: only rank 0 writes the
  checkpoints, which record world_size 2, and both ranks end with the same weights.
"""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import tiny_train_config

import fastmoe_adv as fm
from fastmoe_adv import attacks as A
from fastmoe_adv.train import trainer as trainer_mod

ROLES = ["clean", "fgsm", "pgd"]
B_GLOBAL = 8
LR = 0.1
PHASE2_STEPS = 2


def _tiny_moe():
    torch.manual_seed(0)
    moe = fm.FastSoftMoE(num_experts=3, num_classes=10, width=4, roles=ROLES, backend="torch", executor="grouped")
    torch.nn.init.normal_(moe.gate.fc.weight, std=0.1)
    return moe


def _global_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B_GLOBAL, 3, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (B_GLOBAL, 3), generator=g)
    return x, y


def _plan():
    return A.make_plan(ROLES, fgsm_eps=[0.05], pgd_steps=[3])


def _half(rank, world=2):
    n = B_GLOBAL // world
    return slice(rank * n, (rank + 1) * n)


def _rank_gen(rank):
    return torch.Generator().manual_seed(100 + rank)


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)


def _tiny_cfg(**kw):
    return tiny_train_config(**{"eval_limit": 16, **kw})


def _worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    from fastmoe_adv import distributed as distd
    from fastmoe_adv import train as tr

    info = distd.setup("cpu")
    try:
        x, y = _global_batch()
        s = _half(rank, world)
        out = {}
        # ---- one phase-1 step through DDP on this rank's half
        model = _tiny_moe()
        net = trainer_mod._wrap_ddp(tr.steps.ExpertsNet(model), info)
        tr.phase1_step(model, net, _sgd(model.experts.parameters()), x[s], y[s], _plan(), generator=_rank_gen(rank))
        out["phase1"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        # ---- one phase-2 step through DDP (the whole mixture) on this rank's half
        model = _tiny_moe()
        net = trainer_mod._wrap_ddp(model, info)
        cfg = _tiny_cfg()
        attack = tr.Phase2Attack("pgd", cfg.pgd_eps, cfg.pgd_alpha, PHASE2_STEPS)
        tr.phase2_step(model, net, _sgd(model.parameters()), x[s, 0], y[s, 0], attack, cfg,
                       generator=_rank_gen(rank))
        out["phase2"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        # ---- both phases end to end (rank 0 writes)
        cfg = _tiny_cfg()
        s1 = tr.pretrain(cfg, Path(tmp) / "run", progress=False, log=lambda *a: None)
        s2 = tr.train(cfg, Path(tmp) / "run", progress=False, log=lambda *a: None)
        out["e2e"] = {"phase1": {k: v.clone() for k, v in s1["model"].state_dict().items()},
                      "phase2": {k: v.clone() for k, v in s2["model"].state_dict().items()},
                      "world_size": s2["world_size"], "steps": s2["global_step"]}
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        distd.cleanup(info)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_phase1():
    """Single process: gradient of the global-batch mean loss, BN per half, then one SGD step."""
    from fastmoe_adv import train as tr
    x, y = _global_batch()
    model = _tiny_moe()
    net = tr.steps.ExpertsNet(model)
    opt = _sgd(model.experts.parameters())
    opt.zero_grad()
    # every rank attacks before any rank's training forward updates the BN running statistics
    x_adv = {rank: A.attack_experts(model, x[_half(rank)], y[_half(rank)], _plan(), generator=_rank_gen(rank))
             for rank in (0, 1)}
    for rank in (0, 1):
        s = _half(rank)
        net.train()
        logits = net(x_adv[rank])
        b, e, k = logits.shape
        ce = F.cross_entropy(logits.reshape(b * e, k), y[s].reshape(-1), reduction="none").view(b, e)
        (ce.mean(0).sum() / 2).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _reference_phase2():
    x, y = _global_batch()
    cfg = _tiny_cfg()
    model = _tiny_moe()
    opt = _sgd(model.parameters())
    opt.zero_grad()
    x_adv = {rank: A.pgd(model, x[_half(rank), 0], y[_half(rank), 0], cfg.pgd_eps, cfg.pgd_alpha, PHASE2_STEPS,
                         generator=_rank_gen(rank)) for rank in (0, 1)}
    for rank in (0, 1):
        model.train()
        (F.cross_entropy(model(x_adv[rank]), y[_half(rank), 0]) / 2).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_and_trains(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    init = dict(_tiny_moe().named_parameters())
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = {"phase1": _reference_phase1(), "phase2": _reference_phase2()}
    finally:
        torch.set_num_threads(n)
    for phase, ref in refs.items():
        for name, p_ref in ref.items():
            assert torch.equal(r0[phase][name], r1[phase][name]), f"{phase}: replicas differ at {name}"
            if phase == "phase1" and name.startswith("gate."):
                assert torch.equal(r0[phase][name], init[name])   # the gate is not trained in phase 1
                continue
            step = (p_ref - init[name]).abs().max()
            assert step > 0, f"{phase}: {name} did not move"
            err = (r0[phase][name] - p_ref).abs().max()
            assert err <= 1e-5 * max(step.item(), 1e-3), f"{phase}: {name} differs by {err} (update {step})"
    # end to end: both ranks hold the same weights; rank 0 wrote checkpoints recording world size 2
    for phase in ("phase1", "phase2"):
        for k, v in r0["e2e"][phase].items():
            if k.endswith("running_mean") or k.endswith("running_var"):
                continue   # per-rank BN statistics (DDP broadcasts rank 0's before each forward)
            assert torch.equal(v, r1["e2e"][phase][k]), f"e2e {phase}: ranks differ at {k}"
    run = tmp_path / "run"
    assert (run / "phase1.pt").exists() and (run / "phase2.pt").exists() and (run / "last.pt").exists()
    payload = torch.load(run / "phase2.pt", weights_only=True)
    assert payload["world_size"] == 2 and payload["done"] and r0["e2e"]["steps"] == 4
    assert len(payload["rng"]["attack"]) == 2 and len(payload["loaders"]) == 2
    for k, v in payload["model"].items():
        assert torch.equal(v, r0["e2e"]["phase2"][k])


def _stop_flag_worker(rank, world, port, tmp):
    """Counts the collectives the training loop issues for its stop/divergence flags."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    from fastmoe_adv import distributed as distd
    from fastmoe_adv import train as tr

    calls = {"n": 0}
    real = distd.dist.all_reduce

    def counting(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)
    distd.dist.all_reduce = counting
    try:
        cfg = _tiny_cfg(pretrain_epochs=2, log_every=4, checkpoint_every=100)   # 4 steps per epoch, 8 in all
        s1 = tr.pretrain(cfg, Path(tmp) / "run", progress=False, log=lambda *a: None)
        torch.save({"all_reduce": calls["n"], "steps": s1["global_step"]}, Path(tmp) / f"flags{rank}.pt")
    finally:
        distd.dist.all_reduce = real


def test_stop_flag_is_agreed_at_log_boundaries_only(tmp_path):
    """No host sync per step under DDP: one all-reduce per log boundary (steps 4 and 8), not per step."""
    mp.spawn(_stop_flag_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"flags{rank}.pt")
        assert got["steps"] == 8 and got["all_reduce"] == 2, got
