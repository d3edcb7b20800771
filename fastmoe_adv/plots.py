"""Figures a paper can use: accuracy versus eps (the mixture with its 95% band, optionally each
expert), training curves from a run's metrics.jsonl, and how the gate spreads its weight.

matplotlib is optional: without it every function warns once and returns None. Figures are
drawn on a private ``Figure`` + Agg canvas (pyplot's global state is never touched) and written
atomically. Colours are the Okabe-Ito palette (safe for the common colour-vision deficiencies);
an expert role and the input kind it is named after (clean / FGSM / PGD) share one colour.
"""
from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path

from .reporting import atomic_write

__all__ = ["plot_accuracy_vs_eps", "plot_training_curves", "plot_gate_usage", "read_training_history",
           "matplotlib_available", "role_color", "MISSING_MATPLOTLIB", "ROLE_COLORS", "DPI"]

MISSING_MATPLOTLIB = "matplotlib is not installed: pip install matplotlib to get PNG plots"
DPI = 150
FORMATS = (".png", ".pdf", ".svg")

# Okabe & Ito (2008), "Color Universal Design": distinguishable under protan/deutan/tritan vision.
ROLE_COLORS = {"clean": "#0072B2", "fgsm": "#009E73", "pgd": "#D55E00"}
MIXTURE_COLOR = "#000000"
OTHER_COLOR = "#CC79A7"        # a role or input kind outside clean / fgsm / pgd
PRESET_COLOR = "#E69F00"
ROLE_NAMES = {"clean": "clean", "fgsm": "FGSM", "pgd": "PGD"}
# Experts of one role share a colour; line styles tell them apart.
_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))
PHASE_TITLES = {1: "phase 1: experts pre-trained", 2: "phase 2: experts + gate end to end"}
_ACC_KINDS = ("clean", "fgsm", "pgd")


def matplotlib_available() -> bool:
    """True when matplotlib can be imported (so the plot functions write files)."""
    return _canvas_class() is not None


def _canvas_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _new_figure(**kwargs):
    """A Figure on its own Agg canvas, or None (with the install hint) without matplotlib."""
    classes = _canvas_class()
    if classes is None:
        warnings.warn(MISSING_MATPLOTLIB, stacklevel=3)
        return None
    figure_cls, canvas_cls = classes
    fig = figure_cls(layout="constrained", **kwargs)
    canvas_cls(fig)
    return fig


def _check_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"path: expected a file name ending in one of {FORMATS}, got {str(path)!r}")
    return path


def _save(fig, path: Path) -> Path:
    """Written atomically (``reporting.atomic_write``): a reader never sees half an image and a
    failed draw leaves any previous figure in place."""
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lower()[1:], dpi=DPI, bbox_inches="tight"),
                 binary=True)
    return path


def _nothing(what: str):
    warnings.warn(f"{what}: nothing to plot, no file written", stacklevel=3)
    return None


def role_color(role) -> str:
    return ROLE_COLORS.get(str(role).lower(), OTHER_COLOR)


def _eps_label(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}" if abs(k - round(k)) < 1e-6 else f"{k:.3g}"


def _pct(v):
    return math.nan if v is None else 100 * float(v)


