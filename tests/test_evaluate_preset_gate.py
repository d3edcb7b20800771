"""fastmoe_adv.evaluate: the preset in the report (worst case, intervals, the PGD gap), the
checks only a preset allows, gate diagnostics (constant gates flagged, input-dependent ones not),
Wilson intervals, and progress lines when the output is not a terminal."""
import io

import pytest
import torch
import torch.nn as nn
from helpers import randomize_

import fastmoe_adv as fm
from fastmoe_adv import evaluate as ev
from fastmoe_adv.evaluate.common import Progress

SIZE = 8


def tiny_moe(seed=0, gate_std=0.5):
    torch.manual_seed(seed)
    moe = randomize_(fm.FastSoftMoE(num_experts=3, num_classes=10, width=4, executor="grouped", backend="torch"))
    with torch.no_grad():
        moe.gate.fc.weight.normal_(0, gate_std)
    return moe.eval()


def data(model, n=24, seed=1):
    x = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(-1)


def test_wilson_interval_known_values():
    lo, hi = ev.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert ev.wilson_interval(0, 10)[0] == 0.0 and ev.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert ev.wilson_interval(0, 0) == [None, None]


def test_preset_report_is_the_worst_case_and_states_the_pgd_gap(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 10)).eval()
    torch.manual_seed(0)
    x, y = data(model, n=32)
    specs = [ev.AttackSpec("clean", "clean"), ev.AttackSpec("pgd2", "pgd", 4 / 255, 1 / 255, 2)]
    report = ev.robustness(model, x, y, attacks=specs, batch_size=16, eps_curve=(), progress=False, preset="quick",
                           gate=False)
    pre = report["preset"]
    assert pre["name"] == "quick" and [s["name"] for s in pre["stages"]] == ["apgd-ce", "apgd-t"]
    assert pre["robust_accuracy"] <= report["attacks"]["pgd2"]["accuracy"]      # APGD at least as strong
    assert pre["robust_accuracy"] == min(s["robust_accuracy"] for s in pre["stages"])
    assert pre["ci95"][0] <= pre["robust_accuracy"] <= pre["ci95"][1]
    gap = report["pgd_gap"]
    assert gap["points"] == pytest.approx(100 * (report["attacks"]["pgd2"]["accuracy"] - pre["robust_accuracy"]))
    assert "overstates robust accuracy by" in gap["statement"]
    names = {c["name"] for c in report["sanity"]["checks"]}
    assert {"zero_loss_gradients", "number_of_classes", "blackbox_vs_whitebox", "convergence"} <= names
    conv = next(c for c in report["sanity"]["checks"] if c["name"] == "convergence")
    assert set(conv["measured"]) == {"after apgd-ce", "after apgd-t"}
    _, md = ev.write_report(report, tmp_path)
    text = open(md).read()
    assert "overstates robust accuracy by" in text and "## Preset" in text


def test_bad_preset_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 10)).eval()
    x, y = data(model, n=4)
    with pytest.raises(ValueError, match="preset"):
        ev.robustness(model, x, y, preset="autoattack", progress=False)


def test_two_class_model_fails_the_classes_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2)).eval()
    x, y = data(model, n=8)
    with pytest.warns(ev.GradientMaskingWarning, match="number_of_classes"):
        report = ev.robustness(model, x, y, attacks=[ev.AttackSpec("clean", "clean")], batch_size=8, eps_curve=(),
                               curve_steps=1, progress=False)
    assert "number_of_classes" in report["sanity"]["failed"]


def test_gate_diagnostics_flag_a_constant_gate_but_not_an_input_dependent_one():
    live = tiny_moe(gate_std=2.0)
    x, y = data(live, n=32)
    report = ev.gate_diagnostics(live, x, y, batch_size=16, pgd_steps=2)
    assert report["inputs"]["clean"]["input_dependence"] > 0.05
    assert not any("constant" in w for w in report["warnings"])

    flat = tiny_moe()
    with torch.no_grad():
        flat.gate.fc.weight.zero_()
        flat.gate.fc.bias.copy_(torch.tensor([-6.0, 2.0, 2.0]))   # the same weights for every input
    report = ev.gate_diagnostics(flat, x, y, batch_size=16, pgd_steps=2)
    stats = report["inputs"]["clean"]
    assert stats["input_dependence"] < 1e-6 and stats["mean"][0] < 0.01
    assert any("effectively constant" in w for w in report["warnings"])
    assert any("e0 (clean)" in w and "barely contributes" in w for w in report["warnings"])
    assert set(report["per_class_clean"]) == {int(c) for c in y.unique()}


def test_gate_diagnostics_in_every_mixture_report():
    moe = tiny_moe()
    x, y = data(moe, n=8)
    report = ev.robustness(moe, x, y, attacks=[ev.AttackSpec("clean", "clean")], batch_size=8, eps_curve=(),
                           progress=False, sanity=False)
    assert set(report["gate"]["inputs"]) == {"clean", "fgsm", "pgd"}
    assert "## Gate diagnostics" in ev.markdown(report)


def test_progress_prints_plain_lines_with_time_left_when_not_a_terminal():
    stream = io.StringIO()
    bar = Progress(4, True, desc="robustness", every_s=0.0, stream=stream)
    for i in range(4):
        bar.update(f"attack {i}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and "4/4 batches (100%)" in lines[-1] and "s left" in lines[0]
    quiet = io.StringIO()
    Progress(4, False, stream=quiet).update("x")
    assert quiet.getvalue() == ""


def test_preset_skips_apgd_t_below_four_classes_and_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3)).eval()
    x, y = data(model, n=8)
    report = ev.robustness(model, x, y, attacks=[ev.AttackSpec("clean", "clean")], batch_size=8, eps_curve=(),
                           progress=False, sanity=False, gate=False, preset="quick")
    stages = {s["name"]: s for s in report["preset"]["stages"]}
    assert "needs at least 4 classes, the model has 3" in stages["apgd-t"]["skipped"]
    assert stages["apgd-ce"]["skipped"] == "" and stages["apgd-t"]["attacked"] == 0
