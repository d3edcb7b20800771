"""Runs that never lose or misreport work: the run-folder lock, overwrite refusal, resume
validation, divergence, the kill window between the two final writes, resumable log windows,
stale temporaries, report permissions, and phase 2 taking its architecture from phase 1."""
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

from fastmoe_adv import cli
from fastmoe_adv import train as tr
from fastmoe_adv.errors import ConfigError, RunDirError, TrainingDiverged
from fastmoe_adv.train.state import RunLock

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda *a: None)


tiny_cfg = tiny_train_config


def _env():
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


TINY_ARGS = ["--dataset", "synthetic", "--train-size", "64", "--width", "4", "--num-experts", "3", "--batch-size",
             "16", "--steps-scale", "0.04", "--eval-every", "-1", "--backend", "torch", "--executor", "grouped",
             "--device", "cpu", "--no-progress", "--threads", "1"]


def _interrupt_at(monkeypatch, step_name, stop_at):
    """Make the training loop's step function send SIGTERM after its ``stop_at``-th call."""
    real, count = getattr(tr.trainer, step_name), {"n": 0}

    def stepper(*args, **kw):
        out = real(*args, **kw)
        count["n"] += 1
        if count["n"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(tr.trainer, step_name, stepper)
    return real


# ============================================================================ lock
def test_second_run_into_a_locked_folder_refuses_at_once(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", *TINY_ARGS, "--train-size", "512", "--pretrain-epochs", "20", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "fastmoe_adv", *args], cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / ".lock").exists() and (out / ".lock").read_text().strip()):
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        t = time.time()
        second = subprocess.run([sys.executable, "-m", "fastmoe_adv", *args], cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"in use by another run (pid {first.pid}" in second.stderr
        assert time.time() - t < 60      # refused before any training
    finally:
        first.kill()
        first.wait()


def test_stale_lock_of_a_killed_process_is_reported_with_its_pid(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = (f"from fastmoe_adv.train.state import RunLock; RunLock({str(out)!r}).acquire('x'); "
            "import time; print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lines = []
    tr.pretrain(tiny_cfg(), out, progress=False, log=lines.append)
    assert any(f"stale lock (pid {holder.pid}" in line for line in lines), lines
    assert (out / ".lock").read_text() == ""          # released cleanly at the end


def test_lock_is_exclusive_in_one_process_and_released(tmp_path):
    a = RunLock(tmp_path).acquire("a")
    with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire("b")
    a.release()
    RunLock(tmp_path).acquire("c").release()


# ============================================================================ overwrite, resume validation
def test_finished_phase_is_never_silently_replaced(tmp_path):
    tr.pretrain(tiny_cfg(), tmp_path, **QUIET)
    before = (tmp_path / "phase1.pt").read_bytes()
    with pytest.raises(RunDirError, match="--resume .* --overwrite"):
        tr.pretrain(tiny_cfg(seed=1), tmp_path, **QUIET)
    assert (tmp_path / "phase1.pt").read_bytes() == before
    tr.pretrain(tiny_cfg(seed=1), tmp_path, overwrite=True, **QUIET)
    assert (tmp_path / "phase1.pt").read_bytes() != before


def test_resume_of_a_finished_phase_checks_the_config_and_reports_the_checkpoints(tmp_path):
    tr.pretrain(tiny_cfg(), tmp_path, **QUIET)
    for change in (dict(width=8), dict(num_experts=1, roles=("pgd",)), dict(seed=3), dict(lr=0.2)):
        with pytest.raises(ConfigError, match=list(change)[0]):
            tr.pretrain(tiny_cfg(**change), tmp_path, resume=True, **QUIET)
    summary = tr.pretrain(tiny_cfg(log_every=7), tmp_path, resume=True, **QUIET)   # a resume-free field
    assert summary["already_done"] and summary["config"]["log_every"] == 1           # the checkpoint's config


def test_kill_between_the_two_final_writes_is_recovered(tmp_path):
    ref = tr.pretrain(tiny_cfg(), tmp_path / "ref", **QUIET)
    out = tmp_path / "cut"
    tr.pretrain(tiny_cfg(), out, **QUIET)
    (out / "phase1.pt").unlink()          # the state a kill right after last.pt's rename would leave
    lines = []
    summary = tr.pretrain(tiny_cfg(), out, resume=True, progress=False, log=lines.append)
    assert any("recovered" in line for line in lines)
    a = torch.load(tmp_path / "ref" / "phase1.pt", weights_only=True)["model"]
    b = torch.load(out / "phase1.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["global_step"] == ref["global_step"]
    s2 = tr.train(tiny_cfg(), out, resume=True, **QUIET)     # and phase 2 continues from it
    assert s2["global_step"] == 4


def test_stale_temporaries_are_removed_at_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".last.pt.12345.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    lines = []
    tr.pretrain(tiny_cfg(), tmp_path, progress=False, log=lines.append)
    assert not stale.exists() and any(stale.name in line for line in lines)


def test_reports_have_the_checkpoints_permissions(tmp_path):
    assert cli.main(["pretrain", *TINY_ARGS, "--out", str(tmp_path)]) == 0
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777   # noqa: E731
    assert mode("phase1_report.json") == mode("phase1.pt") == mode("phase1_report.md")


# ============================================================================ divergence
def test_divergence_stops_with_a_clear_error_and_keeps_finite_weights(tmp_path, capsys):
    rc = cli.main(["pretrain", *TINY_ARGS, "--lr", "1e9", "--momentum", "0", "--checkpoint-every", "1",
                   "--pretrain-epochs", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 3 and "diverged" in err and "by step" in err and "Traceback" not in err
    assert not (tmp_path / "phase1.pt").exists()
    if (tmp_path / "last.pt").exists():
        state = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in metrics.jsonl"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "diverged"
    assert all(r["loss_finite"] is (r["loss"] is not None) for r in records if r["event"] == "train")


def test_a_non_finite_loss_is_logged_as_null_and_stops_the_run(tmp_path, monkeypatch):
    real = tr.trainer.phase1_step

    def nan_at_step_2(*args, **kw):
        loss, correct = real(*args, **kw)
        nan_at_step_2.n = getattr(nan_at_step_2, "n", 0) + 1
        return (loss * float("nan") if nan_at_step_2.n == 2 else loss), correct
    monkeypatch.setattr(tr.trainer, "phase1_step", nan_at_step_2)
    with pytest.raises(TrainingDiverged) as info:
        tr.pretrain(tiny_cfg(pretrain_epochs=2, checkpoint_every=1), tmp_path, **QUIET)
    assert info.value.step == 2 and "by step 2" in str(info.value) and "loss" in str(info.value)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in records if r["event"] == "train" and r["global_step"] == 2]
    assert bad and bad[0]["loss"] is None and bad[0]["loss_finite"] is False
    assert torch.load(tmp_path / "last.pt", weights_only=True)["progress"]["global_step"] == 1


# ============================================================================ exact resume details
def test_log_windows_survive_a_resume(tmp_path, monkeypatch):
    cfg = tiny_cfg(pretrain_epochs=2, log_every=3, checkpoint_every=100)
    tr.pretrain(cfg, tmp_path / "ref", **QUIET)
    real = _interrupt_at(monkeypatch, "phase1_step", 2)       # mid-window (windows end at steps 3, 4, 7, 8)
    with pytest.raises(tr.TrainingInterrupted):
        tr.pretrain(cfg, tmp_path / "cut", **QUIET)
    monkeypatch.setattr(tr.trainer, "phase1_step", real)
    tr.pretrain(cfg, tmp_path / "cut", resume=True, **QUIET)

    def windows(path):
        recs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return {r["global_step"]: (r["loss"], r["acc"], r["steps"]) for r in recs if r["event"] == "train"}
    assert windows(tmp_path / "cut") == windows(tmp_path / "ref")


def test_resuming_under_another_executor_says_it_is_not_bit_exact(tmp_path, monkeypatch):
    cfg = tiny_cfg(pretrain_epochs=2, checkpoint_every=100)
    real = _interrupt_at(monkeypatch, "phase1_step", 2)
    with pytest.raises(tr.TrainingInterrupted):
        tr.pretrain(cfg, tmp_path, **QUIET)
    monkeypatch.setattr(tr.trainer, "phase1_step", real)
    lines = []
    tr.pretrain(cfg.replace(executor="loop"), tmp_path, resume=True, progress=False, log=lines.append)
    assert any("not be bit-identical" in line for line in lines), lines


# ============================================================================ validated before the first step
def test_pipeline_limits_are_checked_before_training():
    with pytest.raises(ConfigError, match="num_experts: expected at most 64"):
        tiny_cfg(num_experts=65)
    with pytest.raises(ConfigError, match="seed: expected an int in"):
        tiny_cfg(seed=2 ** 64)


@pytest.mark.parametrize("flag", ["--backend", "--bn-backend"])
def test_triton_backend_without_cuda_is_refused_before_training(tmp_path, flag):
    r = subprocess.run([sys.executable, "-m", "fastmoe_adv", "pretrain", *TINY_ARGS, flag, "triton",
                        "--out", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "Traceback" not in r.stderr
    assert flag[2:].replace("-", "_") in r.stderr and not (tmp_path / "last.pt").exists()


# ============================================================================ phase 2 from phase 1
def test_train_takes_the_architecture_from_the_init_checkpoint(tmp_path, capsys):
    assert cli.main(["pretrain", *TINY_ARGS, "--out", str(tmp_path / "p1")]) == 0
    init = str(tmp_path / "p1" / "phase1.pt")
    flags = [a for a in TINY_ARGS]
    for flag in ("--width", "--num-experts"):       # no architecture flags at all
        i = flags.index(flag)
        del flags[i:i + 2]
    assert cli.main(["train", *flags, "--init", init, "--out", str(tmp_path / "p2")]) == 0
    model = tr.load_model(tmp_path / "p2" / "phase2.pt")
    assert model.width == 4 and model.num_experts == 3
    capsys.readouterr()
    rc = cli.main(["train", *flags, "--width", "8", "--num-experts", "2", "--init", init, "--out",
                   str(tmp_path / "p3")])
    err = capsys.readouterr().err
    assert rc == 2 and "--width 8 (checkpoint: 4)" in err and "--num-experts 2 (checkpoint: 3)" in err


def test_phase2_logs_gate_statistics_and_warns_on_a_flat_gate(tmp_path):
    cfg = tiny_cfg(eval_every=0)
    tr.pretrain(cfg, tmp_path, **QUIET)
    lines = []
    tr.train(cfg, tmp_path, progress=False, log=lines.append)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["event"] == "eval" and r["phase"] == 2]
    assert evals and len(evals[-1]["gate_clean"]) == 3 and "gate_pgd_input_dependence" in evals[-1]

    class Run:
        main, global_step = True, 7
        log = lines.append
    lines.clear()
    tr.trainer._warn_gate({"gate_clean": [0.005, 0.5, 0.495], "gate_clean_input_dependence": 0.001},
                          ["clean", "fgsm", "pgd"], Run)
    assert any("step 7: the gate is effectively constant" in x for x in lines)
    assert any("expert e0 (clean) gets 0.50%" in x for x in lines)
    lines.clear()
    tr.trainer._warn_gate({"gate_clean": [0.3, 0.3, 0.4], "gate_clean_input_dependence": 0.2},
                          ["clean", "fgsm", "pgd"], Run)
    assert lines == []


def test_the_training_loop_never_runs_the_per_call_pixel_check(tmp_path, monkeypatch):
    """The check is a host sync per forward on a GPU; inside the loop inputs are valid by construction."""
    from fastmoe_adv import checks
    calls = {"n": 0}
    real = checks.check_pixel_range

    def counting(x):
        calls["n"] += 1
        return real(x)
    monkeypatch.setattr(checks, "check_pixel_range", counting)
    cfg = tiny_cfg(log_every=100, checkpoint_every=100)
    tr.pretrain(cfg, tmp_path, **QUIET)
    tr.train(cfg, tmp_path, **QUIET)
    assert calls["n"] == 0
    model = tr.load_model(tmp_path / "phase2.pt")
    model(torch.rand(2, 3, 8, 8))            # outside the loop the check is on
    assert calls["n"] == 1 and model.check_inputs


def test_phase1_streams_share_one_copy_of_the_training_set(tmp_path, monkeypatch):
    """Nine expert streams, one device copy of the images (not nine), independent orders."""
    seen = []
    real = tr.trainer._Streams.__init__

    def spy(self, loaders, stack):
        seen.append(loaders)
        real(self, loaders, stack)
    monkeypatch.setattr(tr.trainer._Streams, "__init__", spy)
    tr.pretrain(tiny_cfg(), tmp_path, **QUIET)
    loaders = seen[0]
    assert len(loaders) == 3 and len({ld.images.data_ptr() for ld in loaders}) == 1
    assert len({ld.seed for ld in loaders}) == 3


def test_phase1_throughput_counts_every_experts_images(tmp_path):
    """A phase-1 step trains B images per expert: images_seen and img/s count B x E."""
    s = tr.pretrain(tiny_cfg(), tmp_path, **QUIET)
    assert s["images_seen"] == s["global_step"] * 16 * 3


def test_kill_after_the_final_checkpoint_but_before_last_pt_is_recovered(tmp_path):
    """The write order's other window: phase1.pt written, last.pt still the previous mid-run state."""
    from fastmoe_adv import checkpoint
    ref = tr.pretrain(tiny_cfg(), tmp_path / "ref", **QUIET)
    out = tmp_path / "cut"
    tr.pretrain(tiny_cfg(), out, **QUIET)
    stale = checkpoint.load_checkpoint(out / "last.pt")
    stale["done"], stale["progress"]["global_step"], stale["progress"]["step_in_epoch"] = False, 1, 1
    checkpoint.save_checkpoint(out / "last.pt", stale)
    summary = tr.pretrain(tiny_cfg(), out, resume=True, **QUIET)
    assert summary["already_done"] and summary["global_step"] == ref["global_step"]
    a = torch.load(tmp_path / "ref" / "phase1.pt", weights_only=True)["model"]
    b = torch.load(out / "phase1.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    s2 = tr.train(tiny_cfg(), out, resume=True, **QUIET)     # phase 2 starts from the finished phase 1
    assert s2["global_step"] == 4


def test_phase2_applies_its_mixing_rule_and_temperature_to_the_phase1_model(tmp_path):
    tr.pretrain(tiny_cfg(), tmp_path, **QUIET)
    s2 = tr.train(tiny_cfg(temperature=2.0, mix="probs"), tmp_path, **QUIET)
    assert (s2["model"].temperature, s2["model"].mix) == (2.0, "probs")
    saved = tr.load_model(tmp_path / "phase2.pt")
    assert (saved.temperature, saved.mix) == (2.0, "probs")


def test_a_new_phase1_run_never_replaces_a_later_phases_state(tmp_path):
    cfg = tiny_cfg()
    tr.pretrain(cfg, tmp_path, **QUIET)
    tr.train(cfg, tmp_path, **QUIET)
    (tmp_path / "phase1.pt").unlink()
    before = (tmp_path / "last.pt").read_bytes()          # phase 2's state
    with pytest.raises(RunDirError, match=r"last\.pt \(phase 2\)"):
        tr.pretrain(cfg, tmp_path, **QUIET)
    assert (tmp_path / "last.pt").read_bytes() == before
