"""The evaluation report as files: JSON (everything) and Markdown (tables a paper can use, a
banner when a sanity check failed or the gate looks collapsed)."""
from __future__ import annotations

import json
import os

from ..reporting import atomic_write_text, fmt_eps, json_safe

__all__ = ["write_report", "markdown"]


def _fmt_acc(acc):
    return "-" if acc is None else f"{100 * acc:.2f}%"


def _fmt_ci(ci):
    if not ci or ci[0] is None:
        return "-"
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _fmt_value(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _banner(report) -> list:
    sanity = report.get("sanity") or {}
    checks = sanity.get("checks") or []
    failed = [c for c in checks if not c["passed"]]
    lines = []
    if failed:
        lines += [f"> **WARNING: {len(failed)} of {len(checks)} sanity checks FAILED. The accuracies below may be "
                  "inflated by gradient masking; do not report them without investigating.**", ">"]
        lines += [f"> - **{c['name']}**: {_cell(c['message'])}" for c in failed]
        lines.append("")
    elif checks:
        lines += [f"All {len(checks)} gradient-masking sanity checks passed "
                  f"(on the first {sanity.get('subset_size')} images; see below).", ""]
    else:
        lines += ["Sanity checks were not run.", ""]
    for warning in (report.get("gate") or {}).get("warnings", []):
        lines += [f"> **GATE WARNING: {_cell(warning)}**", ""]
    return lines


def _accuracy_table(report) -> list:
    data = report["data"]
    lines = [f"{data['images']} images of shape {'x'.join(map(str, data['shape']))}, L-inf threat model, "
             "pixel scale [0, 1]. Intervals: 95% Wilson score intervals.", "", "## Accuracy", "",
             "| attack | eps | steps | accuracy | 95% CI | correct/total |", "|---|---|---|---|---|---|"]
    for r in report["attacks"].values():
        steps = "-" if r["kind"] == "clean" else str(r["steps"])
        extra = ""
        if r["kind"] == "pgd":
            extra = f" (alpha {fmt_eps(r['alpha'])}{', random start' if r['random_start'] else ''}"
            extra += f", {r['restarts']} restarts)" if r["restarts"] > 1 else ")"
        eps = "-" if r["kind"] == "clean" else fmt_eps(r["eps"])
        lines.append(f"| {_cell(r['name'] + extra)} | {eps} | {steps} | {_fmt_acc(r['accuracy'])} | "
                     f"{_fmt_ci(r.get('ci95'))} | {r['correct']}/{r['total']} |")
    curve = report.get("curve") or {}
    if curve.get("points"):
        name = f"PGD-{curve['steps']}" if curve["attack"] == "pgd" else "FGSM"
        rule = f", alpha = {curve['alpha_rule']}, random start" if curve["attack"] == "pgd" else ""
        lines += ["", f"## Accuracy versus eps ({name}{rule})", "", "| eps | accuracy | 95% CI | correct/total |",
                  "|---|---|---|---|"]
        lines += [f"| {fmt_eps(p['eps'])} | {_fmt_acc(p['accuracy'])} | {_fmt_ci(p.get('ci95'))} | "
                  f"{p['correct']}/{p['total']} |" for p in curve["points"]]
    return lines


def _preset_table(report) -> list:
    pre = report.get("preset")
    if not pre:
        return []
    lines = ["", f"## Preset: {pre['name']} (per-point worst case; each stage runs on the points still robust)", ""]
    gap = report.get("pgd_gap")
    if gap:
        lines += [f"**{gap['statement']}.**", ""]
    lines += [f"Robust accuracy {_fmt_acc(pre['robust_accuracy'])} {_fmt_ci(pre.get('ci95'))} "
              f"({pre['robust_correct']}/{pre['n']}; clean {_fmt_acc(pre['clean_accuracy'])}, {pre['norm']} eps "
              f"{fmt_eps(pre['eps'])}).", "",
              "| after stage | robust accuracy | 95% CI | attacked | fooled | seconds | settings |",
              "|---|---|---|---|---|---|---|"]
    for st in pre["stages"]:
        note = f" (skipped: {st['skipped']})" if st.get("skipped") else ""
        lines.append(f"| {st['name']}{_cell(note)} | {_fmt_acc(st['robust_accuracy'])} | {_fmt_ci(st.get('ci95'))} | "
                     f"{st['attacked']} | {st['fooled']} | {st['seconds']:.1f} | {_cell(_fmt_value(st['settings']))} |")
    if pre.get("autoattack"):
        lines += ["", f"Original autoattack package: {_cell(_fmt_value(pre['autoattack']))}"]
    return lines


def _gate_tables(report) -> list:
    gated = [r for r in report["attacks"].values() if r.get("gate_weights")]
    if not gated:
        return []
    roles = report["model"].get("roles") or [""] * len(gated[0]["gate_weights"])
    heads = [f"e{i} ({r})" if r else f"e{i}" for i, r in enumerate(roles)]
    lines = ["", "## Mean gate weight per expert", "", "| attack | " + " | ".join(heads) + " |",
             "|---|" + "---|" * len(heads)]
    lines += [f"| {_cell(r['name'])} | " + " | ".join(f"{w:.3f}" for w in r["gate_weights"]) + " |" for r in gated]
    gate = report.get("gate")
    if gate:
        from .gate import gate_markdown
        lines += ["", *gate_markdown(gate, roles)]
    return lines


def _throughput_and_checks(report) -> list:
    lines = ["", "## Throughput", "", "| attack | images/s | seconds |", "|---|---|---|"]
    for r in report["attacks"].values():
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        lines.append(f"| {_cell(r['name'])} | {ips} | {r['seconds']:.2f} |")
    sanity = report.get("sanity") or {}
    checks = sanity.get("checks") or []
    if checks:
        lines += ["", f"## Sanity checks (gradient masking; first {sanity.get('subset_size')} images)", "",
                  "| check | result | measured | threshold | message |", "|---|---|---|---|---|"]
        for c in checks:
            result = "SKIP" if c.get("skipped") else ("PASS" if c["passed"] else "**FAIL**")
            lines.append(f"| {c['name']} | {result} | {_cell(_fmt_value(c['measured']))} | "
                         f"{_cell(_fmt_value(c['threshold']))} | {_cell(c['message'])} |")
    return lines


def _settings(report) -> list:
    lines = ["", "## Settings", ""]
    lines += [f"- {k}: {_cell(_fmt_value(v))}" for k, v in report["settings"].items() if k != "attacks"]
    lines += [f"- model: {report['model']['class']}, {report['model']['parameters']:,} parameters"]
    if report["model"].get("config"):
        lines.append(f"- model config: {_cell(_fmt_value(report['model']['config']))}")
    if report.get("wall_time_s") is not None:
        lines.append(f"- wall time: {report['wall_time_s']:.1f} s")
    lines += ["", "## Hardware and versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["environment"].items()]
    lines += [f"- timestamp (UTC): {report['timestamp']}", ""]
    return lines


def markdown(report, extra_sections=()) -> str:
    """The Markdown report; ``extra_sections``: lists of lines inserted after the accuracy tables."""
    lines = [f"# Robustness report: {report['model']['class']}", "", *_banner(report), *_accuracy_table(report),
             *_preset_table(report)]
    for section in extra_sections:
        lines += ["", *section]
    lines += [*_gate_tables(report), *_throughput_and_checks(report), *_settings(report)]
    return "\n".join(lines)


def write_report(report: dict, out_dir, name: str = "report", extra_sections=()) -> tuple:
    """Write ``report`` as ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md`` (atomic writes:
    a temp file then ``os.replace``). Returns ``(json_path, md_path)``."""
    if not isinstance(report, dict) or "attacks" not in report:
        raise ValueError("report: expected the dict returned by robustness()")
    if not isinstance(name, str) or not name or os.sep in name:
        raise ValueError(f"name: expected a file stem without path separators, got {name!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    atomic_write_text(json_path, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, markdown(report, extra_sections))
    return json_path, md_path
