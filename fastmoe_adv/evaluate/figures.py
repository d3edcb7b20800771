"""The figures an evaluation and a training run leave beside their reports (PNG, matplotlib
optional: without it the reports say so instead of linking an image)."""
from __future__ import annotations

from pathlib import Path

from .. import plots
from .experts import expert_robustness

__all__ = ["expert_curves", "evaluation_figures", "training_figure"]


def expert_curves(model, images, labels, eps_values, steps, batch_size=256, seed=0) -> dict:
    """Every expert attacked alone with PGD-``steps`` (alpha = 2.5 * eps / steps, the curve's rule)
    at each eps: the ``experts`` argument of ``plots.plot_accuracy_vs_eps``."""
    acc = []
    for eps in eps_values:
        if eps == 0:
            r = expert_robustness(model, images, labels, fgsm_eps=None, pgd_steps=0, batch_size=batch_size)
            acc.append(r["clean"])
        else:
            r = expert_robustness(model, images, labels, fgsm_eps=None, pgd_eps=eps, pgd_alpha=2.5 * eps / steps,
                                  pgd_steps=steps, batch_size=batch_size, seed=seed)
            acc.append(r["pgd"])
    return {"roles": list(model.roles), "eps": list(eps_values), "accuracy": acc, "attack": f"PGD-{steps}"}


def evaluation_figures(report: dict, out_dir, experts: dict | None = None) -> list:
    """Accuracy versus eps (mixture, experts) and gate usage; Markdown lines linking them."""
    out_dir = Path(out_dir)
    lines = ["## Figures", ""]
    written = []
    if (report.get("curve") or {}).get("points") or experts:
        written.append(("Accuracy versus eps", plots.plot_accuracy_vs_eps(report, out_dir / "accuracy_vs_eps.png",
                                                                          experts=experts)))
    if report.get("gate"):
        roles = report["model"].get("roles") or []
        written.append(("Gate usage", plots.plot_gate_usage(report["gate"], roles, out_dir / "gate_usage.png")))
    for title, path in written:
        lines.append(f"![{title}]({path.name})" if path else f"- {title}: not drawn ({_why()})")
    return lines if written else []


def training_figure(metrics_path, out_dir) -> list:
    """Training curves per phase from ``metrics.jsonl``; Markdown lines linking them."""
    path = plots.plot_training_curves(metrics_path, Path(out_dir) / "training_curves.png")
    return ["## Training curves", "", f"![Training curves]({path.name})" if path else f"- not drawn ({_why()})"]


def _why() -> str:
    return "matplotlib is not installed" if not plots.matplotlib_available() else "no data to plot"
