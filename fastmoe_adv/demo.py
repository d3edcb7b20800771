"""The demo: both phases on the embedded synthetic data at a tiny width, then the robustness of
the phase-1 experts (each alone) and of the final mixture; a few minutes on 2 CPU cores.

The configuration: 3 experts (one per role) of width 8, PGD step counts scaled by 0.1
({10..50} -> {1..5}), attack strength ramped in over the first half of each phase (without it
these tiny experts stay at chance under attack in a CPU-minutes budget).
"""
from __future__ import annotations

import time
from pathlib import Path

from . import data
from .constants import DEFAULT_ALPHA, DEFAULT_EPS, ROLES
from .evaluate import AttackSpec, expert_robustness, robustness, write_report
from .reporting import atomic_write_text, environment, fmt_pct, write_json
from .train import TrainConfig, pretrain, train

__all__ = ["DEMO_CONFIG", "QUICK_DEMO_CONFIG", "run_demo", "role_rows", "accuracy_table"]

DEMO_CONFIG = dict(dataset="synthetic", train_size=2048, width=8, num_experts=3, batch_size=16, pretrain_epochs=4,
                   train_epochs=1, lr=0.01, nesterov=True, schedule="onecycle", steps_scale=0.1, eps_warmup=0.5,
                   eval_every=-1, eval_limit=256, checkpoint_every=128, log_every=16, backend="auto",
                   executor="auto")
DEMO_EVAL = dict(images=256, pgd_steps=20, batch_size=64, sanity=True)
# --quick: the same pipeline, smaller (for the test suite; its numbers mean nothing).
QUICK_DEMO_CONFIG = dict(DEMO_CONFIG, train_size=256, width=4, batch_size=32, pretrain_epochs=1, train_epochs=1,
                         checkpoint_every=4, log_every=2)
QUICK_DEMO_EVAL = dict(images=64, pgd_steps=2, batch_size=64, sanity=False)


def role_rows(roles, expert_acc: dict):
    """Per-expert and per-role mean rows: (label, clean, fgsm, pgd)."""
    rows = []
    for role in ROLES:
        idx = [i for i, r in enumerate(roles) if r == role]
        if not idx:
            continue
        mean = {k: sum(expert_acc[k][i] for i in idx) / len(idx) for k in ("clean", "fgsm", "pgd")
                if k in expert_acc}
        label = f"{role} expert" + ("s (mean of %d)" % len(idx) if len(idx) > 1 else f" (e{idx[0]})")
        rows.append((label, mean.get("clean"), mean.get("fgsm"), mean.get("pgd")))
    return rows


def accuracy_table(rows, pgd_label, fgsm_label="FGSM 8/255"):
    head = f"| {'model':<28} | clean  | {fgsm_label:<10} | {pgd_label:<10} |"
    lines = [head, "|" + "-" * 30 + "|--------|------------|------------|"]
    for label, c, f, p in rows:
        lines.append(f"| {label:<28} | {fmt_pct(c)} |   {fmt_pct(f)}   |   {fmt_pct(p)}   |")
    return "\n".join(lines)


def run_demo(out, quick=False, seed=0, device="auto", resume=False, overwrite=False, progress=True) -> dict:
    """Train both phases, evaluate, write ``OUT/report.{json,md}``; returns the report."""
    t_start = time.perf_counter()
    cfg = TrainConfig(**(QUICK_DEMO_CONFIG if quick else DEMO_CONFIG), seed=seed, device=device)
    ev_cfg = QUICK_DEMO_EVAL if quick else DEMO_EVAL
    out, timings = Path(out), {}
    print(f"demo: {cfg.num_experts} experts (roles {cfg.expert_roles}), width {cfg.width}, synthetic data "
          f"({cfg.train_size} train images), PGD steps {list(cfg.pgd_steps_set)} x steps_scale {cfg.steps_scale} "
          f"= {cfg.pgd_steps_scaled}", flush=True)
    t = time.perf_counter()
    s1 = pretrain(cfg, out, resume=resume, progress=progress, overwrite=overwrite)
    timings["phase1"] = time.perf_counter() - t
    images, labels = data.load_dataset("synthetic", split="test", seed=cfg.seed, size=ev_cfg["images"])
    pgd_steps = ev_cfg["pgd_steps"]
    t = time.perf_counter()
    experts = expert_robustness(s1["model"], images, labels, pgd_steps=pgd_steps, batch_size=ev_cfg["batch_size"],
                                seed=cfg.seed)
    timings["eval_experts"] = time.perf_counter() - t
    t = time.perf_counter()
    s2 = train(cfg, out, resume=resume, progress=progress, overwrite=overwrite)
    timings["phase2"] = time.perf_counter() - t
    t = time.perf_counter()
    specs = [AttackSpec("clean", "clean"), AttackSpec("fgsm", "fgsm", eps=DEFAULT_EPS),
             AttackSpec(f"pgd{pgd_steps}", "pgd", eps=DEFAULT_EPS, alpha=DEFAULT_ALPHA, steps=pgd_steps)]
    mixture = robustness(s2["model"], images, labels, attacks=specs, batch_size=ev_cfg["batch_size"], eps_curve=(),
                         seed=cfg.seed, progress=progress, sanity=ev_cfg["sanity"], gate=not quick)
    timings["eval_mixture"] = time.perf_counter() - t
    write_report(mixture, out, name="mixture_report")
    timings.update(phase1_training=s1.get("train_time_s"), phase2_training=s2.get("train_time_s"))
    report = _demo_report(cfg, quick, s1, s2, experts, mixture, pgd_steps, len(labels), timings,
                          time.perf_counter() - t_start, out)
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _demo_markdown(cfg, report, pgd_steps))
    return report