# ---------------------------------------------------------------- accuracy versus eps
def plot_accuracy_vs_eps(report: dict, path, experts: dict | None = None):
    """Accuracy (%) of the mixture versus eps (in /255) with its 95% interval as a band.

    report: an evaluation report (``evaluate.robustness``); reads ``report["curve"]`` =
        ``{"attack": "pgd"|"fgsm", "steps": int, "points": [{"eps": float (pixel scale [0, 1]),
        "accuracy": float in [0, 1], "ci95": [lo, hi] or None, "total": int, ...}]}``; when present
        also ``report["preset"]`` (``{"name", "eps", "robust_accuracy", "ci95"}``: drawn as the
        AutoAttack-grade point) and ``report["sanity"]["all_passed"]`` (False adds a warning line).
    experts: optional per-expert curves, each expert attacked as a stand-alone model:
        ``{"roles": [E role names, "clean"/"fgsm"/"pgd"], "eps": [n floats, pixel scale],
        "accuracy": [n lists of E floats in [0, 1] (None for a missing value)],
        "attack": optional label such as "PGD-10"}``.
    path: the file to write (.png, or .pdf / .svg for vector output).
    Returns the written Path, or None (with a warning) without matplotlib or without points.
    """
    path = _check_path(path)
    points = [p for p in ((report or {}).get("curve") or {}).get("points") or [] if p.get("accuracy") is not None]
    _check_experts(experts)
    if not points and not (experts and experts["eps"]):
        return _nothing("plot_accuracy_vs_eps")
    fig = _new_figure(figsize=(6.4, 4.6))
    if fig is None:
        return None
    ax = fig.subplots()
    if experts:
        _draw_experts(ax, experts)
    _draw_mixture(ax, points)
    _draw_preset(ax, report.get("preset"))
    eps_all = sorted({p["eps"] for p in points} | set((experts or {}).get("eps") or []))
    ax.set_xticks([255 * e for e in eps_all], [_eps_label(e) for e in eps_all])
    ax.set_xlabel("ε (L∞, in /255 of the pixel range)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(_curve_title(report.get("curve") or {}, points))
    ax.legend(loc="upper right", fontsize=7, ncol=2 if experts else 1, framealpha=0.9)
    if (report.get("sanity") or {}).get("all_passed") is False:
        fig.text(0.01, 0.0, "sanity checks FAILED: accuracies may be inflated by gradient masking (see the report)",
                 color="#D55E00", fontsize=8, va="top")
    return _save(fig, path)


def _check_experts(experts):
    if experts is None:
        return
    if not isinstance(experts, dict) or not {"roles", "eps", "accuracy"} <= set(experts):
        got = sorted(experts) if isinstance(experts, dict) else type(experts).__name__
        raise ValueError(f"experts: expected a dict with keys 'roles', 'eps', 'accuracy', got {got}")
    n, E = len(experts["eps"]), len(experts["roles"])
    acc = experts["accuracy"]
    if len(acc) != n or any(len(row) != E for row in acc):
        shape = [len(row) for row in acc]
        raise ValueError(f"experts['accuracy']: expected {n} rows (one per eps) of {E} values (one per role), got "
                         f"{len(acc)} rows of lengths {shape}")


def _draw_experts(ax, experts):
    seen = {}
    attack = experts.get("attack")
    for e, role in enumerate(experts["roles"]):
        k = seen[role] = seen.get(role, -1) + 1
        acc = [_pct(row[e]) for row in experts["accuracy"]]
        name = ROLE_NAMES.get(str(role).lower(), str(role))
        ax.plot([255 * x for x in experts["eps"]], acc, color=role_color(role), lw=1.2, alpha=0.85,
                ls=_LINESTYLES[k % len(_LINESTYLES)], marker=".", ms=4,
                label=f"e{e} ({name} expert{', ' + attack if attack and e == 0 else ''})")


def _draw_mixture(ax, points):
    if not points:
        return
    x = [255 * p["eps"] for p in points]
    ax.plot(x, [_pct(p["accuracy"]) for p in points], color=MIXTURE_COLOR, lw=2.2, marker="o", ms=5,
            label="mixture", zorder=5)
    ci = [p.get("ci95") for p in points]
    if all(c and c[0] is not None and c[1] is not None for c in ci):
        ax.fill_between(x, [_pct(c[0]) for c in ci], [_pct(c[1]) for c in ci], color=MIXTURE_COLOR, alpha=0.18,
                        lw=0, label="mixture, 95% interval", zorder=4)


def _draw_preset(ax, preset):
    if not preset or preset.get("robust_accuracy") is None or preset.get("eps") is None:
        return
    x, y = 255 * preset["eps"], _pct(preset["robust_accuracy"])
    ci = preset.get("ci95")
    yerr = [[y - _pct(ci[0])], [_pct(ci[1]) - y]] if ci and None not in ci else None
    ax.errorbar([x], [y], yerr=yerr, fmt="D", color=PRESET_COLOR, ms=7, capsize=3, zorder=6,
                label=f"{preset.get('name', 'preset')} preset (worst case, 95% CI)")


def _curve_title(curve, points) -> str:
    attack = curve.get("attack")
    if attack == "pgd":
        name = f"PGD-{curve.get('steps')}" + (", random start" if curve.get("random_start") else "")
    elif attack == "fgsm":
        name = "FGSM"
    else:
        name = None
    n = points[0].get("total") if points else None
    parts = [p for p in (name, f"n = {n} images" if n else None) if p]
    return "Accuracy versus ε" + (f" ({'; '.join(parts)})" if parts else "")


# ---------------------------------------------------------------- training curves
def read_training_history(metrics_path) -> dict:
    """The records of a run's metrics.jsonl, per phase, as the finished run saw them.

    Returns ``{phase: {"train": [records by global_step], "eval": [records by global_step],
    "runs": [run_id, ...]}}``. Several runs may have appended to one file (a resumed run): when a
    new ``run_id`` appears in a phase, records of earlier runs past the step it resumed from
    (its "start" record's global_step, else before its first record) are dropped, and for a
    step logged twice the later line wins. Unreadable lines (a write cut short) are skipped
    with one warning.
    """
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics_path: expected a metrics.jsonl written by training, {str(path)!r} is not "
                                "a file")
    phases, bad = {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("global_step"), (int, float)):
                bad += 1
                continue
            _add_record(phases.setdefault(rec.get("phase"), {"run": object(), "runs": [], "train": {}, "eval": {}}),
                        rec)
    if bad:
        warnings.warn(f"read_training_history: skipped {bad} unreadable line(s) of {path}", stacklevel=2)
    return {ph: {"train": [s["train"][k] for k in sorted(s["train"])],
                 "eval": [s["eval"][k] for k in sorted(s["eval"])], "runs": s["runs"]} for ph, s in phases.items()}


