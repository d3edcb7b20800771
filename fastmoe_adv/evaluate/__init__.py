"""Honest white-box robustness evaluation: accuracies with confidence intervals, eps curves,
gradient-masking sanity checks, gate diagnostics, per-expert tables and report files.

- robustness.py: ``robustness(model, images, labels, ...)`` and ``AttackSpec``;
- sanity.py: the gradient-masking checks; gate.py: what the gate does;
- experts.py: quick per-expert and mixture checks (training, demo); report.py: JSON + Markdown.
"""
from .experts import expert_robustness, mixture_robustness
from .gate import GATE_THRESHOLDS, gate_diagnostics, gate_statistics
from .report import markdown, write_report
from .robustness import DEFAULT_EPS_CURVE, AttackSpec, default_attacks, robustness, wilson_interval
from .sanity import SANITY_THRESHOLDS, GradientMaskingWarning

__all__ = ["robustness", "write_report", "markdown", "AttackSpec", "default_attacks", "GradientMaskingWarning",
           "SANITY_THRESHOLDS", "DEFAULT_EPS_CURVE", "expert_robustness", "mixture_robustness", "gate_diagnostics",
           "gate_statistics", "GATE_THRESHOLDS", "wilson_interval"]
