"""Command-line interface: ``fastmoe-adv`` / ``python -m fastmoe_adv``: argument parsing and thin
commands over the library (demo.py, train/, evaluate/).

Errors a user can fix (bad values, missing or malformed files, an occupied output folder, an
unsafe checkpoint, a full disk) print one line and exit with status 2; a diverged run exits
with 3; a run stopped by SIGTERM / Ctrl-C writes a checkpoint and exits with 128 + the signal
number. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import time
import typing
from pathlib import Path

from .constants import DEFAULT_ALPHA, DEFAULT_EPS
from .errors import TrainingDiverged, UserError

__all__ = ["main", "build_parser"]

PROG = "fastmoe-adv"


class CLIError(UserError):
    """A user-facing error raised by the CLI itself: one line, exit status 2."""


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


_FLAG_TYPES = {"roles": _csv(str, "roles"), "fgsm_eps_set": _csv(float, "fgsm_eps_set"),
               "pgd_steps_set": _csv(int, "pgd_steps_set"), "train_size": _optional_int, "data_dir": str}


def _add_config_flags(parser):
    """One flag per TrainConfig field (``--batch-size``, ``--pgd-steps-set 10,20``, ``--bf16`` /
    ``--no-bf16``), its help from the field's metadata; an absent flag keeps the default."""
    from .train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training configuration (TrainConfig fields)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("device", "seed"):   # common flags, added by _add_common
            continue
        shown = list(f.default) if isinstance(f.default, tuple) else f.default
        shown = f"{shown:.6g}" if isinstance(shown, float) else repr(shown)
        kwargs = dict(dest=f.name, default=None, help=f"{f.metadata['help']}; default {shown}")
        if f.name in _FLAG_TYPES:
            kwargs["type"] = _FLAG_TYPES[f.name]
        elif hints[f.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = hints[f.name] if hints[f.name] in (int, float) else str
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _add_common(parser, out_default):
    parser.add_argument("--out", default=out_default, help="output folder (default " + (
        out_default or "the checkpoint's folder / eval_<checkpoint name>") + ")")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random stream (default 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's "
                        "choice; 1 is often fastest for tiny models on a busy machine)")


def _add_recipe_flag(parser):
    from .recipes import RECIPES
    parser.add_argument("--recipe", default="paper", choices=tuple(RECIPES), help="named defaults under the "
                        "explicit flags: paper (the paper's recipe, default) or fast (nine width-64 experts on "
                        "CIFAR-10 within minutes on one H100; see fastmoe_adv/recipes.py)")


def _add_run_flags(parser):
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (ends where an "
                        "uninterrupted run would), or keep a finished phase")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted phase in OUT "
                        "(without it, OUT's results are never replaced)")


