"""Figures of plots.py: each writes a readable PNG at the stated dpi, survives null losses and
empty inputs, writes atomically, merges resumed runs of a metrics.jsonl correctly, and without
matplotlib warns and returns None instead of failing."""
import builtins
import importlib
import json
import os
import re
import sys

import pytest

import fastmoe_adv
from fastmoe_adv import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROLES = ["clean"] + ["fgsm"] * 4 + ["pgd"] * 4
EPS = [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255]


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def _assert_png(path):
    """A PNG file that matplotlib reads back, not blank, at ~150 dpi."""
    import matplotlib.image
    from PIL import Image
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05          # something was drawn
    with Image.open(path) as im:
        dpi = im.info["dpi"]
    assert dpi[0] == pytest.approx(plots.DPI, abs=0.5) and dpi[1] == pytest.approx(plots.DPI, abs=0.5)
    return img


def _only_files(folder):
    return sorted(os.listdir(folder))


def _has_colour(img, hex_colour, tol=0.02):
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    diff = abs(img[..., :3] - rgb).max(axis=-1)
    return int((diff < tol).sum())


def _report(n=500, ci=True):
    accs = [0.91, 0.8, 0.7, 0.52, 0.31, 0.06]
    pts = [{"eps": e, "accuracy": a, "correct": round(a * n), "total": n,
            "ci95": [a - 0.04, a + 0.04] if ci else None} for e, a in zip(EPS, accs)]
    return {"curve": {"attack": "pgd", "steps": 10, "random_start": True, "points": pts},
            "preset": {"name": "standard", "eps": 8 / 255, "robust_accuracy": 0.27, "ci95": [0.23, 0.31]},
            "sanity": {"all_passed": True}}


def _experts():
    acc = [[max(0.0, 0.9 - 0.05 * i - (0.6 if r == "clean" else 0.1) * (i > 0) - 0.01 * e)
            for e, r in enumerate(ROLES)] for i in range(len(EPS))]
    return {"roles": ROLES, "eps": EPS, "accuracy": acc, "attack": "PGD-10"}


def _gate(E=9, classes=10, str_keys=False):
    base = [(e + 1) / sum(range(1, E + 1)) for e in range(E)]
    inputs = {k: {"mean": base, "std": [0.03] * E, "images": 64, "input_dependence": 0.2}
              for k in ("clean", "fgsm", "pgd")}
    per_class = {(str(c) if str_keys else c): base[::-1] for c in range(classes)}
    return {"inputs": inputs, "per_class_clean": per_class, "attack": {"eps": 8 / 255, "pgd_steps": 10},
            "warnings": ["expert e0 (clean) gets 0.9% of the gate weight on clean inputs (< 1%): it barely "
                         "contributes"]}


# ---------------------------------------------------------------- accuracy versus eps
def test_accuracy_vs_eps_with_experts_and_preset(mpl, tmp_path):
    out = plots.plot_accuracy_vs_eps(_report(), tmp_path / "curve.png", experts=_experts())
    assert out == tmp_path / "curve.png"
    img = _assert_png(out)
    for role in ("clean", "fgsm", "pgd"):   # every role is drawn in its own colour
        assert _has_colour(img, plots.ROLE_COLORS[role]) > 50, role
    assert _has_colour(img, plots.PRESET_COLOR) > 20
    assert _only_files(tmp_path) == ["curve.png"]


def test_accuracy_vs_eps_mixture_only_without_interval(mpl, tmp_path):
    report = _report(ci=False)
    report["sanity"]["all_passed"] = False
    del report["preset"]
    _assert_png(plots.plot_accuracy_vs_eps(report, tmp_path / "sub" / "curve.png"))


def test_accuracy_vs_eps_empty_curve_writes_nothing(mpl, tmp_path):
    for report in ({"curve": {"points": []}}, {"curve": None}, {}):
        with pytest.warns(UserWarning, match="nothing to plot"):
            assert plots.plot_accuracy_vs_eps(report, tmp_path / "c.png") is None
    assert _only_files(tmp_path) == []


def test_accuracy_vs_eps_bad_inputs_name_what_was_expected(tmp_path):
    bad = _experts()
    bad["accuracy"] = bad["accuracy"][:-1]
    with pytest.raises(ValueError, match=r"expected 6 rows \(one per eps\) of 9 values"):
        plots.plot_accuracy_vs_eps(_report(), tmp_path / "c.png", experts=bad)
    with pytest.raises(ValueError, match="'roles', 'eps', 'accuracy'"):
        plots.plot_accuracy_vs_eps(_report(), tmp_path / "c.png", experts={"roles": ROLES})
    with pytest.raises(ValueError, match=r"ending in one of \('.png', '.pdf', '.svg'\), got '.*c.jpg'"):
        plots.plot_accuracy_vs_eps(_report(), tmp_path / "c.jpg")


