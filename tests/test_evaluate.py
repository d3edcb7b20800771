"""fastmoe_adv.evaluate: the report, the gradient-masking sanity checks (ordinary models pass,
masked / random / probability-output models fail loudly), report files, input errors."""
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import randomize_

import fastmoe_adv as fm
from fastmoe_adv import evaluate as ev

SIZE = 8
FAST = dict(batch_size=8, eps_curve=(0, 2 / 255, 8 / 255), curve_steps=3, progress=False)


def linear_model(seed=0, k=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, k)).eval()


def labelled(model, n=24, seed=1):
    """Images and the model's own clean predictions as labels (clean accuracy 100%)."""
    x = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(-1)


class Rounded(nn.Module):
    """Gradient masking by quantization: torch.round has a zero gradient everywhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


class Noisy(nn.Module):
    """A randomized forward pass, random even in eval mode."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out + 5 * torch.randn_like(out)


class Softmaxed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.softmax(self.inner(x), dim=-1)


def _check(report, name):
    return next(c for c in report["sanity"]["checks"] if c["name"] == name)


def test_ordinary_model_report_and_files(tmp_path):
    model = linear_model()
    x, y = labelled(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ev.GradientMaskingWarning)
        report = ev.robustness(model, x, y, **FAST)
    attacks = report["attacks"]
    assert list(attacks) == ["clean", "fgsm", "pgd20"]
    clean, fgsm, pgd = attacks["clean"], attacks["fgsm"], attacks["pgd20"]
    assert (clean["correct"], clean["total"], clean["accuracy"]) == (24, 24, 1.0)
    assert pgd["steps"] == 20 and pgd["eps"] == pytest.approx(8 / 255) and pgd["alpha"] == pytest.approx(2 / 255)
    assert fgsm["eps"] == pytest.approx(8 / 255) and fgsm["steps"] == 1
    assert pgd["accuracy"] <= fgsm["accuracy"] < 1.0
    for r in attacks.values():
        assert r["accuracy"] == r["correct"] / r["total"]
        assert len(r["per_class_accuracy"]) == 10 and sum(r["per_class_total"]) == 24
        assert r["gate_weights"] is None  # a plain model has no gate
        assert r["images_per_s"] > 0
    expected = [c / t if t else None for c, t in zip(torch.bincount(y, minlength=10).tolist(),
                                                        torch.bincount(y, minlength=10).tolist())]
    assert clean["per_class_accuracy"] == expected
    points = report["curve"]["points"]
    assert [p["eps"] for p in points] == pytest.approx([0, 2 / 255, 8 / 255])
    assert points[0]["accuracy"] == clean["accuracy"]  # eps 0 is the clean accuracy
    assert report["sanity"]["all_passed"], report["sanity"]
    assert {c["name"] for c in report["sanity"]["checks"]} == {
        "curve_monotone", "large_eps_pgd", "pgd_vs_fgsm", "more_steps", "input_gradients",
        "deterministic_forward", "outputs_not_probabilities", "zero_loss_gradients", "number_of_classes",
        "convergence"}
    for c in report["sanity"]["checks"]:
        assert set(c) >= {"name", "passed", "measured", "threshold", "message"}
    assert {"python", "torch", "triton", "fastmoe_adv"} <= set(report["environment"])
    assert report["environment"]["cpu"] and report["environment"]["gpu"] is None
    assert report["timestamp"] and report["settings"]["seed"] == 0

    json_path, md_path = ev.write_report(report, tmp_path / "out", name="lin")
    assert sorted(os.listdir(tmp_path / "out")) == ["lin.json", "lin.md"]  # no temp files left
    loaded = json.loads(open(json_path).read())
    assert loaded["attacks"]["clean"]["correct"] == 24
    md = open(md_path).read()
    assert "| attack | eps | steps | accuracy | 95% CI | correct/total |" in md
    assert "| pgd20 (alpha 2/255, random start) | 8/255 | 20 |" in md
    assert "| clean | - | - | 100.00% | [86.2, 100.0] | 24/24 |" in md
    assert "PASS" in md and "FAIL" not in md and "WARNING" not in md
    assert md.index("## Accuracy") < md.index("## Accuracy versus eps") < md.index("## Sanity checks") \
        < md.index("## Settings")
    # Writing again replaces the files atomically.
    ev.write_report(report, tmp_path / "out", name="lin")
    assert sorted(os.listdir(tmp_path / "out")) == ["lin.json", "lin.md"]


def test_gradient_masked_model_trips_checks_loudly(tmp_path):
    base = linear_model()
    x, y = labelled(base)
    masked = Rounded(base)
    with pytest.warns(ev.GradientMaskingWarning, match="FAILED"):
        report = ev.robustness(masked, x, y, **FAST)
    sanity = report["sanity"]
    assert sanity["all_passed"] is False
    grads = _check(report, "input_gradients")
    assert not grads["passed"] and grads["measured"]["zero_grad_fraction"] == 1.0
    big = _check(report, "large_eps_pgd")
    assert not big["passed"] and big["measured"]["accuracy"] > 0.1
    assert set(sanity["failed"]) >= {"input_gradients", "large_eps_pgd"}
    _, md_path = ev.write_report(report, tmp_path)
    md = open(md_path).read()
    top = md[:md.index("## Accuracy")]
    assert "WARNING" in top and "input_gradients" in top and "large_eps_pgd" in top
    assert "**FAIL**" in md