def _add_eval_parser(sub):
    e = sub.add_parser("eval", help="white-box robustness of a checkpoint")
    _add_common(e, None)
    e.add_argument("--checkpoint", required=True, help="a .pt written by pretrain / train / demo")
    e.add_argument("--dataset", default=None, help="cifar10 | svhn | synthetic | npz (default: the checkpoint's)")
    e.add_argument("--data-dir", default=None, help="dataset root (or the .npz file); default: the checkpoint's")
    e.add_argument("--download", action="store_true", help="fetch the dataset files if missing")
    e.add_argument("--split", default="test", choices=("test", "holdout"), help="test (default) or the "
                   "training run's holdout (validation; --holdout defaults to the checkpoint's)")
    e.add_argument("--holdout", type=int, default=None, help="holdout size for --split holdout")
    e.add_argument("--limit", type=int, default=1000, help="images evaluated (default 1000; 0: all)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--eps", type=float, default=DEFAULT_EPS, help="FGSM / PGD eps (default 8/255)")
    e.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="PGD step size (default 2/255)")
    e.add_argument("--pgd-steps", type=int, default=20, help="PGD steps (default 20)")
    e.add_argument("--restarts", type=int, default=1, help="PGD restarts (default 1)")
    e.add_argument("--curve-steps", type=int, default=10, help="PGD steps of the eps curve (default 10)")
    e.add_argument("--no-curve", dest="curve", action="store_false", help="skip the accuracy-versus-eps curve")
    e.add_argument("--no-sanity", dest="sanity", action="store_false", help="skip the gradient-masking checks")
    e.add_argument("--no-gate", dest="gate", action="store_false", help="skip the gate diagnostics")
    e.add_argument("--preset", default="auto", choices=("auto", "none", "quick", "standard", "full"),
                   help="AutoAttack-grade sequence run on every image, the number to report: quick (APGD-CE + "
                        "APGD-T, 20 it.), standard (APGD-CE, APGD-T, Square: AutoAttack's), full (standard + the "
                        "mixture-adaptive APGD); auto = standard on CUDA, quick on CPU (default)")
    e.add_argument("--experts", action="store_true", help="also evaluate every expert alone")
    e.add_argument("--backend", default="auto", help="auto | triton | torch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Soft mixture of ResNet-18 experts for adversarial "
                                "robustness (Divided We Fall): training and evaluation.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    d = sub.add_parser("demo", help="both phases on synthetic data + robustness table (a few minutes on CPU)")
    _add_common(d, "runs/demo")
    d.add_argument("--quick", action="store_true", help="a much smaller demo (seconds; used by the tests)")
    _add_run_flags(d)
    d.set_defaults(demo_threads=1)
    for name, help_text in (("pretrain", "phase 1: expert pre-training, each expert on its own stream"),
                            ("train", "phase 2: joint randomized adversarial training of experts and gate")):
        s = sub.add_parser(name, help=help_text)
        _add_common(s, "runs/fastmoe")
        _add_run_flags(s)
        _add_recipe_flag(s)
        if name == "train":
            s.add_argument("--init", default=None, help="phase-1 checkpoint to start from (default OUT/phase1.pt); "
                           "the architecture flags default to its values")
        _add_config_flags(s)
    _add_eval_parser(sub)
    return p


# ============================================================================ configuration
_INIT_FIELDS = ("width", "num_experts", "roles", "gate_hidden", "holdout")   # must agree with the init checkpoint
_INIT_DEFAULTS = ("dataset", "data_dir", "train_size")                       # taken from it unless given


def _config_from_args(args):
    from .train import TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    given["device"], given["seed"] = args.device, args.seed
    if args.command == "train":
        given = _with_init_architecture(args, given)
    from .recipes import recipe
    return TrainConfig(**{**recipe(getattr(args, "recipe", "paper")), **given})


def _with_init_architecture(args, given: dict) -> dict:
    """``train``: the architecture (and data) of the phase-1 checkpoint unless restated; a restated
    value that differs is refused, naming the fields."""
    from .checkpoint import load_checkpoint

    path = Path(args.init) if args.init else Path(args.out) / "phase1.pt"
    if not path.is_file():
        return given                  # train() says the init checkpoint is missing
    payload = load_checkpoint(path, map_location="cpu")
    saved = dict(payload.get("train_config") or {}) if isinstance(payload, dict) else {}
    model_cfg = payload.get("model_config") if isinstance(payload, dict) else None
    if isinstance(model_cfg, dict):
        saved.update({k: model_cfg[k] for k in ("width", "num_experts", "roles", "gate_hidden") if k in model_cfg})
    if isinstance(saved.get("roles"), list):
        saved["roles"] = tuple(saved["roles"])
    conflicts = [f"--{k.replace('_', '-')} {given[k]!r} (checkpoint: {saved[k]!r})" for k in _INIT_FIELDS
                 if k in given and k in saved and given[k] != saved[k]]
    if conflicts:
        raise CLIError(f"train: flags conflict with the init checkpoint {path}: {'; '.join(conflicts)} (leave them "
                       "out to take the checkpoint's values)")
    return {**{k: saved[k] for k in _INIT_FIELDS + _INIT_DEFAULTS if k in saved}, **given}


# ============================================================================ commands
def _cmd_phase(args):
    from . import train as training
    from .train.report import write_phase_report

    cfg = _config_from_args(args)
    out, t = Path(args.out), time.perf_counter()
    kwargs = dict(resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    if args.command == "pretrain":
        summary, phase = training.pretrain(cfg, out, **kwargs), 1
    else:
        summary, phase = training.train(cfg, out, init=args.init, **kwargs), 2
    if summary.get("rank", 0) != 0:
        return 0    # under torchrun only rank 0 reports
    write_phase_report(summary, out, f"phase{phase}", time.perf_counter() - t)
    print(f"phase {phase} done: {summary['checkpoint']} ({summary.get('train_time_s', 0):.1f} s training)")
    return 0


def _check_eval_args(args):
    for name, v, lo in (("--limit", args.limit, 0), ("--batch-size", args.batch_size, 1),
                        ("--pgd-steps", args.pgd_steps, 0), ("--restarts", args.restarts, 1),
                        ("--curve-steps", args.curve_steps, 1)):
        if v < lo:
            raise CLIError(f"{name}: expected an int >= {lo}, got {v}")
    if not 0 <= args.eps <= 1 or not 0 <= args.alpha <= 1:
        raise CLIError(f"--eps/--alpha: expected values in [0, 1] (pixel scale), got {args.eps}, {args.alpha}")


def _eval_data(args, payload, model):
    from . import data
    from .errors import user_input

    saved = payload.get("train_config") or {}
    dataset = args.dataset or saved.get("dataset")
    if not dataset:
        raise CLIError("--dataset: the checkpoint does not name its dataset; pass --dataset")
    if dataset not in data.DATASETS:
        raise CLIError(f"--dataset: expected one of {data.DATASETS}, got {dataset!r}")
    root = args.data_dir or (saved.get("data_dir") if dataset == saved.get("dataset") else None)
    holdout = args.holdout if args.holdout is not None else int(saved.get("holdout") or 0)
    with user_input(f"dataset {dataset!r}"):
        info = data.dataset_info(dataset, root)
        if int(info["num_classes"]) != model.num_classes:
            raise CLIError(f"--dataset: {dataset} has {info['num_classes']} classes, the checkpoint's model "
                           f"{model.num_classes}")
        images, labels = data.load_dataset(dataset, root=root, split=args.split, download=args.download,
                                           seed=args.seed, size=args.limit or None, holdout=holdout)
    return images, labels, {"dataset": dataset, "split": args.split, "holdout": holdout, "root": root}


def _cmd_eval(args):
    from . import evaluate as ev
    from .checkpoint import load_checkpoint
    from .demo import accuracy_table, role_rows
    from .distributed import resolve_device
    from .reporting import fmt_eps
    from .train import model_from_payload

    path = Path(args.checkpoint)
    if not path.exists():
        raise CLIError(f"checkpoint not found: {path}")
    _check_eval_args(args)
    device = resolve_device(args.device)
    payload = load_checkpoint(path, map_location="cpu")
    model = model_from_payload(payload, str(path), map_location=device, backend=args.backend).eval()
    images, labels, data_info = _eval_data(args, payload, model)
    out = Path(args.out) if args.out else path.parent / f"eval_{path.stem}"
    specs = [ev.AttackSpec("clean", "clean"), ev.AttackSpec("fgsm", "fgsm", eps=args.eps)]
    if args.pgd_steps:
        specs.append(ev.AttackSpec(f"pgd{args.pgd_steps}", "pgd", eps=args.eps, alpha=args.alpha,
                                   steps=args.pgd_steps, restarts=args.restarts))
    report = ev.robustness(model, images, labels, attacks=specs, batch_size=args.batch_size, device=device,
                           eps_curve=ev.DEFAULT_EPS_CURVE if args.curve else (), curve_steps=args.curve_steps,
                           seed=args.seed, progress=args.progress, sanity=args.sanity, gate=args.gate,
                           preset=_preset(args.preset, device))
    if args.experts:
        report["experts"] = ev.expert_robustness(model, images, labels, fgsm_eps=args.eps, pgd_eps=args.eps,
                                                 pgd_alpha=args.alpha, pgd_steps=args.pgd_steps,
                                                 batch_size=args.batch_size, seed=args.seed)
        report["experts"]["roles"] = list(model.roles)
    report["checkpoint"] = {"path": str(path), "phase": payload.get("phase"), "done": payload.get("done"),
                            "progress": payload.get("progress"), "train_config": payload.get("train_config")}
    report["data"].update(data_info)
    acc = [report["attacks"][s.name]["accuracy"] for s in specs]
    rows = [("mixture", *acc, *([None] * (3 - len(acc))))]
    if args.experts:
        rows = role_rows(model.roles, report["experts"]) + rows
    table = accuracy_table(rows, f"PGD-{args.pgd_steps}", f"FGSM {fmt_eps(args.eps)}")
    from .evaluate.figures import evaluation_figures, expert_curves
    curve_eps = [p["eps"] for p in report["curve"]["points"]]
    experts_curve = expert_curves(model, images, labels, curve_eps, args.curve_steps, args.batch_size, args.seed) \
        if args.experts and curve_eps else None
    figures = evaluation_figures(report, out, experts_curve)
    json_path, md_path = ev.write_report(report, out, name="eval",
                                         extra_sections=[_eval_header(report, table), figures])
    print(table)
    if report.get("preset"):
        pre = report["preset"]
        print(f"{pre['name']} preset (the number to report): {100 * pre['robust_accuracy']:.1f}% robust "
              f"[{100 * pre['ci95'][0]:.1f}, {100 * pre['ci95'][1]:.1f}]")
    if report.get("pgd_gap"):
        print(report["pgd_gap"]["statement"])
    if report["sanity"].get("all_passed") is False:
        print(f"WARNING: sanity checks failed: {report['sanity']['failed']} (see {md_path})")
    for warning in (report.get("gate") or {}).get("warnings", []):
        print(f"WARNING (gate): {warning}")
    print(f"report: {json_path}, {md_path}")
    return 0


def _preset(name, device):
    if name == "none":
        return None
    return ("standard" if device.type == "cuda" else "quick") if name == "auto" else name


def _eval_header(report, table) -> list:
    ck, d = report["checkpoint"], report["data"]
    lines = ["## Checkpoint and data", "", f"- checkpoint: {ck['path']} (phase {ck['phase']}, done {ck['done']})",
             f"- data: {d['dataset']} {d['split']} split ({d['images']} images"
             + (f", holdout {d['holdout']}" if d["split"] == "holdout" else "") + ")"]
    if ck.get("train_config"):
        cfg = ck["train_config"]
        lines.append("- training config: " + ", ".join(f"{k}={cfg.get(k)}" for k in (
            "width", "num_experts", "pretrain_epochs", "train_epochs", "lr", "steps_scale", "seed") if k in cfg))
    return lines + ["", "## Mixture and experts", "", table]


def _cmd_demo(args):
    from .demo import run_demo

    report = run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device, resume=args.resume,
                      overwrite=args.overwrite, progress=args.progress)
    print()
    print(report["table"])
    print()
    print(f"wall time {report['demo']['wall_time_s']:.1f} s; report: {Path(args.out) / 'report.md'}, "
          f"{Path(args.out) / 'report.json'}; checkpoints: {report['checkpoints']['phase1']}, "
          f"{report['checkpoints']['phase2']}")
    return 0


_COMMANDS = {"demo": _cmd_demo, "pretrain": _cmd_phase, "train": _cmd_phase, "eval": _cmd_eval}
# OS errors that are the user's environment, not a bug: a full disk, a read-only or missing folder.
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                errno.EDQUOT, errno.EEXIST}


def _one_line(exc) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or msg}{where}"
    return msg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .train import TrainingInterrupted

    try:
        threads = args.threads if args.threads is not None else getattr(args, "demo_threads", None)
        if threads is not None:
            # The demo's models are tiny: one thread is as fast as two, and immune to the
            # oversubscription slowdown (10-100x measured) when other processes share the cores.
            if threads < 1:
                raise CLIError(f"--threads: expected an int >= 1, got {threads}")
            import torch
            torch.set_num_threads(threads)
        return _COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS and not isinstance(exc, FileNotFoundError):
            raise
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
