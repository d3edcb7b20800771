"""Command-line interface: ``fastmoe-adv`` / ``python -m fastmoe_adv``.

Subcommands:
  demo       both phases on the embedded synthetic data at a tiny width, then the robustness of
             the phase-1 experts (each alone) and of the final mixture; a few minutes on a CPU.
  pretrain   phase 1: every expert on its own stream, per its role (clean / FGSM / PGD).
  train      phase 2: experts and gate jointly, randomized adversarial training.
  eval       white-box robustness of a checkpoint (clean, FGSM, PGD, eps curve, sanity checks).

Errors a user can fix (missing dataset files or checkpoint, bad values, an unsafe checkpoint)
print one line and exit with status 2; a training run stopped by SIGTERM / Ctrl-C writes a
checkpoint and exits with 128 + the signal number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from .reporting import atomic_write_text, hardware_info, write_json

__all__ = ["main", "build_parser", "DEMO_CONFIG", "QUICK_DEMO_CONFIG"]

PROG = "fastmoe-adv"

# The demo: the embedded synthetic data, 3 experts (one per role: clean, FGSM, PGD) of width 8,
# PGD step counts scaled by 0.1 ({10..50} -> {1..5}), attack strength ramped in over the first
# half of each phase (eps_warmup; without it these tiny experts stay at chance under attack in a
# CPU-minutes budget). Measured on 2 CPU cores: about 1.5 minutes (see the README / report).
DEMO_CONFIG = dict(dataset="synthetic", train_size=2048, width=8, num_experts=3, batch_size=16, pretrain_epochs=4,
                   train_epochs=1, lr=0.01, nesterov=True, schedule="onecycle", steps_scale=0.1, eps_warmup=0.5,
                   eval_every=-1, eval_limit=256, checkpoint_every=128, log_every=16, backend="auto",
                   executor="auto")
DEMO_EVAL = dict(images=256, pgd_steps=20, batch_size=64, sanity=True)
# --quick: the same pipeline, smaller (for the test suite; its numbers mean nothing).
QUICK_DEMO_CONFIG = dict(DEMO_CONFIG, train_size=256, width=4, batch_size=32, pretrain_epochs=1, train_epochs=1,
                         checkpoint_every=4, log_every=2)
QUICK_DEMO_EVAL = dict(images=64, pgd_steps=2, batch_size=64, sanity=False)


class CLIError(Exception):
    """A user-facing error: one line, exit status 2."""


# ============================================================================ arguments
def _csv(convert, name):
    def parse(text):
        try:
            values = tuple(convert(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a comma-separated list, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name}: expected a non-empty comma-separated list, got {text!r}")
        return values
    return parse


def _optional_int(text):
    return None if text.lower() in ("none", "all", "") else int(text)


def _field_comments() -> dict:
    """TrainConfig's per-field comments (units and meaning), the single source of the flags' help."""
    import inspect
    import re

    from .train import TrainConfig

    comments, last = {}, None
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s{4}(\w+): [^=]+=[^#]*#\s*(.*)$", line)
        if m:
            last = m.group(1)
            comments[last] = m.group(2).strip()
        elif last and re.match(r"^\s+#\s*(.*)$", line) and not re.match(r"^\s{4}#\s--", line):
            comments[last] += " " + re.match(r"^\s+#\s*(.*)$", line).group(1).strip()
        else:
            last = None
    return comments


def _add_config_flags(parser):
    """One flag per TrainConfig field (``--batch-size``, ``--pgd-steps-set 10,20``, ``--bf16`` /
    ``--no-bf16``); an absent flag keeps the TrainConfig default."""
    from .train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    notes = _field_comments()
    group = parser.add_argument_group("training configuration (TrainConfig fields)")
    skip = {"device", "seed"}   # common flags, added by _add_common
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = list(default) if isinstance(default, tuple) else default
        shown = f"{shown:.6g}" if isinstance(shown, float) else repr(shown)
        help_default = (notes[f.name] + "; " if f.name in notes else "") + f"default {shown}"
        kwargs = dict(dest=f.name, default=None)
        if f.name == "roles":
            group.add_argument(flag, type=_csv(str, f.name), help="comma-separated roles per expert "
                               "(clean,fgsm,pgd); default 1 clean, then FGSM, then PGD", **kwargs)
        elif f.name == "fgsm_eps_set":
            group.add_argument(flag, type=_csv(float, f.name), help=f"comma-separated; {help_default}", **kwargs)
        elif f.name == "pgd_steps_set":
            group.add_argument(flag, type=_csv(int, f.name), help=f"comma-separated; {help_default}", **kwargs)
        elif f.name == "train_size":
            group.add_argument(flag, type=_optional_int, help=help_default, **kwargs)
        elif f.name == "data_dir":
            group.add_argument(flag, type=str, help=help_default, **kwargs)
        elif hints[f.name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_default, **kwargs)
        elif hints[f.name] is int:
            group.add_argument(flag, type=int, help=help_default, **kwargs)
        elif hints[f.name] is float:
            group.add_argument(flag, type=float, help=help_default, **kwargs)
        else:
            group.add_argument(flag, type=str, help=help_default, **kwargs)


def _add_common(parser, out_default):
    parser.add_argument("--out", default=out_default, help="output folder (default " + (
        out_default or "the checkpoint's folder / eval_<checkpoint name>") + ")")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random stream (default 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's "
                        "choice; 1 is often fastest for tiny models on a busy machine)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Soft mixture of ResNet-18 experts for adversarial "
                                "robustness (Divided We Fall): training and evaluation.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="both phases on synthetic data + robustness table (a few minutes on CPU)")
    _add_common(d, "runs/demo")
    d.add_argument("--quick", action="store_true", help="a much smaller demo (seconds; used by the tests)")
    d.set_defaults(threads=None, demo_threads=1)
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo from OUT/last.pt")

    for name, help_text in (("pretrain", "phase 1: expert pre-training, each expert on its own stream"),
                            ("train", "phase 2: joint randomized adversarial training of experts and gate")):
        s = sub.add_parser(name, help=help_text)
        _add_common(s, "runs/fastmoe")
        s.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (ends where an "
                       "uninterrupted run would)")
        if name == "train":
            s.add_argument("--init", default=None, help="phase-1 checkpoint to start from (default OUT/phase1.pt)")
        _add_config_flags(s)

    e = sub.add_parser("eval", help="white-box robustness of a checkpoint")
    _add_common(e, None)
    e.add_argument("--checkpoint", required=True, help="a .pt written by pretrain / train / demo")
    e.add_argument("--dataset", default=None, help="cifar10 | svhn | synthetic (default: the checkpoint's)")
    e.add_argument("--data-dir", default=None, help="dataset root")
    e.add_argument("--download", action="store_true", help="fetch the dataset files if missing")
    e.add_argument("--limit", type=int, default=1000, help="test images evaluated (default 1000; 0: all)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--eps", type=float, default=8 / 255, help="FGSM / PGD eps (default 8/255)")
    e.add_argument("--alpha", type=float, default=2 / 255, help="PGD step size (default 2/255)")
    e.add_argument("--pgd-steps", type=int, default=20, help="PGD steps (default 20)")
    e.add_argument("--restarts", type=int, default=1, help="PGD restarts (default 1)")
    e.add_argument("--curve-steps", type=int, default=10, help="PGD steps of the eps curve (default 10)")
    e.add_argument("--no-curve", dest="curve", action="store_false", help="skip the accuracy-versus-eps curve")
    e.add_argument("--no-sanity", dest="sanity", action="store_false", help="skip the gradient-masking checks")
    e.add_argument("--experts", action="store_true", help="also evaluate every expert alone")
    e.add_argument("--backend", default="auto", help="auto | triton | torch")
    return p


def _config_from_args(args):
    from .train import TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    given["device"], given["seed"] = args.device, args.seed
    return TrainConfig(**given)


# ============================================================================ reports
def _phase_report(summary: dict, out: Path, name: str, wall_s: float):
    from .train import environment_info

    last_eval = next((h for h in reversed(summary.get("history", [])) if h.get("event") == "eval"), None)
    rep = {k: v for k, v in summary.items() if k not in ("model", "history")}
    rep.update(wall_time_s=wall_s, last_eval=last_eval, versions=environment_info(summary.get("device")),
               hardware=hardware_info(summary.get("device") or "cpu"))
    if rep.get("train_time_s") and rep.get("images_seen"):
        rep["train_images_per_s"] = rep["images_seen"] / rep["train_time_s"]
    write_json(out / f"{name}_report.json", rep)
    lines = [f"# {name} report", "", f"- checkpoint: {rep['checkpoint']}",
             f"- steps: {rep.get('global_step')}/{rep.get('total_steps')}, images seen: {rep.get('images_seen')}",
             f"- training time (excluding evaluation): {rep.get('train_time_s', 0):.1f} s; wall: {wall_s:.1f} s",
             f"- device: {rep.get('device')}, world size {rep.get('world_size')}",
             f"- PGD step counts: {summary['config']['pgd_steps_set']} x steps_scale "
             f"{summary['config']['steps_scale']}"]
    if last_eval:
        lines.append("- last held-out evaluation: " + ", ".join(f"{k}={v}" for k, v in last_eval.items()))
    lines += ["", "## Config", "", "```json", json.dumps(summary["config"], indent=2), "```", "",
              "## Versions and hardware", ""]
    lines += [f"- {k}: {v}" for k, v in {**rep["versions"], **rep["hardware"]}.items()]
    atomic_write_text(out / f"{name}_report.md", "\n".join(lines) + "\n")


def _pct(v):
    return "-" if v is None else f"{100 * v:5.1f}%"


def _role_rows(roles, expert_acc: dict):
    """Per-expert and per-role mean rows: (label, clean, fgsm, pgd)."""
    rows = []
    for role in ("clean", "fgsm", "pgd"):
        idx = [i for i, r in enumerate(roles) if r == role]
        if not idx:
            continue
        mean = {k: sum(expert_acc[k][i] for i in idx) / len(idx) for k in ("clean", "fgsm", "pgd")
                if k in expert_acc}
        label = f"{role} expert" + ("s (mean of %d)" % len(idx) if len(idx) > 1 else f" (e{idx[0]})")
        rows.append((label, mean.get("clean"), mean.get("fgsm"), mean.get("pgd")))
    return rows


def _eps_label(eps):
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def _table(rows, pgd_label, fgsm_label="FGSM 8/255"):
    head = f"| {'model':<28} | clean  | {fgsm_label:<10} | {pgd_label:<10} |"
    lines = [head, "|" + "-" * 30 + "|--------|------------|------------|"]
    for label, c, f, p in rows:
        lines.append(f"| {label:<28} | {_pct(c)} |   {_pct(f)}   |   {_pct(p)}   |")
    return "\n".join(lines)


# ============================================================================ commands
def _cmd_pretrain(args):
    from . import train as tr

    cfg = _config_from_args(args)
    out = Path(args.out)
    t = time.perf_counter()
    summary = tr.pretrain(cfg, out, resume=args.resume, progress=args.progress)
    if summary.get("rank", 0) != 0:
        return 0    # under torchrun only rank 0 reports
    _phase_report(summary, out, "phase1", time.perf_counter() - t)
    print(f"phase 1 done: {summary['checkpoint']} ({summary.get('train_time_s', 0):.1f} s training)")
    return 0


def _cmd_train(args):
    from . import train as tr

    cfg = _config_from_args(args)
    out = Path(args.out)
    t = time.perf_counter()
    summary = tr.train(cfg, out, init=args.init, resume=args.resume, progress=args.progress)
    if summary.get("rank", 0) != 0:
        return 0    # under torchrun only rank 0 reports
    _phase_report(summary, out, "phase2", time.perf_counter() - t)
    print(f"phase 2 done: {summary['checkpoint']} ({summary.get('train_time_s', 0):.1f} s training)")
    return 0


def _cmd_eval(args):
    from . import checkpoint as ckpt
    from . import data as data_mod
    from . import evaluate as ev
    from . import train as tr
    from .distributed import resolve_device

    path = Path(args.checkpoint)
    if not path.exists():
        raise CLIError(f"checkpoint not found: {path}")
    for name, v, lo in (("--limit", args.limit, 0), ("--batch-size", args.batch_size, 1),
                        ("--pgd-steps", args.pgd_steps, 0), ("--restarts", args.restarts, 1),
                        ("--curve-steps", args.curve_steps, 1)):
        if v < lo:
            raise CLIError(f"{name}: expected an int >= {lo}, got {v}")
    if not 0 <= args.eps <= 1 or not 0 <= args.alpha <= 1:
        raise CLIError(f"--eps/--alpha: expected values in [0, 1] (pixel scale), got {args.eps}, {args.alpha}")
    device = resolve_device(args.device)
    payload = ckpt.load_checkpoint(path, map_location="cpu")
    model = tr.model_from_payload(payload, str(path), map_location=device, backend=args.backend).eval()
    dataset = args.dataset or (payload.get("train_config") or {}).get("dataset")
    if not dataset:
        raise CLIError("--dataset: the checkpoint does not name its dataset; pass --dataset")
    info = data_mod.DATASET_INFO.get(dataset)
    if info is None:
        raise CLIError(f"--dataset: expected one of {tuple(data_mod.DATASET_INFO)}, got {dataset!r}")
    if int(info["num_classes"]) != model.num_classes:
        raise CLIError(f"--dataset: {dataset} has {info['num_classes']} classes, the checkpoint's model "
                       f"{model.num_classes}")
    images, labels = data_mod.load_dataset(dataset, root=args.data_dir, split="test", download=args.download,
                                           seed=args.seed, size=args.limit or None)
    out = Path(args.out) if args.out else path.parent / f"eval_{path.stem}"
    attacks = [ev.AttackSpec("clean", "clean"), ev.AttackSpec("fgsm", "fgsm", eps=args.eps)]
    if args.pgd_steps:
        attacks.append(ev.AttackSpec(f"pgd{args.pgd_steps}", "pgd", eps=args.eps, alpha=args.alpha,
                                     steps=args.pgd_steps, restarts=args.restarts))
    t = time.perf_counter()
    report = ev.robustness(model, images, labels, attacks=attacks, batch_size=args.batch_size, device=device,
                           eps_curve=ev.DEFAULT_EPS_CURVE if args.curve else (), curve_steps=args.curve_steps,
                           seed=args.seed, progress=args.progress, sanity=args.sanity)
    if args.experts:
        report["experts"] = tr.expert_robustness(model, images, labels, fgsm_eps=args.eps, pgd_eps=args.eps,
                                                 pgd_alpha=args.alpha, pgd_steps=args.pgd_steps,
                                                 batch_size=args.batch_size, seed=args.seed)
        report["experts"]["roles"] = list(model.roles)
    report["checkpoint"] = {"path": str(path), "phase": payload.get("phase"), "done": payload.get("done"),
                            "progress": payload.get("progress")}
    report["wall_time_s"] = time.perf_counter() - t
    json_path, md_path = ev.write_report(report, out, name="eval")
    acc = [report["attacks"][a.name]["accuracy"] for a in attacks]
    rows = [("mixture", *acc, *([None] * (3 - len(acc))))]
    if args.experts:
        rows = _role_rows(model.roles, report["experts"]) + rows
    print(_table(rows, f"PGD-{args.pgd_steps}", f"FGSM {_eps_label(args.eps)}"))
    if report["sanity"].get("all_passed") is False:
        print(f"WARNING: sanity checks failed: {report['sanity']['failed']} (see {md_path})")
    print(f"report: {json_path}, {md_path}")
    return 0


def _cmd_demo(args):
    from . import data as data_mod
    from . import evaluate as ev
    from . import train as tr

    t_start = time.perf_counter()
    quick = args.quick
    base = QUICK_DEMO_CONFIG if quick else DEMO_CONFIG
    ev_cfg = QUICK_DEMO_EVAL if quick else DEMO_EVAL
    cfg = tr.TrainConfig(**base, seed=args.seed, device=args.device)
    out = Path(args.out)
    print(f"demo: {cfg.num_experts} experts (roles {cfg.expert_roles}), width {cfg.width}, synthetic data "
          f"({cfg.train_size} train images), PGD steps {list(cfg.pgd_steps_set)} x steps_scale {cfg.steps_scale} "
          f"= {cfg.pgd_steps_scaled}", flush=True)
    t = time.perf_counter()
    s1 = tr.pretrain(cfg, out, resume=args.resume, progress=args.progress)
    t_phase1 = time.perf_counter() - t
    images, labels = data_mod.load_dataset("synthetic", split="test", seed=cfg.seed, size=ev_cfg["images"])
    pgd_steps = ev_cfg["pgd_steps"]
    t = time.perf_counter()
    experts = tr.expert_robustness(s1["model"], images, labels, fgsm_eps=8 / 255, pgd_eps=8 / 255,
                                   pgd_alpha=2 / 255, pgd_steps=pgd_steps, batch_size=ev_cfg["batch_size"],
                                   seed=cfg.seed)
    t_eval1 = time.perf_counter() - t
    t = time.perf_counter()
    s2 = tr.train(cfg, out, resume=args.resume, progress=args.progress)
    t_phase2 = time.perf_counter() - t
    t = time.perf_counter()
    attacks = [ev.AttackSpec("clean", "clean"), ev.AttackSpec("fgsm", "fgsm", eps=8 / 255),
               ev.AttackSpec(f"pgd{pgd_steps}", "pgd", eps=8 / 255, alpha=2 / 255, steps=pgd_steps)]
    mixture = ev.robustness(s2["model"], images, labels, attacks=attacks, batch_size=ev_cfg["batch_size"],
                            eps_curve=(), seed=cfg.seed, progress=args.progress, sanity=ev_cfg["sanity"])
    t_eval2 = time.perf_counter() - t
    ev.write_report(mixture, out, name="mixture_report")
    acc = {a.name: mixture["attacks"][a.name]["accuracy"] for a in attacks}
    rows = _role_rows(s1["model"].roles, experts)
    rows.append(("final mixture (phase 2)", acc["clean"], acc["fgsm"], acc[f"pgd{pgd_steps}"]))
    table = _table(rows, f"PGD-{pgd_steps}")
    wall = time.perf_counter() - t_start
    roles = list(s1["model"].roles)
    pgd_acc = experts["pgd"]
    by_role = {r: [pgd_acc[i] for i, x in enumerate(roles) if x == r] for r in ("clean", "fgsm", "pgd")}
    clean_pgd = max(by_role["clean"]) if by_role["clean"] else None
    robust_check = {f"pgd_accuracy_{r}_experts": v for r, v in by_role.items() if v}
    robust_check["pgd_accuracy_mixture"] = acc[f"pgd{pgd_steps}"]
    if clean_pgd is not None:
        adversarial = by_role["fgsm"] + by_role["pgd"]
        robust_check["adversarial_experts_beat_clean_expert"] = bool(adversarial) and min(adversarial) > clean_pgd
        robust_check["mixture_beats_clean_expert"] = acc[f"pgd{pgd_steps}"] > clean_pgd
    report = {
        "demo": {"quick": quick, "wall_time_s": wall,
                 "timings_s": {"phase1": t_phase1, "phase1_training": s1.get("train_time_s"),
                               "eval_experts": t_eval1, "phase2": t_phase2,
                               "phase2_training": s2.get("train_time_s"), "eval_mixture": t_eval2},
                 "eval": {"images": len(labels), "fgsm_eps": 8 / 255, "pgd_eps": 8 / 255, "pgd_alpha": 2 / 255,
                          "pgd_steps": pgd_steps, "random_start": True, "white_box": True,
                          "experts": "each expert attacked alone (its own logits)",
                          "mixture": "attacks through the whole mixture (experts + gate)"},
                 "steps_scale_note": f"training PGD step counts scaled by {cfg.steps_scale}: "
                                     f"{list(cfg.pgd_steps_set)} -> {cfg.pgd_steps_scaled}",
                 "robustness_check": robust_check},
        "table": table,
        "experts": {"roles": list(s1["model"].roles), **experts},
        "mixture": {"accuracy": acc, "gate_weights": {k: v.get("gate_weights") for k, v in
                                                      mixture["attacks"].items()},
                    "sanity": mixture["sanity"].get("all_passed"), "report": "mixture_report.md"},
        "config": cfg.to_dict(),
        "checkpoints": {"phase1": s1["checkpoint"], "phase2": s2["checkpoint"], "last": str(out / "last.pt")},
        "versions": tr.environment_info(s2.get("device")),
        "hardware": hardware_info(s2.get("device") or "cpu"),
    }
    write_json(out / "report.json", report)
    md = ["# fastmoe_adv demo", "",
          f"Synthetic data, {cfg.num_experts} experts of width {cfg.width} (roles {cfg.expert_roles}), "
          f"{cfg.pretrain_epochs} pre-training epoch(s) + {cfg.train_epochs} joint epoch(s) on {cfg.train_size} "
          f"images; training PGD step counts {list(cfg.pgd_steps_set)} scaled by {cfg.steps_scale} -> "
          f"{cfg.pgd_steps_scaled}; attack strength (eps, PGD step size) ramped linearly from 0 over the first "
          f"{cfg.eps_warmup:.0%} of each phase (eps_warmup; the paper's recipe is eps_warmup 0). SGD lr {cfg.lr}, "
          f"batch {cfg.batch_size}, {cfg.schedule} schedule, seed {cfg.seed}. A CPU-sized demo: the real model has "
          f"9 experts of width 64.", "",
          f"White-box evaluation on {len(labels)} held-out images: FGSM eps 8/255; PGD-{pgd_steps} eps 8/255, "
          f"alpha 2/255, random start. Experts are attacked alone; the mixture end to end.", "",
          table, "",
          f"- every adversarially trained expert more robust under PGD-{pgd_steps} than the clean expert: "
          f"{robust_check.get('adversarial_experts_beat_clean_expert')}",
          f"- final mixture more robust under PGD-{pgd_steps} than the clean expert: "
          f"{robust_check.get('mixture_beats_clean_expert')}",
          f"- mixture sanity checks passed: {mixture['sanity'].get('all_passed')} (details: mixture_report.md)", "",
          f"Wall time {wall:.1f} s (phase 1 {t_phase1:.1f} s, expert eval {t_eval1:.1f} s, phase 2 {t_phase2:.1f} s, "
          f"mixture eval {t_eval2:.1f} s).", "",
          "## Hardware and versions", ""]
    md += [f"- {k}: {v}" for k, v in {**report["versions"], **report["hardware"]}.items()]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    print()
    print(table)
    print()
    print(f"wall time {wall:.1f} s; report: {out / 'report.md'}, {out / 'report.json'}; "
          f"checkpoints: {s1['checkpoint']}, {s2['checkpoint']}")
    return 0


_COMMANDS = {"demo": _cmd_demo, "pretrain": _cmd_pretrain, "train": _cmd_train, "eval": _cmd_eval}


def _user_errors():
    errors = [CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError]
    try:
        from .checkpoint import UnsafeCheckpointError
        errors.insert(0, UnsafeCheckpointError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train import TrainingInterrupted

    try:
        if args.threads is None and getattr(args, "demo_threads", None):
            # The demo's models are tiny: one thread is as fast as two, and immune to the
            # oversubscription slowdown (10-100x measured) when other processes share the cores.
            args.threads = args.demo_threads
        if args.threads is not None:
            if args.threads < 1:
                raise CLIError(f"--threads: expected an int >= 1, got {args.threads}")
            import torch
            torch.set_num_threads(args.threads)
        return _COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        kind = type(exc).__name__
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else kind
        if kind not in ("CLIError", "ValueError", "FileNotFoundError", "UnsafeCheckpointError"):
            msg = f"{kind}: {msg}"
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