def test_random_forward_trips_determinism_check():
    base = linear_model()
    x, y = labelled(base, n=8)
    with pytest.warns(ev.GradientMaskingWarning, match="deterministic_forward"):
        report = ev.robustness(Noisy(base), x, y, attacks=[ev.AttackSpec("clean", "clean")], batch_size=8,
                               eps_curve=(), curve_steps=1, progress=False)
    assert not _check(report, "deterministic_forward")["passed"]
    assert _check(report, "curve_monotone")["skipped"]


def test_probability_outputs_trip_output_check():
    base = linear_model()
    x, y = labelled(base, n=8)
    with pytest.warns(ev.GradientMaskingWarning, match="outputs_not_probabilities"):
        report = ev.robustness(Softmaxed(base), x, y, attacks=[ev.AttackSpec("clean", "clean")], batch_size=8,
                               eps_curve=(), curve_steps=1, progress=False)
    assert not _check(report, "outputs_not_probabilities")["passed"]
    assert report["sanity"]["all_passed"] is False


def test_mixture_report_gate_weights_uint8_and_mode_restored():
    torch.manual_seed(0)
    moe = randomize_(fm.FastSoftMoE(num_experts=3, num_classes=10, width=4, executor="grouped"))
    with torch.no_grad():
        moe.gate.fc.weight.normal_(0, 0.5)  # a gate that is not flat, so the mean is informative
    x8 = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    x = x8.float() / 255
    moe.eval()
    with torch.no_grad():
        out = moe(x, return_details=True)
    y = out.logits.argmax(-1)
    moe.train()
    specs = [ev.AttackSpec("clean", "clean"), ev.AttackSpec("pgd1", "pgd", 8 / 255, 2 / 255, 1)]
    report = ev.robustness(moe, x8, y, attacks=specs, batch_size=2, eps_curve=(0, 8 / 255), curve_steps=1,
                           progress=False, sanity=False)
    assert moe.training and all(m.training for m in moe.modules())
    assert report["attacks"]["clean"]["accuracy"] == 1.0
    gw = report["attacks"]["clean"]["gate_weights"]
    assert gw == pytest.approx(out.gate_weights.double().mean(0).tolist(), abs=1e-6)
    assert len(report["attacks"]["pgd1"]["gate_weights"]) == 3
    assert sum(report["attacks"]["pgd1"]["gate_weights"]) == pytest.approx(1.0, abs=1e-5)
    assert report["model"]["roles"] == moe.roles and report["data"]["dtype"] == "uint8"
    assert report["sanity"]["all_passed"] is None
    md = ev.markdown(report)
    assert "## Mean gate weight per expert" in md and "e0 (clean)" in md
    assert "Sanity checks were not run" in md
    float_report = ev.robustness(moe, x, y, attacks=specs[:1], batch_size=2, eps_curve=(), progress=False,
                                 sanity=False)
    assert float_report["attacks"]["clean"]["correct"] == report["attacks"]["clean"]["correct"]


def test_same_seed_same_report():
    model = linear_model()
    x, y = labelled(model, n=16)
    spec = [ev.AttackSpec("pgd", "pgd", 0.03, 0.01, 2, restarts=2)]
    a = ev.robustness(model, x, y, attacks=spec, eps_curve=(), progress=False, sanity=False)
    b = ev.robustness(model, x, y, attacks=spec, eps_curve=(), progress=False, sanity=False)
    assert a["attacks"]["pgd"]["correct"] == b["attacks"]["pgd"]["correct"]


def test_bad_inputs_raise_value_error():
    model = linear_model()
    x, y = labelled(model, n=4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ev.robustness(model, x * 2, y, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        ev.robustness(model, (x * 255).to(torch.int16), y, progress=False)
    with pytest.raises(ValueError):
        ev.robustness(model, x, y[:3], progress=False)
    with pytest.raises(ValueError):
        ev.robustness(model, x, y.float(), progress=False)
    with pytest.raises(ValueError):
        ev.robustness(model, x[0], y, progress=False)
    with pytest.raises(ValueError, match="labels"):
        ev.robustness(model, x, torch.tensor([0, 1, 2, 10]), attacks=[ev.AttackSpec("c", "clean")], eps_curve=(),
                      progress=False, sanity=False)
    with pytest.raises(ValueError, match="unique"):
        ev.robustness(model, x, y, attacks=[ev.AttackSpec("a", "clean"), ev.AttackSpec("a", "fgsm", 0.1)],
                      progress=False)
    with pytest.raises(ValueError):
        ev.robustness(model, x, y, curve_attack="cw", progress=False)
    with pytest.raises(ValueError):
        ev.robustness(model, x, y, eps_curve=(0, -0.1), progress=False)
    with pytest.raises(ValueError):
        ev.robustness(model, x, y, batch_size=0, progress=False)
    with pytest.raises(ValueError):
        ev.AttackSpec("x", "cw")
    with pytest.raises(ValueError):
        ev.AttackSpec("x", "pgd", eps=-1.0)
    with pytest.raises(ValueError):
        ev.AttackSpec("x", "pgd", 0.1, 0.01, 10, restarts=0)
    with pytest.raises(ValueError):
        ev.write_report({"not": "a report"}, "/tmp")
