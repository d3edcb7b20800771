"""fastmoe_adv.train: config validation, the phase-1 step's isolation of the expert streams, the
clean expert's clean input, the phase-2 step, exact resume (in-process SIGTERM and a SIGKILLed
subprocess), checkpoints and unsafe-checkpoint refusal."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config

import fastmoe_adv as fm
from fastmoe_adv import attacks as A
from fastmoe_adv import train as tr

ROLES = ["clean", "fgsm", "pgd"]
REPO = Path(__file__).resolve().parents[1]


def tiny_moe(seed=0, roles=ROLES, executor="grouped"):
    torch.manual_seed(seed)
    return fm.FastSoftMoE(num_experts=len(roles), num_classes=10, width=4, roles=roles, backend="torch",
                          executor=executor)


def per_expert_batch(b=6, e=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, e, 3, size, size, generator=g), torch.randint(0, 10, (b, e), generator=g)


tiny_cfg = tiny_train_config


def expert_grads(model):
    """Per expert: the concatenated gradient of all its slices of the grouped parameters."""
    E = model.num_experts
    chunks = [[] for _ in range(E)]
    for p in model.experts.parameters():
        for e, c in enumerate(p.grad.chunk(E, dim=0)):
            chunks[e].append(c.flatten())
    return [torch.cat(c) for c in chunks]


# ============================================================================ config
@pytest.mark.parametrize("field, value, expected", [
    ("batch_size", 0, "an int >= 1"),
    ("width", 2.5, "an int >= 1"),
    ("schedule", "linear", "one of ('cosine', 'onecycle')"),
    ("fgsm_eps_set", (0.01, 2.0), "floats in [0, 1]"),
    ("pgd_steps_set", (10, 0), "ints >= 1"),
    ("steps_scale", 0.0, "(0.0, inf]"),
    ("lr", -1.0, "(0.0, inf]"),
    ("phase2_fgsm_prob", 1.5, "[0.0, 1.0]"),
    ("roles", ("clean", "fgsm"), "None or 9 roles"),
    ("mix", "sum", "one of ('logits', 'probs')"),
    ("bf16", "yes", "a bool"),
    ("checkpoint_every", 0, "an int >= 1"),
])
def test_config_rejects_bad_values_naming_field_expected_and_given(field, value, expected):
    with pytest.raises(ValueError) as info:
        tr.TrainConfig(**{field: value})
    msg = str(info.value)
    assert f"TrainConfig.{field}" in msg and expected in msg and repr(value if not isinstance(value, tuple)
                                                                     else value)[:6] in msg


def test_config_defaults_are_the_papers_and_roundtrip():
    cfg = tr.TrainConfig()
    assert cfg.num_experts == 9 and cfg.width == 64
    assert cfg.expert_roles == ["clean"] + ["fgsm"] * 4 + ["pgd"] * 4
    assert cfg.fgsm_eps_set == (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09)
    assert cfg.pgd_steps_set == (10, 20, 30, 40, 50)
    assert cfg.pgd_eps == 8 / 255 and cfg.pgd_alpha == 2 / 255
    assert (cfg.momentum, cfg.weight_decay) == (0.9, 5e-4)
    assert tr.TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        tr.TrainConfig.from_dict({"widht": 3})


def test_steps_scale_divides_pgd_step_counts():
    assert tr.TrainConfig(steps_scale=0.1).pgd_steps_scaled == [1, 2, 3, 4, 5]
    assert tr.TrainConfig(steps_scale=1.0).pgd_steps_scaled == [10, 20, 30, 40, 50]
    assert tr.scaled_steps([10, 20], 0.01) == [1, 1]   # never below one step


def test_lr_schedules():
    cos = tr.LRSchedule("cosine", 0.1, 100)
    assert cos.lr_at(0) == pytest.approx(0.1) and cos.lr_at(50) == pytest.approx(0.05)
    assert cos.lr_at(100) == pytest.approx(0.0, abs=1e-12)
    one = tr.LRSchedule("onecycle", 0.1, 100, warmup_frac=0.2)
    lrs = [one.lr_at(s) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 20
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_attack_draws_come_from_the_sets():
    cfg = tr.TrainConfig(num_experts=9, steps_scale=0.1)
    g = torch.Generator().manual_seed(0)
    seen_eps, seen_steps, kinds = set(), set(), set()
    for _ in range(60):
        plan = tr.draw_phase1_plan(cfg.expert_roles, cfg, g)
        assert plan.kinds == cfg.expert_roles
        seen_eps.update(e for k, e in zip(plan.kinds, plan.eps) if k == "fgsm")
        seen_steps.update(s for k, s in zip(plan.kinds, plan.steps) if k == "pgd")
        assert all(a == pytest.approx(2 / 255) and e == pytest.approx(8 / 255)
                   for k, e, a in zip(plan.kinds, plan.eps, plan.alpha) if k == "pgd")
        attack = tr.draw_phase2_attack(cfg, g)
        kinds.add(attack.kind)
        if attack.kind == "fgsm":
            assert attack.eps in cfg.fgsm_eps_set and attack.steps == 1
        else:
            assert attack.steps in cfg.pgd_steps_scaled and (attack.eps, attack.alpha) == (8 / 255, 2 / 255)
    assert seen_eps == set(cfg.fgsm_eps_set) and seen_steps == {1, 2, 3, 4, 5} and kinds == {"fgsm", "pgd"}


def test_eps_warmup_ramps_attack_strength_linearly():
    assert tr.TrainConfig().eps_ramp(0, 100) == 1.0                      # the paper: full strength at once
    cfg = tr.TrainConfig(eps_warmup=0.5, steps_scale=0.1, num_experts=3)
    assert [cfg.eps_ramp(s, 100) for s in (0, 24, 49, 50, 99)] == [0.02, 0.5, 1.0, 1.0, 1.0]
    plan = tr.draw_phase1_plan(cfg.expert_roles, cfg, torch.Generator().manual_seed(0), ramp=0.5)
    assert plan.eps[0] == 0 and plan.eps[1] in [e / 2 for e in cfg.fgsm_eps_set]
    assert plan.eps[2] == pytest.approx(4 / 255) and plan.alpha[2] == pytest.approx(1 / 255)


# ============================================================================ phase 1 step
def _phase1(model, x, y, plan, seed=3, lr=0.0):
    net = tr.steps.ExpertsNet(model)
    opt = torch.optim.SGD(model.experts.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    return tr.phase1_step(model, net, opt, x, y, plan, generator=gen)


def test_phase1_expert_gradient_comes_only_from_its_own_stream():
    plan = A.make_plan(ROLES, fgsm_eps=[0.05], pgd_steps=[2])
    x, y = per_expert_batch()
    a, b = tiny_moe(), tiny_moe()
    _phase1(a, x, y, plan)
    x2, y2 = x.clone(), y.clone()
    x2[:, 2] = torch.rand_like(x2[:, 2])       # only the PGD expert's stream changes
    y2[:, 2] = (y2[:, 2] + 3) % 10
    _phase1(b, x2, y2, plan)
    ga, gb = expert_grads(a), expert_grads(b)
    for e in (0, 1):   # separate groups of one grouped conv: equal up to float rounding at most
        torch.testing.assert_close(ga[e], gb[e], atol=1e-6, rtol=1e-5)
    assert (ga[2] - gb[2]).abs().max() > 1e-3
    # the loss is a sum of per-expert mean CEs: the clean expert trained alone gets the same
    # gradient (a plain instead of a grouped convolution: equal up to float rounding)
    c = tiny_moe()
    loss = torch.nn.functional.cross_entropy(c.experts_forward(x[:, :1], experts=0)[:, 0], y[:, 0])
    loss.backward()
    alone = expert_grads(c)[0]
    assert ((alone - ga[0]).abs().max() / ga[0].abs().max()).item() < 1e-4


def test_phase1_clean_expert_never_sees_an_adversarial_input(monkeypatch):
    model = tiny_moe()
    x, y = per_expert_batch()
    calls = []
    real_forward = fm.GroupedResNet18.forward

    def spy(self, xn, experts=None, executor=None):
        lo, hi = fm.grouped._parse_experts(experts, self.num_experts)
        calls.append((lo, hi, xn.detach().clone(), self.training))
        return real_forward(self, xn, experts=experts, executor=executor)

    monkeypatch.setattr(fm.GroupedResNet18, "forward", spy)
    plan = A.make_plan(ROLES, fgsm_eps=[0.05], pgd_steps=[3])
    _phase1(model, x, y, plan)
    clean = model.normalize(x[:, 0])
    train_calls = [c for c in calls if c[3]]
    assert len(train_calls) == 1 and train_calls[0][:2] == (0, 3)
    for lo, hi, xn, _ in calls:
        if lo == 0:    # every input the clean expert receives is exactly its clean stream
            assert torch.equal(xn[:, 0] if xn.dim() == 5 else xn, clean)
    xn_train = train_calls[0][2]
    for e in (1, 2):   # the others are trained on attacked inputs, inside their eps-balls
        delta = (xn_train[:, e] - model.normalize(x[:, e])) * model.std
        assert delta.abs().max() > 1e-3
    assert (xn_train[:, 2] - model.normalize(x[:, 2])).mul(model.std).abs().max() <= 8 / 255 + 1e-5


def test_phase1_step_leaves_gate_untouched_and_updates_experts():
    cfg = tiny_cfg()
    model = tiny_moe()
    gate0 = copy.deepcopy(model.gate.state_dict())
    exp0 = [p.detach().clone() for p in model.experts.parameters()]
    x, y = per_expert_batch()
    plan = tr.draw_phase1_plan(ROLES, cfg, torch.Generator().manual_seed(0))
    loss, correct = _phase1(model, x, y, plan, lr=0.1)
    assert torch.isfinite(loss) and correct.shape == (3,)
    assert all(torch.equal(gate0[k], v) for k, v in model.gate.state_dict().items())
    assert all(not torch.equal(a, p) for a, p in zip(exp0, model.experts.parameters()))


# ============================================================================ phase 2 step
@pytest.mark.parametrize("attack", [tr.Phase2Attack("fgsm", 0.03, 0.03, 1),
                                    tr.Phase2Attack("pgd", 8 / 255, 2 / 255, 2)])
def test_phase2_step_trains_gate_and_experts(attack):
    cfg = tiny_cfg()
    model = tiny_moe()
    torch.nn.init.normal_(model.gate.fc.weight, std=0.1)     # a non-flat gate: every gate param gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss, correct = tr.phase2_step(model, model, opt, x, y, attack, cfg, generator=g)
    assert torch.isfinite(loss) and 0 <= int(correct) <= 8
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert {n for n in before if n.startswith("gate.")} <= changed
    assert {n for n in before if n.startswith("experts.")} <= changed


# ============================================================================ whole phases, resume
def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_resume_is_bit_identical(tmp_path, monkeypatch):
    """Both phases: a run stopped by SIGTERM (phase 1 at the epoch boundary, phase 2 mid-epoch),
    resumed, ends with the uninterrupted run's weights (torch.equal), BN statistics and
    optimizer included."""
    cfg = tiny_cfg(pretrain_epochs=2, eval_every=3, checkpoint_every=100)   # the interrupt saves, not a period
    quiet = dict(progress=False, log=lambda *a: None)
    ref1 = tr.pretrain(cfg, tmp_path / "ref", **quiet)
    ref2 = tr.train(cfg, tmp_path / "ref", **quiet)
    assert ref1["global_step"] == 8 and ref2["global_step"] == 4     # 4 steps per epoch

    for phase, step_name, stop_at in ((1, "phase1_step", 4), (2, "phase2_step", 2)):
        real = getattr(tr, step_name)
        count = {"n": 0}

        def stepper(*args, _real=real, _stop=stop_at, **kw):
            out = _real(*args, **kw)
            count["n"] += 1
            if count["n"] == _stop:
                os.kill(os.getpid(), signal.SIGTERM)     # handled between steps
            return out

        monkeypatch.setattr(tr.trainer, step_name, stepper)
        fn = tr.pretrain if phase == 1 else tr.train
        with pytest.raises(tr.TrainingInterrupted) as info:
            fn(cfg, tmp_path / "cut", **quiet)
        assert info.value.signum == signal.SIGTERM
        payload = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
        assert (payload["phase"], payload["done"], payload["progress"]["global_step"]) == (phase, False, stop_at)
        monkeypatch.setattr(tr.trainer, step_name, real)
        done = fn(cfg, tmp_path / "cut", resume=True, **quiet)
        assert done["global_step"] == (8 if phase == 1 else 4)
        _assert_same_weights(_weights(done["model"]), _weights((ref1 if phase == 1 else ref2)["model"]))
    a = torch.load(tmp_path / "ref" / "phase2.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "phase2.pt", weights_only=True)
    _assert_same_weights(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    # resuming a finished phase is a no-op that returns the final model
    again = tr.train(cfg, tmp_path / "cut", resume=True, **quiet)
    assert again["already_done"] and torch.equal(again["model"].gate.fc.weight, ref2["model"].gate.fc.weight)


def _cli_env():
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


KILL_ARGS = ["pretrain", "--dataset", "synthetic", "--train-size", "96", "--width", "4", "--num-experts", "3",
             "--batch-size", "16", "--pretrain-epochs", "3", "--steps-scale", "0.04", "--eval-every", "-1",
             "--checkpoint-every", "1", "--backend", "torch", "--device", "cpu", "--no-progress", "--threads", "1"]


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_the_uninterrupted_weights(tmp_path):
    """``python -m fastmoe_adv pretrain`` SIGKILLed after a checkpoint, then ``--resume``d, ends
    with weights equal (torch.equal) to an uninterrupted run's."""
    env = _cli_env()
    cmd = [sys.executable, "-m", "fastmoe_adv", *KILL_ARGS]
    ref = subprocess.run(cmd + ["--out", str(tmp_path / "ref")], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    rep = json.loads((tmp_path / "ref" / "phase1_report.json").read_text())   # config, versions, hardware, timings
    assert rep["config"]["width"] == 4 and rep["environment"]["torch"] and rep["environment"]["cpu_count"]
    assert rep["train_time_s"] > 0 and rep["global_step"] == 18

    out = tmp_path / "cut"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        step = 0
        while time.time() < deadline and proc.poll() is None:
            if (out / "last.pt").exists():
                try:
                    step = torch.load(out / "last.pt", weights_only=True)["progress"]["global_step"]
                except Exception:   # noqa: BLE001  (a reader racing the atomic rename: retry)
                    step = 0
                if step >= 3:        # early: 18 steps in all (3 epochs of 6), so the kill lands mid-run
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "phase1.pt").exists()
    killed_at = torch.load(out / "last.pt", weights_only=True)["progress"]["global_step"]
    assert 3 <= killed_at < 18
    res = subprocess.run(cmd + ["--out", str(out), "--resume"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a = torch.load(tmp_path / "ref" / "phase1.pt", weights_only=True)
    b = torch.load(out / "phase1.pt", weights_only=True)
    _assert_same_weights(a["model"], b["model"])
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 18


def test_build_and_load_model_roundtrip(tmp_path):
    from fastmoe_adv import checkpoint as ckpt
    cfg = tiny_cfg(mix="probs", temperature=2.0)
    torch.manual_seed(0)
    model = tr.build_model(cfg)
    assert model.roles == ROLES and model.mix == "probs" and model.width == 4
    path = tmp_path / "m.pt"
    ckpt.save_checkpoint(path, ckpt.to_plain({"model": model.state_dict(), "model_config": model.config()}))
    loaded = tr.load_model(path, backend="torch")
    _assert_same_weights(_weights(loaded), _weights(model))
    assert loaded.config() == model.config() and not loaded.training


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = tiny_cfg(pretrain_epochs=1, checkpoint_every=1)
    quiet = dict(progress=False, log=lambda *a: None)
    from fastmoe_adv import checkpoint as ckpt
    tr.pretrain(cfg, tmp_path, **quiet)
    payload = ckpt.load_checkpoint(tmp_path / "last.pt", map_location="cpu")
    payload["done"] = False
    payload["progress"]["step_in_epoch"] = 1
    ckpt.save_checkpoint(tmp_path / "last.pt", payload)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.05, given 0\.1"):
        tr.pretrain(cfg.replace(lr=0.1), tmp_path, resume=True, **quiet)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_channels_last_training_on_cuda(tmp_path):
    cfg = tiny_cfg(device="cuda", bf16=True, channels_last=True, backend="auto", executor="auto")
    quiet = dict(progress=False, log=lambda *a: None)
    s1 = tr.pretrain(cfg, tmp_path, **quiet)
    s2 = tr.train(cfg, tmp_path, **quiet)
    assert s2["model"].gate.fc.weight.is_cuda
    assert all(torch.isfinite(p).all() for p in s2["model"].parameters())
    assert s1["train_time_s"] > 0 and s2["global_step"] == 4