def _robustness_check(roles, experts, mixture_pgd):
    by_role = {r: [experts["pgd"][i] for i, x in enumerate(roles) if x == r] for r in ROLES}
    check = {f"pgd_accuracy_{r}_experts": v for r, v in by_role.items() if v}
    check["pgd_accuracy_mixture"] = mixture_pgd
    if by_role["clean"]:
        clean_pgd = max(by_role["clean"])
        adversarial = by_role["fgsm"] + by_role["pgd"]
        check["adversarial_experts_beat_clean_expert"] = bool(adversarial) and min(adversarial) > clean_pgd
        check["mixture_beats_clean_expert"] = mixture_pgd > clean_pgd
    return check


def _demo_report(cfg, quick, s1, s2, experts, mixture, pgd_steps, n_images, timings, wall, out):
    roles = list(s1["model"].roles)
    acc = {name: r["accuracy"] for name, r in mixture["attacks"].items()}
    rows = role_rows(roles, experts) + [("final mixture (phase 2)", acc["clean"], acc["fgsm"],
                                         acc[f"pgd{pgd_steps}"])]
    return {
        "demo": {"quick": quick, "wall_time_s": wall, "timings_s": timings,
                 "eval": {"images": n_images, "fgsm_eps": DEFAULT_EPS, "pgd_eps": DEFAULT_EPS,
                          "pgd_alpha": DEFAULT_ALPHA, "pgd_steps": pgd_steps, "random_start": True, "white_box": True,
                          "experts": "each expert attacked alone (its own logits)",
                          "mixture": "attacks through the whole mixture (experts + gate)"},
                 "steps_scale_note": f"training PGD step counts scaled by {cfg.steps_scale}: "
                                     f"{list(cfg.pgd_steps_set)} -> {cfg.pgd_steps_scaled}",
                 "robustness_check": _robustness_check(roles, experts, acc[f"pgd{pgd_steps}"])},
        "table": accuracy_table(rows, f"PGD-{pgd_steps}"),
        "experts": {"roles": roles, **experts},
        "mixture": {"accuracy": acc, "gate_weights": {k: v.get("gate_weights") for k, v in mixture["attacks"].items()},
                    "gate_warnings": (mixture.get("gate") or {}).get("warnings"),
                    "sanity": mixture["sanity"].get("all_passed"), "report": "mixture_report.md"},
        "config": cfg.to_dict(),
        "checkpoints": {"phase1": s1["checkpoint"], "phase2": s2["checkpoint"], "last": str(out / "last.pt")},
        "environment": environment(s2.get("device")),
    }


def _demo_markdown(cfg, report, pgd_steps) -> str:
    check, t = report["demo"]["robustness_check"], report["demo"]["timings_s"]
    md = ["# fastmoe_adv demo", "",
          f"Synthetic data, {cfg.num_experts} experts of width {cfg.width} (roles {cfg.expert_roles}), "
          f"{cfg.pretrain_epochs} pre-training epoch(s) + {cfg.train_epochs} joint epoch(s) on {cfg.train_size} "
          f"images; training PGD step counts {list(cfg.pgd_steps_set)} scaled by {cfg.steps_scale} -> "
          f"{cfg.pgd_steps_scaled}; attack strength (eps, PGD step size) ramped linearly from 0 over the first "
          f"{cfg.eps_warmup:.0%} of each phase (eps_warmup; the paper's recipe is eps_warmup 0). SGD lr {cfg.lr}, "
          f"batch {cfg.batch_size}, {cfg.schedule} schedule, seed {cfg.seed}. A CPU-sized demo: the real model has "
          f"9 experts of width 64.", "",
          f"White-box evaluation on {report['demo']['eval']['images']} held-out images: FGSM eps 8/255; "
          f"PGD-{pgd_steps} eps 8/255, alpha 2/255, random start. Experts are attacked alone; the mixture end to end.",
          "", report["table"], "",
          f"- every adversarially trained expert more robust under PGD-{pgd_steps} than the clean expert: "
          f"{check.get('adversarial_experts_beat_clean_expert')}",
          f"- final mixture more robust under PGD-{pgd_steps} than the clean expert: "
          f"{check.get('mixture_beats_clean_expert')}",
          f"- mixture sanity checks passed: {report['mixture']['sanity']} (details: mixture_report.md)", ""]
    md += [f"- GATE WARNING: {w}" for w in report["mixture"].get("gate_warnings") or []]
    md += ["", f"Wall time {report['demo']['wall_time_s']:.1f} s (phase 1 {t['phase1']:.1f} s, expert eval "
           f"{t['eval_experts']:.1f} s, phase 2 {t['phase2']:.1f} s, mixture eval {t['eval_mixture']:.1f} s).", "",
           "## Hardware and versions", ""]
    md += [f"- {k}: {v}" for k, v in report["environment"].items()]
    return "\n".join(md) + "\n"