def _add_record(state: dict, rec: dict):
    step, run = rec["global_step"], rec.get("run_id")
    if run != state["run"]:
        # Work logged by an earlier run after the checkpoint this run resumed from was thrown away.
        is_start = rec.get("event") == "start"
        for kind in ("train", "eval"):
            state[kind] = {k: v for k, v in state[kind].items() if (k <= step if is_start else k < step)}
        state["run"] = run
        state["runs"].append(run)
    if rec.get("event") in ("train", "eval"):
        state[rec["event"]][step] = rec


def plot_training_curves(metrics_path, path):
    """One row of panels per phase: training loss, accuracy (training batches and held-out
    evaluations, clean and adversarial), learning rate; x = global step.

    metrics_path: a run's metrics.jsonl (see ``read_training_history`` for how several runs in one
        file are merged). Records with ``"event": "train"`` give loss (null when non-finite: drawn
        as a dotted vertical line), acc, lr, img_per_s; ``"event": "eval"`` give scalar "clean" /
        "fgsm" / "pgd" accuracies of the mixture and per-expert lists "expert_clean" / ... (drawn
        as their mean over experts with the min-max range as a band).
    path: the file to write (.png, .pdf, .svg). Returns the written Path, or None (with a warning)
    without matplotlib or when the file holds no train/eval records.
    """
    path = _check_path(path)
    history = read_training_history(metrics_path)
    phases = sorted((p for p, h in history.items() if h["train"] or h["eval"]), key=lambda p: (str(type(p)), p))
    if not phases:
        return _nothing("plot_training_curves")
    fig = _new_figure(figsize=(13, 3.4 * len(phases) + 0.4))
    if fig is None:
        return None
    for row, phase in zip(fig.subplots(len(phases), 3, squeeze=False), phases):
        h = history[phase]
        _loss_panel(row[0], h["train"])
        _accuracy_panel(row[1], h["train"], h["eval"])
        _lr_panel(row[2], h["train"])
        title = PHASE_TITLES.get(phase, f"phase {phase}")
        speeds = sorted(r["img_per_s"] for r in h["train"] if isinstance(r.get("img_per_s"), (int, float)))
        speed = f", median {speeds[len(speeds) // 2]:,.0f} img/s" if speeds else ""
        row[0].set_title(f"{title}: loss", fontsize=10)
        row[1].set_title(f"{title}: accuracy", fontsize=10)
        row[2].set_title(f"{title}: learning rate{speed}", fontsize=10)
        for ax in row:
            ax.set_xlabel("global step")
            ax.grid(True, alpha=0.3)
    fig.suptitle(f"Training curves: {Path(metrics_path).resolve().parent.name}")
    return _save(fig, path)


def _empty(ax, what="no records"):
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else math.nan


