"""Helpers shared by the tests."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import fastmoe_adv as fm
import fastmoe_adv.grouped  # noqa: F401


def randomize_(module: torch.nn.Module, generator=None):
    """Random (never zero) parameters and BatchNorm statistics, so no comparison is trivial."""
    bn_types = (torch.nn.BatchNorm2d, fm.grouped.GroupedBatchNorm2d)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, bn_types):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
                m.num_batches_tracked.copy_(torch.randint(0, 1000, m.num_batches_tracked.shape, generator=generator))
            else:
                for p in m.parameters(recurse=False):
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module


def random_reference(num_experts, width, num_classes=10, mix="logits", seed=0, **kw):
    torch.manual_seed(seed)
    ref = fm.ReferenceSoftMoE(num_experts=num_experts, num_classes=num_classes, width=width, mix=mix, **kw)
    return randomize_(ref)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def grouped_grads_per_expert(grouped: fm.GroupedResNet18):
    """The grouped engine's parameter gradients, split into E torchvision-keyed dicts."""
    holder = copy.deepcopy(grouped)
    with torch.no_grad():
        for p_holder, p in zip(holder.parameters(), grouped.parameters()):
            p_holder.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    params = {n for n, _ in fm.ResNet18(grouped.num_classes, grouped.width).named_parameters()}
    return [{k: v for k, v in holder.expert_state_dict(e).items() if k in params}
            for e in range(grouped.num_experts)]


def assert_kernels_compile_for_sm90(op, tmp_path):
    """The interpreter accepts constructs the CUDA compiler rejects: compile ``op``'s kernels for
    sm_90 with the real compiler (no GPU needed), in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-W", "ignore", "-m", "fastmoe_adv.kernels.aot_check", op, "--quick", "--dtypes", "fp32"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr


def tiny_train_config(**kw):
    """A training configuration that runs both phases in seconds on a CPU (4 steps per epoch)."""
    from fastmoe_adv.train import TrainConfig
    base = dict(dataset="synthetic", train_size=64, width=4, num_experts=3, batch_size=16, pretrain_epochs=1,
                train_epochs=1, steps_scale=0.04, eval_every=-1, eval_limit=32, checkpoint_every=2, log_every=1,
                backend="torch", executor="grouped", device="cpu", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)
