"""fastmoe_adv.cli: the quick demo end to end, eval on a checkpoint, and the one-line errors
(exit status 2, no traceback) for bad values, missing files and unsafe checkpoints."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmoe_adv as fm
from fastmoe_adv import cli

REPO = Path(__file__).resolve().parents[1]


def _env():
    # Subprocesses run as users run them: compiled kernels off on CPU (no interpreter), one
    # thread (the models are tiny and the test machine is shared).
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastmoe_adv", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


class _Evil:
    """Unpickling this would create a file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tiny_checkpoint(path, dataset="synthetic"):
    from fastmoe_adv import checkpoint as ckpt
    from fastmoe_adv import train as tr
    cfg = tr.TrainConfig(dataset=dataset, width=4, num_experts=3, device="cpu")
    torch.manual_seed(0)
    model = tr.build_model(cfg)
    ckpt.save_checkpoint(path, ckpt.to_plain({"format": tr.CHECKPOINT_FORMAT, "phase": 2, "done": True,
                                              "model": model.state_dict(), "model_config": model.config(),
                                              "train_config": cfg.to_dict()}))
    return model


# ============================================================================ demo
@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--quick", "--out", out, "--no-progress", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("report.json", "report.md", "mixture_report.json", "mixture_report.md", "phase1.pt", "phase2.pt",
                 "last.pt", "metrics.jsonl"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["demo"]["quick"] is True
    assert report["experts"]["roles"] == ["clean", "fgsm", "pgd"]
    for kind in ("clean", "fgsm", "pgd"):
        assert len(report["experts"][kind]) == 3 and all(0 <= a <= 1 for a in report["experts"][kind])
    assert set(report["mixture"]["accuracy"]) == {"clean", "fgsm", "pgd2"}
    assert "steps_scale" in report["demo"]["steps_scale_note"] or "scaled" in report["demo"]["steps_scale_note"]
    for label in ("clean expert", "fgsm expert", "pgd expert", "final mixture"):
        assert label in r.stdout and label in (out / "report.md").read_text()
    # the final checkpoint loads (weights_only) and evaluates through the CLI
    model = fm.train.load_model(out / "phase2.pt")
    assert isinstance(model, fm.FastSoftMoE) and model.num_experts == 3
    assert cli.main(["eval", "--checkpoint", str(out / "phase1.pt"), "--limit", "16", "--pgd-steps", "1",
                     "--no-curve", "--no-sanity", "--experts", "--backend", "torch", "--no-progress",
                     "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["data"]["images"] == 16 and len(ev["experts"]["pgd"]) == 3 and ev["checkpoint"]["phase"] == 1


# ============================================================================ eval
def test_eval_command_writes_report(tmp_path, capsys):
    path = tmp_path / "m.pt"
    _tiny_checkpoint(path)
    rc = cli.main(["eval", "--checkpoint", str(path), "--dataset", "synthetic", "--limit", "8", "--pgd-steps", "1",
                   "--no-curve", "--no-sanity", "--backend", "torch", "--no-progress", "--out", str(tmp_path / "o")])
    assert rc == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert set(report["attacks"]) == {"clean", "fgsm", "pgd1"} and report["data"]["images"] == 8
    assert "torch" in report["environment"] and "cpu" in report["environment"] and report["wall_time_s"] > 0
    assert "mixture" in capsys.readouterr().out


# ============================================================================ errors
def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("args, needles", [
    (["pretrain", "--batch-size", "0"], ["batch_size", "an int >= 1", "0"]),
    (["train", "--schedule", "linear"], ["schedule", "cosine", "'linear'"]),
    (["pretrain", "--steps-scale", "-1"], ["steps_scale", "-1"]),
    (["pretrain", "--pgd-steps-set", "10,0"], ["pgd_steps_set", "ints >= 1"]),
    (["pretrain", "--dataset", "mnist"], ["dataset", "'mnist'"]),
])
def test_bad_values_exit_2_with_one_line(args, needles, capsys, tmp_path):
    rc = cli.main(args + ["--out", str(tmp_path / "o"), "--no-progress"])
    _one_line_error(capsys, rc, *needles)


def test_missing_dataset_files_exit_2(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["pretrain", "--dataset", "cifar10", "--data-dir", str(empty), "--out", str(tmp_path / "o"),
                   "--width", "4", "--no-progress"])
    _one_line_error(capsys, rc)
    rc = cli.main(["eval", "--checkpoint", str(_ckpt(tmp_path)), "--dataset", "cifar10", "--data-dir",
                   str(empty), "--no-progress"])
    _one_line_error(capsys, rc)


def _ckpt(tmp_path):
    path = tmp_path / "m.pt"
    if not path.exists():
        _tiny_checkpoint(path)
    return path


def test_missing_checkpoint_exit_2(capsys, tmp_path):
    rc = cli.main(["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--dataset", "synthetic"])
    _one_line_error(capsys, rc, "checkpoint not found", "nope.pt")
    rc = cli.main(["train", "--out", str(tmp_path / "o"), "--init", str(tmp_path / "nope.pt"),
                   "--dataset", "synthetic", "--width", "4", "--num-experts", "3", "--no-progress"])
    _one_line_error(capsys, rc, "nope.pt")


def test_malicious_checkpoint_is_refused(capsys, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker), "model_config": {}}, path)
    from fastmoe_adv.checkpoint import UnsafeCheckpointError
    with pytest.raises(UnsafeCheckpointError):
        fm.train.load_model(path)
    assert not marker.exists()
    rc = cli.main(["eval", "--checkpoint", str(path), "--dataset", "synthetic", "--no-progress"])
    _one_line_error(capsys, rc, "evil.pt")
    assert not marker.exists()


def test_not_a_training_checkpoint_exit_2(capsys, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2)}, path)
    rc = cli.main(["eval", "--checkpoint", str(path), "--dataset", "synthetic", "--no-progress"])
    _one_line_error(capsys, rc, "not a fastmoe_adv training checkpoint")


def test_subprocess_error_has_no_traceback(tmp_path):
    r = run_cli("eval", "--checkpoint", tmp_path / "missing.pt", "--dataset", "synthetic", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    expected = f"fastmoe-adv eval: error: checkpoint not found: {tmp_path / 'missing.pt'}"
    assert r.stderr.strip().splitlines() == [expected]


# ============================================================================ parser
def test_every_config_field_has_a_flag_and_maps_to_the_config():
    p = cli.build_parser()
    args = p.parse_args(["pretrain", "--width", "8", "--batch-size", "32", "--pgd-steps-set", "10,20",
                         "--fgsm-eps-set", "0.01,0.02", "--bf16", "--no-augment", "--roles", "clean,fgsm,pgd",
                         "--num-experts", "3", "--steps-scale", "0.1", "--train-size", "100", "--seed", "3"])
    cfg = cli._config_from_args(args)
    assert (cfg.width, cfg.batch_size, cfg.pgd_steps_set, cfg.fgsm_eps_set) == (8, 32, (10, 20), (0.01, 0.02))
    assert cfg.bf16 is True and cfg.augment is False and cfg.roles == ("clean", "fgsm", "pgd")
    assert (cfg.steps_scale, cfg.train_size, cfg.seed) == (0.1, 100, 3)
    defaults = cli._config_from_args(p.parse_args(["train"]))
    assert defaults == fm.train.TrainConfig(device="auto", seed=0)
    for cmd in ("demo", "pretrain", "train", "eval"):
        with pytest.raises(SystemExit) as info:
            p.parse_args([cmd, "--help"])
        assert info.value.code == 0