def _loss_panel(ax, train):
    ax.set_ylabel("training loss (cross-entropy)")
    steps = [r["global_step"] for r in train]
    loss = [_number(r.get("loss")) for r in train]
    if not any(math.isfinite(v) for v in loss):
        _empty(ax, "no finite loss")
    ax.plot(steps, loss, color=MIXTURE_COLOR, lw=1.3)
    bad = [s for s, v in zip(steps, loss) if not math.isfinite(v)]
    for i, s in enumerate(bad):
        ax.axvline(s, color=ROLE_COLORS["pgd"], ls=":", lw=1.2, label="non-finite loss" if i == 0 else None)
    if bad:
        ax.legend(loc="upper right", fontsize=7)


def _accuracy_panel(ax, train, evals):
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    drawn = False
    if any(r.get("acc") is not None for r in train):
        ax.plot([r["global_step"] for r in train], [100 * _number(r.get("acc")) for r in train], color="0.45",
                lw=1.0, label="training batches")
        drawn = True
    for kind in _ACC_KINDS:
        name, color = ROLE_NAMES[kind], ROLE_COLORS[kind]
        rows = [(r["global_step"], r[kind]) for r in evals if isinstance(r.get(kind), (int, float))]
        if rows:
            ax.plot([s for s, _ in rows], [100 * v for _, v in rows], color=color, lw=1.8, marker="o", ms=3,
                    label=f"held-out, {name}")
            drawn = True
        lists = [(r["global_step"], [_number(v) for v in r[f"expert_{kind}"]]) for r in evals
                 if isinstance(r.get(f"expert_{kind}"), list) and r[f"expert_{kind}"]]
        if lists:
            steps = [s for s, _ in lists]
            lo = [100 * min(v) for _, v in lists]
            hi = [100 * max(v) for _, v in lists]
            ax.plot(steps, [100 * sum(v) / len(v) for _, v in lists], color=color, lw=1.5, ls="--", marker="s",
                    ms=3, label=f"held-out, {name}, experts' mean")
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0, label=f"held-out, {name}, experts' range")
            drawn = True
    if drawn:
        ax.legend(loc="lower right", fontsize=7)
    else:
        _empty(ax)


def _lr_panel(ax, train):
    ax.set_ylabel("learning rate")
    rows = [(r["global_step"], _number(r.get("lr"))) for r in train]
    rows = [(s, v) for s, v in rows if math.isfinite(v)]
    if not rows:
        _empty(ax)
        return
    ax.plot([s for s, _ in rows], [v for _, v in rows], color=ROLE_COLORS["clean"], lw=1.5)
    positive = [v for _, v in rows if v > 0]
    if positive and len(positive) == len(rows) and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


# ---------------------------------------------------------------- gate usage
def plot_gate_usage(gate: dict, roles, path, class_names=None):
    """Mean gate weight per expert on clean / FGSM / PGD inputs (bars, error bars = std across
    inputs, dashed line = uniform 1/E), and a heatmap of the mean weight per class on clean inputs.

    gate: the gate diagnostics (``evaluate.gate.gate_diagnostics``): ``{"inputs": {"clean": {"mean": [E],
        "std": [E], "images": int, ...}, "fgsm": {...}, "pgd": {...}}, "per_class_clean": {class: [E]},
        "attack": {"eps", "pgd_steps"} (optional), "warnings": [str] (printed under the figure)}``.
        Class keys may be ints or strings (after a JSON round trip).
    roles: the experts' roles in order (E names), or None.
    class_names: optional names indexed by class number (e.g. CIFAR-10's) for the heatmap rows.
    path: the file to write (.png, .pdf, .svg). Returns the written Path, or None (with a warning)
    without matplotlib or when ``gate["inputs"]`` is empty.
    """
    path = _check_path(path)
    inputs, E = _check_gate(gate, roles)
    if not inputs:
        return _nothing("plot_gate_usage")
    per_class = {c: w for c, w in (gate.get("per_class_clean") or {}).items() if w}
    fig = _new_figure(figsize=(12.5 if per_class else 7.5, 4.6))
    if fig is None:
        return None
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]}) if per_class else [fig.subplots()]
    _gate_bars(axes[0], inputs, E, list(roles or []), gate.get("attack") or {})
    if per_class:
        _gate_heatmap(fig, axes[1], per_class, E, list(roles or []), class_names)
    notes = gate.get("warnings") or []
    if notes:
        text = "\n".join(textwrap.fill(f"gate warning: {w}", 150) for w in notes)
        fig.text(0.01, 0.0, text, color=ROLE_COLORS["pgd"], fontsize=7, va="top")
    return _save(fig, path)


