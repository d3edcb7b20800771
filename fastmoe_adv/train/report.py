"""The report a finished (or skipped) phase leaves beside its checkpoint: ``OUT/phase{N}_report.{json,md}``."""
from __future__ import annotations

import json
from pathlib import Path

from ..reporting import atomic_write_text, environment, write_json

__all__ = ["write_phase_report"]


def write_phase_report(summary: dict, out: Path, name: str, wall_s: float) -> dict:
    """Steps, images, timings, the last held-out evaluation, the config (always the checkpoint's)
    and the environment, as JSON and Markdown."""
    last_eval = next((h for h in reversed(summary.get("history", [])) if h.get("event") == "eval"), None)
    rep = {k: v for k, v in summary.items() if k not in ("model", "history")}
    rep.update(wall_time_s=wall_s, last_eval=last_eval, environment=environment(summary.get("device")))
    if rep.get("train_time_s") and rep.get("images_seen"):
        rep["train_images_per_s"] = rep["images_seen"] / rep["train_time_s"]
    write_json(Path(out) / f"{name}_report.json", rep)
    cfg = summary["config"]
    lines = [f"# {name} report", "", f"- checkpoint: {rep['checkpoint']}",
             f"- steps: {rep.get('global_step')}/{rep.get('total_steps')}, images trained: {rep.get('images_seen')} "
             "(phase 1: each expert's images counted)",
             f"- training time (excluding evaluation): {rep.get('train_time_s', 0):.1f} s; wall: {wall_s:.1f} s",
             f"- device: {rep.get('device')}, world size {rep.get('world_size')}",
             f"- PGD step counts: {cfg['pgd_steps_set']} x steps_scale {cfg['steps_scale']}"]
    if summary.get("already_done"):
        lines.append("- this phase had already finished: figures and config are the checkpoint's")
    if last_eval:
        lines.append("- last held-out evaluation: " + ", ".join(f"{k}={v}" for k, v in last_eval.items()))
    from ..evaluate.figures import training_figure
    lines += ["", *training_figure(Path(out) / "metrics.jsonl", out)]
    lines += ["", "## Config", "", "```json", json.dumps(cfg, indent=2), "```", "", "## Versions and hardware", ""]
    lines += [f"- {k}: {v}" for k, v in rep["environment"].items()]
    atomic_write_text(Path(out) / f"{name}_report.md", "\n".join(lines) + "\n")
    return rep
