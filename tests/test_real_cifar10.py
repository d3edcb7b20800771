"""Real CIFAR-10 (training split only): a two-phase smoke run on a few thousand images evaluated on a
holdout carved from the training split, plus the phase-2 options the gate study and the baselines use
(frozen experts, a separate gate learning rate, the gate entropy / load-balance regularizer).

The real-data test runs when the official python files are present: ``FASTMOE_CIFAR10_DIR``, else
``<repo>/../shared/data/cifar10-train`` (``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from fastmoe_adv import FastSoftMoE
from fastmoe_adv.errors import ConfigError
from fastmoe_adv.train import LRSchedule, TrainConfig
from fastmoe_adv.train.steps import Phase2Attack, gate_regularizer, optimizer_groups, phase2_step

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar10_dir() -> Path | None:
    """The folder holding the CIFAR-10 training files, or None when they are absent."""
    env = os.environ.get("FASTMOE_CIFAR10_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train"
    present = (root / "cifar-10-python.tar.gz").is_file() or (root / "cifar-10-batches-py" / "data_batch_1").is_file()
    return root if present else None


def _tiny_moe(seed=0):
    torch.manual_seed(seed)
    return FastSoftMoE(num_experts=3, num_classes=10, width=4, mean=CIFAR_MEAN, std=CIFAR_STD, backend="torch",
                       executor="grouped", roles=["clean", "fgsm", "pgd"], gate_hidden=4)


# ---------------------------------------------------------------------------- the regularizer
def test_gate_regularizer_matches_its_formula_on_random_weights():
    w = torch.softmax(torch.randn(7, 5, dtype=torch.float64) * 2, dim=1).requires_grad_(True)
    got = gate_regularizer(w, 0.3, 0.7)
    entropy = -(w * w.log()).sum(1).mean()
    m = w.mean(0)
    kl = (m * (m / (1 / 5)).log()).sum()
    torch.testing.assert_close(got, -0.3 * entropy + 0.7 * kl, rtol=1e-12, atol=1e-12)
    got.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_gate_regularizer_uniform_weights_have_max_entropy_and_zero_imbalance():
    w = torch.full((4, 3), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(gate_regularizer(w, 1.0, 0.0), torch.tensor(-math.log(3), dtype=torch.float64))
    torch.testing.assert_close(gate_regularizer(w, 0.0, 1.0), torch.tensor(0.0, dtype=torch.float64))
    # A gate that gives every input the same skewed weights is penalized by the balance term.
    skew = torch.tensor([[0.8, 0.1, 0.1]] * 4, dtype=torch.float64)
    assert float(gate_regularizer(skew, 0.0, 1.0)) > 0.1


@pytest.mark.parametrize("field,value", [("gate_lr_scale", -1.0), ("gate_balance_weight", -0.1),
                                         ("gate_entropy_weight", float("nan")), ("train_experts", 1)])
def test_bad_gate_options_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


# ---------------------------------------------------------------------------- optimizer groups
def test_default_phase2_keeps_one_group_and_gate_lr_scale_splits_the_gate_out():
    model = _tiny_moe()
    params = list(model.parameters())
    assert len(optimizer_groups(model, params, TrainConfig(), 2)) == 1
    groups = optimizer_groups(model, params, TrainConfig(gate_lr_scale=3.0), 2)
    assert len(groups) == 2 and {id(p) for p in groups[0]["params"]} == {id(p) for p in model.gate.parameters()}
    opt = torch.optim.SGD(groups, lr=0.1)
    LRSchedule("cosine", 0.1, 10).apply(opt, 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3) and opt.param_groups[1]["lr"] == pytest.approx(0.1)
    # Phase 1 ignores the phase-2 options.
    assert len(optimizer_groups(model, model.experts.parameters(), TrainConfig(gate_lr_scale=3.0), 1)) == 1


def test_frozen_experts_phase2_step_moves_only_the_gate():
    model = _tiny_moe(seed=1)
    cfg = TrainConfig(train_experts=False, gate_balance_weight=0.5, gate_entropy_weight=-0.1, device="cpu")
    opt = torch.optim.SGD(optimizer_groups(model, list(model.parameters()), cfg, 2), lr=0.5, momentum=0.9)
    experts_before = {k: v.clone() for k, v in model.experts.state_dict().items()}
    gate_before = {k: v.clone() for k, v in model.gate.state_dict().items()}
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    for _ in range(2):
        loss, _ = phase2_step(model, model, opt, x, y, Phase2Attack("pgd", 8 / 255, 2 / 255, 2), cfg)
        assert torch.isfinite(loss)
    for k, v in model.experts.state_dict().items():     # weights AND BatchNorm buffers
        assert torch.equal(v, experts_before[k]), k
    moved = [k for k, v in model.gate.state_dict().items() if not torch.equal(v, gate_before[k])]
    assert "fc.weight" in moved and "bn1.running_mean" in moved


# ---------------------------------------------------------------------------- recipes
def test_recipes_match_the_config_names_and_build_valid_configs():
    from fastmoe_adv.recipes import FAST_ESTIMATE_S, RECIPES, recipe
    from fastmoe_adv.train.config import RECIPES as CONFIG_RECIPE_NAMES
    assert tuple(RECIPES) == tuple(CONFIG_RECIPE_NAMES) and RECIPES["paper"] == {}
    for name in RECIPES:
        TrainConfig(**recipe(name))
    fast = TrainConfig(**recipe("fast"))
    assert fast.holdout >= 2000 and fast.num_experts == 9 and fast.width == 64
    assert sum(FAST_ESTIMATE_S.values()) < 0.9 * 540     # the 9-minute budget with a margin
    recipe("fast")["width"] = 1                           # a copy: the recipe itself is unchanged
    assert RECIPES["fast"]["width"] == 64
    with pytest.raises(ValueError, match="recipe"):
        recipe("nope")


def test_matched_pgd_at_budget_equals_dwf_expert_image_passes():
    from fastmoe_adv.experiments import matched_pgd_at_config
    cfg = TrainConfig(num_experts=3, pretrain_epochs=3, train_epochs=1, batch_size=32)
    single = matched_pgd_at_config(cfg)
    assert (single.num_experts, single.roles, single.pretrain_epochs, single.batch_size) == (1, ("pgd",), 12, 32)
    assert matched_pgd_at_config(cfg, 3).batch_size == 96


# ---------------------------------------------------------------------------- real data
# The CPU scale of benchmarks/CIFAR10.md (experiments.CPU_SCALE: 3 experts of width 8, 4,000 training
# images, 3 + 1 epochs, PGD steps x 0.1, attack ramp over half of each phase), seed 0, evaluated on the
# 1,000-image holdout; the figures it gives and its wall time are recorded there ("Smoke test").
SMOKE_EVAL_IMAGES = 1000


@pytest.mark.slow
def test_real_cifar10_two_phases_beat_chance_under_pgd20(tmp_path, monkeypatch):
    # The Triton kernels are tested elsewhere: here the attacks' "auto" steps run their torch twins
    # instead of the CPU interpreter that conftest enables (measured: the interpreter made this test
    # several times slower).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    root = cifar10_dir()
    if root is None:
        pytest.skip("CIFAR-10 training files not found: set FASTMOE_CIFAR10_DIR to a folder holding "
                    "cifar-10-python.tar.gz (or cifar-10-batches-py/)")
    from fastmoe_adv import data
    from fastmoe_adv.evaluate import expert_robustness, mixture_robustness
    from fastmoe_adv.experiments import CPU_SCALE
    from fastmoe_adv.train import pretrain, train

    t0 = time.perf_counter()
    # backend "torch": under the tests' TRITON_INTERPRET=1, "auto" would run the Triton interpreter.
    seed = int(os.environ.get("FASTMOE_SMOKE_SEED", "0"))     # the margins were checked with seeds 0 and 1
    cfg = TrainConfig(**CPU_SCALE, data_dir=str(root), seed=seed, device="cpu", backend="torch", executor="grouped")
    assert cfg.holdout == SMOKE_EVAL_IMAGES
    s1 = pretrain(cfg, tmp_path, progress=False, log=lambda *a: None)
    s2 = train(cfg, tmp_path, progress=False, log=lambda *a: None)
    x, y = data.load_dataset("cifar10", root=root, split="holdout", holdout=cfg.holdout)
    assert len(y) == SMOKE_EVAL_IMAGES
    experts = expert_robustness(s1["model"], x, y, fgsm_eps=None, pgd_steps=20, batch_size=250)
    mixture = mixture_robustness(s2["model"], x, y, pgd_steps=20, batch_size=250)
    print(f"\nreal CIFAR-10 smoke: experts {experts}, mixture {mixture}, {time.perf_counter() - t0:.0f} s")
    clean_pgd, fgsm_pgd, pgd_pgd = experts["pgd"]
    # 1,000 images: a 95% interval is about +-2.5 points around these accuracies.
    assert mixture["clean"] > 0.30, mixture
    assert mixture["pgd"] > 0.15, mixture            # chance is 10%
    assert min(fgsm_pgd, pgd_pgd) > clean_pgd + 0.08, experts