def _check_gate(gate, roles):
    if not isinstance(gate, dict) or not isinstance(gate.get("inputs"), dict):
        raise ValueError(f"gate: expected a dict with an 'inputs' dict (gate_diagnostics), got "
                         f"{sorted(gate) if isinstance(gate, dict) else type(gate).__name__}")
    inputs = {k: s for k, s in gate["inputs"].items() if s and s.get("mean")}
    sizes = {k: len(s["mean"]) for k, s in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"gate['inputs']: expected the same number of experts for every input kind, got {sizes}")
    E = next(iter(sizes.values()), 0)
    for k, s in inputs.items():
        if s.get("std") is not None and len(s["std"]) != E:
            raise ValueError(f"gate['inputs'][{k!r}]['std']: expected {E} values, got {len(s['std'])}")
    if roles and inputs and len(roles) != E:
        raise ValueError(f"roles: expected {E} names (one per expert), got {len(roles)}")
    return inputs, E


def _expert_ticks(ax, E, roles, axis="x"):
    labels = [f"e{i}\n{ROLE_NAMES.get(str(roles[i]).lower(), roles[i])}" if roles else f"e{i}" for i in range(E)]
    getattr(ax, f"set_{axis}ticks")(range(E), labels, fontsize=8)
    if roles:
        for tick, role in zip(getattr(ax, f"get_{axis}ticklabels")(), roles):
            tick.set_color(role_color(role))


def _gate_bars(ax, inputs, E, roles, attack):
    kinds = [k for k in _ACC_KINDS if k in inputs] + [k for k in inputs if k not in _ACC_KINDS]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        s = inputs[kind]
        x = [e + (i - (len(kinds) - 1) / 2) * width for e in range(E)]
        n = f" (n = {s['images']})" if s.get("images") else ""
        name = ROLE_NAMES.get(kind, kind)
        if kind == "pgd" and attack.get("pgd_steps"):
            name = f"PGD-{attack['pgd_steps']}"
        std = s.get("std")
        # A weight cannot go below 0: clip the lower whisker instead of drawing a negative weight.
        yerr = [[min(d, m) for d, m in zip(std, s["mean"])], std] if std else None
        ax.bar(x, s["mean"], width, yerr=yerr, capsize=2, color=ROLE_COLORS.get(kind, OTHER_COLOR),
               error_kw={"lw": 0.8, "ecolor": "0.25"}, label=f"{name} inputs{n}")
    ax.axhline(1 / E, color="0.4", ls="--", lw=1, label=f"uniform (1/{E})")
    _expert_ticks(ax, E, roles)
    ax.set_ylabel("gate weight (mean ± std across inputs)")
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    eps = attack.get("eps")
    ax.set_title("Gate weight per expert" + (f" (attacks at ε = {_eps_label(eps)}/255)" if eps else ""),
                 fontsize=10)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)


def _class_key(c):
    try:
        return (0, int(c), "")
    except (TypeError, ValueError):
        return (1, 0, str(c))


def _gate_heatmap(fig, ax, per_class, E, roles, class_names):
    classes = sorted(per_class, key=_class_key)
    for c in classes:
        if len(per_class[c]) != E:
            raise ValueError(f"gate['per_class_clean'][{c!r}]: expected {E} weights, got {len(per_class[c])}")
    rows = [[_number(v) for v in per_class[c]] for c in classes]
    top = max((v for r in rows for v in r if math.isfinite(v)), default=1.0)
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=top, aspect="auto", interpolation="nearest")

    def label(c):
        k = _class_key(c)
        return str(class_names[k[1]]) if class_names and k[0] == 0 and 0 <= k[1] < len(class_names) else str(c)
    ax.set_yticks(range(len(classes)), [label(c) for c in classes], fontsize=8)
    _expert_ticks(ax, E, roles)
    if E * len(classes) <= 160:
        for r, row in enumerate(rows):
            for e, v in enumerate(row):
                ax.text(e, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 * top else "black")
    ax.set_ylabel("true class")
    ax.set_title("Mean gate weight per class (clean inputs)", fontsize=10)
    fig.colorbar(im, ax=ax, label="mean gate weight")
