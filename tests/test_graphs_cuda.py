"""CUDA graphs on a GPU: the captured attack loops and training steps against the uncaptured ones.

With deterministic cuDNN and fp32 the replays run the very kernels the eager steps run, in the
same order, so results are compared bit for bit; bf16 autocast (captured with the autocast cache
off) is compared bit for bit too, since the casts give the same values. Every capture must
succeed (a failure would silently fall back to the eager body: the records say which).
"""
import warnings

import pytest
import torch
from helpers import random_reference, tiny_train_config

import fastmoe_adv as fm
from fastmoe_adv import attacks as A
from fastmoe_adv import graphs
from fastmoe_adv.train import steps as S

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _deterministic():
    old = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
           torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    graphs.clear()
    yield
    graphs.clear()
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = old


def _moe(executor="grouped", bn_backend="torch", width=16):
    ref = random_reference(9, width, mix="logits").cuda().eval()
    moe = fm.FastSoftMoE.from_reference(ref, executor=executor).eval()
    moe.bn_backend = bn_backend
    return moe


def _data(b=37, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.rand(b, 3, 32, 32, device="cuda", generator=g),
            torch.randint(0, 10, (b,), device="cuda", generator=g))


def _all_captured():
    recs = graphs.records()
    assert recs and all(r.status == "captured" for r in recs), graphs.explain()


@pytest.mark.parametrize("executor", ["grouped", "loop"])
@pytest.mark.parametrize("bf16", [False, True])
def test_captured_pgd_matches_eager_bit_for_bit(executor, bf16):
    moe = _moe(executor)
    x, y = _data()
    outs = []
    for graph in (False, True, True):      # the second graphed call replays the captured graph
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            gen = torch.Generator(device="cuda").manual_seed(1)
            outs.append(A.pgd(moe, x, y, 8 / 255, 2 / 255, 5, generator=gen, graph=graph))
    assert not torch.equal(outs[0], x)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    _all_captured()


def test_captured_pgd_with_the_fused_batchnorm():
    moe = _moe("grouped", bn_backend="triton")
    x, y = _data(b=21)
    plain = A.pgd(moe, x, y, 8 / 255, 2 / 255, 4, random_start=False)
    graphed = A.pgd(moe, x, y, 8 / 255, 2 / 255, 4, random_start=False, graph=True)
    assert (plain != graphed).float().mean() < 1e-3     # sign flips only where a gradient is ~0
    _all_captured()


def test_captured_attack_experts_matches_eager():
    moe = _moe()
    x, y = _data(b=19)
    plan = A.make_plan(moe.roles, [0.01, 0.02, 0.03, 0.04], [2, 5, 3, 4])
    outs = [A.attack_experts(moe, x, y, plan, generator=torch.Generator(device="cuda").manual_seed(2), graph=g)
            for g in (False, True, True)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    _all_captured()


def _syncs(fn):
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_captured_pgd_does_not_sync_per_step():
    moe = _moe()
    x, y = _data(b=16)
    for steps in (1, 8):   # capture outside the count
        A.pgd(moe, x, y, 8 / 255, 2 / 255, steps, graph=True)
    counts = [_syncs(lambda s=s: A.pgd(moe, x, y, 8 / 255, 2 / 255, s, graph=True)) for s in (1, 8)]
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("phase", [1, 2])
def test_captured_training_steps_match_eager(phase):
    cfg = tiny_train_config(num_experts=9, width=8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    states = []
    for graph in (False, True):
        torch.manual_seed(0)
        moe = fm.FastSoftMoE(num_experts=9, width=8, executor="grouped").cuda()
        params = moe.experts.parameters() if phase == 1 else moe.parameters()
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        net = S.ExpertsNet(moe) if phase == 1 else moe       # one owner for all steps: one capture
        choice, attack_gen = torch.Generator().manual_seed(4), torch.Generator(device="cuda").manual_seed(5)
        g.manual_seed(3)
        for _ in range(3):
            if phase == 1:
                x = torch.rand(12, 9, 3, 32, 32, device="cuda", generator=g)
                y = torch.randint(0, 10, (12, 9), device="cuda", generator=g)
                plan = S.draw_phase1_plan(list(moe.roles), cfg, choice)
                S.phase1_step(moe, net, opt, x, y, plan, attack_gen, graph=graph)
            else:
                x = torch.rand(12, 3, 32, 32, device="cuda", generator=g)
                y = torch.randint(0, 10, (12,), device="cuda", generator=g)
                S.phase2_step(moe, net, opt, x, y, S.draw_phase2_attack(cfg, choice), cfg, attack_gen, graph=graph)
        states.append({k: v.clone() for k, v in moe.state_dict().items()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    _all_captured()


def test_auto_executor_is_probed_as_graph_replays_inside_a_capture():
    from fastmoe_adv import autotune
    autotune.clear()
    moe = _moe("auto")
    x, y = _data(b=32)
    A.pgd(moe, x, y, 8 / 255, 2 / 255, 2, graph=True)
    decisions = [d for d in autotune.decisions() if dict(zip(autotune._KEY_FIELDS, d.key))["graphed"]]
    assert decisions and all(d.source == "probe" for d in decisions), autotune.explain()
    _all_captured()