def test_vector_output_by_suffix(mpl, tmp_path):
    out = plots.plot_accuracy_vs_eps(_report(), tmp_path / "curve.pdf")
    assert out.read_bytes()[:5] == b"%PDF-"


# ---------------------------------------------------------------- training curves
def _write_jsonl(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _train(step, run, loss, phase=1, acc=0.5, lr=0.1):
    return {"event": "train", "phase": phase, "global_step": step, "run_id": run, "loss": loss,
            "loss_finite": loss is not None, "acc": acc, "lr": lr, "img_per_s": 1000.0}


def _resumed_run_records():
    recs = [{"event": "start", "phase": 1, "global_step": 0, "run_id": "A"}]
    recs += [_train(s, "A", 2.0 - s / 100) for s in (10, 20, 30, 40, 45)]
    recs += [{"event": "eval", "phase": 1, "global_step": 40, "run_id": "A", "expert_clean": [0.1] * 9,
              "expert_pgd": [0.05] * 9}]
    # Run B resumed from the step-30 checkpoint: A's records past step 30 were thrown away.
    recs += [{"event": "start", "phase": 1, "global_step": 30, "run_id": "B"}]
    recs += [_train(40, "B", None), _train(50, "B", 1.1), _train(60, "B", 1.0)]
    recs += [{"event": "eval", "phase": 1, "global_step": 60, "run_id": "B", "expert_clean": [0.4] * 9,
              "expert_pgd": [0.2] * 9}]
    recs += [{"event": "start", "phase": 2, "global_step": 0, "run_id": "C"}]
    recs += [_train(s, "C", 1.5 - s / 100, phase=2, lr=0.01) for s in (10, 20)]
    recs += [{"event": "eval", "phase": 2, "global_step": 20, "run_id": "C", "clean": 0.7, "pgd": 0.35,
              "gate_clean": [1 / 9] * 9}]
    return recs


def test_read_training_history_keeps_the_resumed_run(tmp_path):
    path = _write_jsonl(tmp_path / "metrics.jsonl", _resumed_run_records(), tail='{"event": "train", "glo')
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        h = plots.read_training_history(path)
    assert sorted(h) == [1, 2]
    p1 = h[1]
    assert [r["global_step"] for r in p1["train"]] == [10, 20, 30, 40, 50, 60]
    assert [r["run_id"] for r in p1["train"]] == ["A", "A", "A", "B", "B", "B"]
    assert p1["train"][3]["loss"] is None       # the resumed run's null loss replaced A's finite one
    assert [(r["global_step"], r["run_id"]) for r in p1["eval"]] == [(60, "B")]
    assert p1["runs"] == ["A", "B"]
    assert [r["global_step"] for r in h[2]["train"]] == [10, 20] and h[2]["runs"] == ["C"]


def test_read_training_history_duplicate_step_without_start_record(tmp_path):
    recs = [_train(10, "A", 2.0), _train(20, "A", 1.9), _train(30, "A", 1.8),
            _train(20, "B", 1.5), _train(30, "B", 1.4)]
    h = plots.read_training_history(_write_jsonl(tmp_path / "m.jsonl", recs))
    assert [(r["global_step"], r["run_id"], r["loss"]) for r in h[1]["train"]] == \
        [(10, "A", 2.0), (20, "B", 1.5), (30, "B", 1.4)]


def test_read_training_history_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a metrics.jsonl"):
        plots.read_training_history(tmp_path / "absent.jsonl")


def test_training_curves_png_with_null_losses(mpl, tmp_path):
    path = _write_jsonl(tmp_path / "metrics.jsonl", _resumed_run_records())
    out = plots.plot_training_curves(path, tmp_path / "train.png")
    img = _assert_png(out)
    assert img.shape[0] > img.shape[1] * 0.4       # two rows of panels, one per phase
    assert _has_colour(img, plots.ROLE_COLORS["pgd"]) > 20    # the non-finite marker and the PGD curves


def test_training_curves_every_loss_null(mpl, tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [_train(s, "A", None) for s in (10, 20, 30)])
    _assert_png(plots.plot_training_curves(path, tmp_path / "t.png"))


def test_training_curves_empty_file_writes_nothing(mpl, tmp_path):
    for name, recs in (("empty.jsonl", []), ("starts.jsonl", [{"event": "start", "phase": 1, "global_step": 0}])):
        path = _write_jsonl(tmp_path / name, recs)
        with pytest.warns(UserWarning, match="nothing to plot"):
            assert plots.plot_training_curves(path, tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()


# ---------------------------------------------------------------- gate usage
@pytest.mark.parametrize("str_keys", [False, True])
def test_gate_usage_png(mpl, tmp_path, str_keys):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    out = plots.plot_gate_usage(_gate(str_keys=str_keys), ROLES, tmp_path / "gate.png", class_names=names)
    img = _assert_png(out)
    for role in ("clean", "fgsm", "pgd"):
        assert _has_colour(img, plots.ROLE_COLORS[role]) > 200, role


def test_gate_usage_without_classes_or_roles(mpl, tmp_path):
    gate = _gate(E=3)
    gate["per_class_clean"], gate["warnings"] = {}, []
    _assert_png(plots.plot_gate_usage(gate, None, tmp_path / "gate.png"))


def test_gate_usage_empty_and_bad_inputs(mpl, tmp_path):
    with pytest.warns(UserWarning, match="nothing to plot"):
        assert plots.plot_gate_usage({"inputs": {}}, ROLES, tmp_path / "g.png") is None
    with pytest.raises(ValueError, match="roles: expected 9 names"):
        plots.plot_gate_usage(_gate(), ROLES[:4], tmp_path / "g.png")
    gate = _gate()
    gate["inputs"]["pgd"]["mean"] = gate["inputs"]["pgd"]["mean"][:8]
    with pytest.raises(ValueError, match="same number of experts"):
        plots.plot_gate_usage(gate, ROLES, tmp_path / "g.png")
    gate = _gate()
    gate["per_class_clean"][3] = [0.5, 0.5]
    with pytest.raises(ValueError, match=r"\[3\]: expected 9 weights, got 2"):
        plots.plot_gate_usage(gate, ROLES, tmp_path / "g.png")
    with pytest.raises(ValueError, match="expected a dict with an 'inputs' dict"):
        plots.plot_gate_usage([], ROLES, tmp_path / "g.png")
    assert _only_files(tmp_path) == []


# ---------------------------------------------------------------- atomic writes
def test_overwrite_leaves_no_temp_files(mpl, tmp_path):
    target = tmp_path / "g.png"
    plots.plot_gate_usage(_gate(), ROLES, target)
    first = target.read_bytes()
    plots.plot_gate_usage(_gate(E=3), ["clean", "fgsm", "pgd"], target)
    assert target.read_bytes() != first
    assert _only_files(tmp_path) == ["g.png"]


def test_failed_draw_keeps_the_previous_file(mpl, tmp_path, monkeypatch):
    import matplotlib.figure
    target = tmp_path / "g.png"
    plots.plot_gate_usage(_gate(), ROLES, target)
    before = target.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        fname.write(b"\x89PNG half an image")
        raise RuntimeError("disk full")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.plot_gate_usage(_gate(E=3), None, target)
    assert target.read_bytes() == before
    assert _only_files(tmp_path) == ["g.png"]


# ---------------------------------------------------------------- without matplotlib
@pytest.fixture
def no_matplotlib(monkeypatch):
    """Every ``import matplotlib...`` fails, and plots.py is imported afresh under that rule
    (so its module-level code is checked too)."""
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    monkeypatch.delitem(sys.modules, "fastmoe_adv.plots")
    monkeypatch.setattr(fastmoe_adv, "plots", plots)     # restored after the test
    return importlib.import_module("fastmoe_adv.plots")


def test_without_matplotlib_every_function_returns_none(no_matplotlib, tmp_path):
    fresh = no_matplotlib
    assert fresh is not plots and fresh.matplotlib_available() is False
    metrics = _write_jsonl(tmp_path / "metrics.jsonl", _resumed_run_records())
    calls = [lambda: fresh.plot_accuracy_vs_eps(_report(), tmp_path / "a.png", experts=_experts()),
             lambda: fresh.plot_training_curves(metrics, tmp_path / "t.png"),
             lambda: fresh.plot_gate_usage(_gate(), ROLES, tmp_path / "g.png")]
    for call in calls:
        with pytest.warns(UserWarning, match=re.escape(plots.MISSING_MATPLOTLIB)):
            assert call() is None
    assert _only_files(tmp_path) == ["metrics.jsonl"]
    assert plots.MISSING_MATPLOTLIB == "matplotlib is not installed: pip install matplotlib to get PNG plots"
