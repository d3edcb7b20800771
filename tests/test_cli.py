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


# ============================================================================ bad input census
def _tampered(tmp_path, name, edit):
    path = tmp_path / f"{name}.pt"
    _tiny_checkpoint(path)
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def _drop_one_weight(p):
    p["model"].pop(sorted(p["model"])[0])


def _reshape_one_weight(p):
    k = sorted(p["model"])[0]
    p["model"][k] = torch.zeros(3)


def _extra_weight(p):
    p["model"]["unexpected.weight"] = torch.zeros(1)


TAMPERED = {
    "extra_config_key": lambda p: p["model_config"].update(bogus=1),
    "model_config_int": lambda p: p.update(model_config=5),
    "model_not_a_dict": lambda p: p.update(model=[1, 2]),
    "missing_weight": _drop_one_weight,
    "misshaped_weight": _reshape_one_weight,
    "extra_weight": _extra_weight,
    "wrong_width": lambda p: p["model_config"].update(width=8),
    "wrong_experts": lambda p: p["model_config"].update(num_experts=2, roles=["clean", "pgd"]),
    "bad_mix": lambda p: p["model_config"].update(mix="sum"),
    "no_model": lambda p: p.pop("model"),
}


def test_bad_input_census_one_line_errors_not_tracebacks(capsys, tmp_path):
    """Every case a user can cause gives one line and exit 2; only an internal bug shows a traceback."""
    afile = tmp_path / "a_file"
    afile.write_text("x")
    cases = {"out_is_a_file": ["pretrain", "--out", str(afile)], "out_dev_null": ["pretrain", "--out", "/dev/null"],
             "huge_width": ["pretrain", "--width", "100000", "--dataset", "synthetic", "--out", str(tmp_path / "w")],
             "seed_beyond_64_bits": ["pretrain", "--seed", str(2 ** 64), "--out", str(tmp_path / "s")],
             "bad_device": ["pretrain", "--device", "tpu", "--out", str(tmp_path / "d")]}
    for name, edit in TAMPERED.items():
        cases[name] = ["eval", "--checkpoint", str(_tampered(tmp_path, name, edit)), "--limit", "4", "--no-curve",
                       "--no-sanity", "--no-gate", "--pgd-steps", "1"]
    one_line = []
    for name, args in cases.items():
        rc = cli.main(args + ["--no-progress"])
        err = capsys.readouterr().err.strip()
        ok = rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
        one_line.append(name) if ok else None
        assert ok, (name, rc, err)
    assert len(one_line) == len(cases) == 15


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    import errno

    from fastmoe_adv import checkpoint as ckpt
    args = ["pretrain", "--dataset", "synthetic", "--train-size", "64", "--width", "4", "--num-experts", "3",
            "--batch-size", "16", "--steps-scale", "0.04", "--eval-every", "-1", "--checkpoint-every", "1",
            "--device", "cpu", "--backend", "torch", "--out", str(tmp_path), "--no-progress", "--pretrain-epochs", "2"]
    real, calls = ckpt.save_checkpoint, {"n": 0}

    def full_after_two(path, payload):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, payload)
    monkeypatch.setattr(ckpt, "save_checkpoint", full_after_two)
    rc = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [err] and "No space left on device" in err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["progress"]["global_step"] == 2


def test_internal_bugs_keep_their_traceback(monkeypatch, tmp_path):
    def bug(args):
        raise ValueError("an internal invariant broke")
    monkeypatch.setitem(cli._COMMANDS, "pretrain", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["pretrain", "--out", str(tmp_path)])


def test_recipe_gives_defaults_under_explicit_flags():
    p = cli.build_parser()
    fast = cli._config_from_args(p.parse_args(["pretrain", "--recipe", "fast", "--width", "8"]))
    assert fast.width == 8 and fast.holdout == 2000 and fast.bf16 is True and fast.steps_scale == 0.2
    assert cli._config_from_args(p.parse_args(["pretrain"])) == fm.train.TrainConfig(device="auto", seed=0)


def test_eval_with_preset_experts_and_figures(tmp_path, capsys):
    path = tmp_path / "m.pt"
    _tiny_checkpoint(path)
    out = tmp_path / "o"
    rc = cli.main(["eval", "--checkpoint", str(path), "--dataset", "synthetic", "--limit", "8", "--pgd-steps", "2",
                   "--curve-steps", "1", "--no-sanity", "--experts", "--preset", "quick", "--backend", "torch",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quick preset (the number to report)" in printed and "overstates robust accuracy by" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["preset"]["name"] == "quick" and report["checkpoint"]["train_config"]["width"] == 4
    md = (out / "eval.md").read_text()
    assert "## Checkpoint and data" in md and "## Mixture and experts" in md and "## Preset: quick" in md
    for png in ("accuracy_vs_eps.png", "gate_usage.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
