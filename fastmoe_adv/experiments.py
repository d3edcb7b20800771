"""Divided We Fall next to its baselines at the same training budget, and the gate study: library
functions plus a command line (``python -m fastmoe_adv.experiments baselines|gate-study``). Every arm
is trained by the same code and evaluated on the same held-out training images (clean, PGD-20, a
robustness preset) with 95% Wilson intervals; results go to JSON and Markdown.

Budget matching: one "expert-image pass" is one expert trained on one image for one step (its
attack included). DWF costs ``E * (pretrain_epochs + train_epochs) * N`` of them (phase 1: every
expert passes its own stream once per epoch; phase 2: every image goes through all E experts).
The single PGD-AT model gets the same count: ``E * (pretrain_epochs + train_epochs)`` epochs at
the same batch size, every step a PGD step (so it gets at least DWF's attack compute). The uniform
average costs phase 1 only; gate-only training costs phase 1 plus a phase 2 without expert updates.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import data
from .evaluate import expert_robustness, gate_diagnostics, mixture_robustness, wilson_interval
from .moe import FastSoftMoE
from .reporting import atomic_write_text, environment, write_json
from .train import TrainConfig, pretrain, train

__all__ = ["ARMS", "ARM_LABELS", "CPU_SCALE", "GATE_VARIANTS", "matched_pgd_at_config", "phase2_init",
           "evaluate_arm", "run_baselines", "gate_study", "baselines_markdown", "gate_study_markdown", "write_results",
           "config_for", "subset_npz", "main"]

ARMS = ("pgd_at", "uniform", "gate_only", "dwf")
ARM_LABELS = {"pgd_at": "(a) one PGD-AT ResNet-18", "uniform": "(b) phase-1 experts, uniform gate",
              "gate_only": "(c) experts frozen, gate trained", "dwf": "(d) DWF (experts + gate)"}
# The CPU scale of benchmarks/CIFAR10.md: 3 experts (one per role) of width 8, 4,000 training images,
# PGD step counts scaled by 0.1 ({1..5}), attack strength ramped in over the first half of each phase.
CPU_SCALE = dict(dataset="cifar10", holdout=1000, train_size=4000, width=8, num_experts=3, batch_size=32,
                 pretrain_epochs=3, train_epochs=1, lr=0.05, nesterov=True, schedule="onecycle", steps_scale=0.1,
                 eps_warmup=0.5, eval_every=-1, checkpoint_every=10_000, log_every=50)
# Phase-2 variants of the gate study: what the "soft, flat, fractional" gate allows changing.
GATE_VARIANTS = {
    "paper": {},
    "gate_hidden_64": {"gate_hidden": 64},
    "temperature_2": {"temperature": 2.0},
    "temperature_0.5": {"temperature": 0.5},
    "entropy_0.1": {"gate_entropy_weight": 0.1},
    "balance_1": {"gate_balance_weight": 1.0},
    "mutual_info": {"gate_entropy_weight": -0.1, "gate_balance_weight": 1.0},
    "gate_lr_x10": {"gate_lr_scale": 10.0},
    "pgd_only": {"phase2_fgsm_prob": 0.0},
    "fgsm_only": {"phase2_fgsm_prob": 1.0},
    # FGSM at eps 0 is the clean image: half the phase-2 batches clean, half PGD. The paper's phase 2
    # attacks every batch, so nothing there rewards sending clean inputs to the clean expert.
    "clean_half": {"fgsm_eps_set": (0.0,), "phase2_fgsm_prob": 0.5},
    "phase2_3_epochs": {"train_epochs": 3},      # does the gate drift further with more joint training?
}


# ============================================================================ building blocks
def matched_pgd_at_config(cfg: TrainConfig, batch_scale: int = 1) -> TrainConfig:
    """One PGD-trained ResNet-18 with DWF's expert-image budget (module docstring): E * (P1 + P2)
    epochs at ``batch_scale`` times the batch (1: E times DWF's steps; E: DWF's step count, which a
    GPU runs far faster than E times as many small steps)."""
    epochs = cfg.num_experts * (cfg.pretrain_epochs + cfg.train_epochs)
    return cfg.replace(num_experts=1, roles=("pgd",), pretrain_epochs=epochs, train_epochs=0,
                       batch_size=cfg.batch_size * batch_scale)


def phase2_init(phase1_model: FastSoftMoE, cfg: TrainConfig) -> FastSoftMoE:
    """Phase 2's starting mixture: the phase-1 experts under ``cfg``'s mixing rule, temperature and
    gate width (the phase-1 gate is untrained, so a different width just starts a fresh flat gate)."""
    arch = dict(phase1_model.config(), mix=cfg.mix, temperature=cfg.temperature, gate_hidden=cfg.gate_hidden)
    model = FastSoftMoE(**arch, backend=cfg.backend, executor=cfg.executor)
    model.experts.load_state_dict(phase1_model.experts.state_dict())
    if cfg.gate_hidden == phase1_model.gate_hidden:
        model.gate.load_state_dict(phase1_model.gate.state_dict())
    return model


def _accuracy(p: float, n: int) -> dict:
    correct = int(round(p * n))
    return {"accuracy": correct / max(1, n), "correct": correct, "n": n, "ci95": wilson_interval(correct, n)}


def _gate_summary(model, images, labels, gate_images, seed) -> dict | None:
    if getattr(model, "num_experts", 1) < 2 or not gate_images:
        return None
    g = gate_diagnostics(model, images, labels, limit=gate_images, seed=seed)
    ins = g["inputs"]
    return {"mean_clean": ins["clean"]["mean"], "mean_pgd": ins["pgd"]["mean"],
            "input_dependence_clean": ins["clean"]["input_dependence"],
            "input_dependence_pgd": ins["pgd"]["input_dependence"],
            "normalized_entropy_clean": ins["clean"]["normalized_entropy"], "warnings": g["warnings"],
            "images": ins["clean"]["images"], "pgd_steps": g["attack"]["pgd_steps"]}


def evaluate_arm(model, images, labels, pgd_steps=20, preset="quick", preset_images=None, gate_images=256,
                 batch_size=250, seed=0) -> dict:
    """Clean and PGD-``pgd_steps`` accuracy (eps 8/255, alpha 2/255, random start) of the whole model
    on every image; the preset's per-point worst case on the first ``preset_images`` (None: all;
    ``preset=None``: skipped); for a mixture, its gate (``gate_diagnostics`` on ``gate_images``)."""
    from .presets import run_preset
    t0, n = time.perf_counter(), len(labels)
    r = mixture_robustness(model, images, labels, pgd_steps=pgd_steps, batch_size=batch_size, seed=seed)
    row = {"images": n, "clean": _accuracy(r["clean"], n), "pgd": _accuracy(r["pgd"], n), "pgd_steps": pgd_steps}
    if preset:
        m = n if preset_images is None else min(n, preset_images)
        device = next(model.parameters()).device
        x = images[:m].to(device).float().div_(255) if images.dtype == torch.uint8 else images[:m].to(device)
        res = run_preset(model, x, labels[:m].to(device), preset=preset, seed=seed, batch_size=batch_size)
        row["preset"] = {"name": preset, **_accuracy(float(res.robust.float().mean()) if m else 0.0, m)}
    row["gate"] = _gate_summary(model, images, labels, gate_images, seed)
    row["eval_time_s"] = time.perf_counter() - t0
    return row


def _gate_is_uniform(model: FastSoftMoE, images) -> bool:
    """The phase-1 checkpoint's gate gives every expert exactly 1/E (its last layer starts at zero)."""
    x = images[:64].to(next(model.parameters()).device).float().div_(255)
    with torch.no_grad():
        w = model.eval()(x, return_details=True).gate_weights
    return bool((w - 1.0 / model.num_experts).abs().max() < 1e-6)


def _holdout(cfg: TrainConfig, eval_images: int | None):
    if not cfg.holdout:
        raise ValueError("experiments evaluate on a holdout carved from the training split: expected "
                         f"TrainConfig.holdout > 0, got {cfg.holdout}")
    return data.load_dataset(cfg.dataset, root=cfg.data_dir, split="holdout", holdout=cfg.holdout,
                             seed=cfg.seed, size=eval_images)


def _phase1(cfg, out: Path, progress, log):
    t = time.perf_counter()
    s = pretrain(cfg, out / "phase1", resume=True, progress=progress, log=log)
    return s, time.perf_counter() - t


def _phase2(cfg, out_dir: Path, phase1_model, progress, log):
    t = time.perf_counter()
    s = train(cfg, out_dir, init=phase2_init(phase1_model, cfg), resume=True, progress=progress, log=log)
    return s, time.perf_counter() - t


def _arm_record(summary, wall, passes, evaluation) -> dict:
    return {"train_time_s": summary.get("train_time_s"), "wall_time_s": wall, "expert_image_passes": passes,
            "checkpoint": summary.get("checkpoint"), **evaluation}


# ============================================================================ the two studies
def run_baselines(cfg: TrainConfig, out, arms=ARMS, eval_images=None, pgd_steps=20, preset="quick",
                  preset_images=None, gate_images=256, batch_size=250, pgd_at_batch_scale=1, progress=False,
                  log=print) -> dict:
    """Train (or reuse, from ``out``) phase 1, then each arm of ``arms``; evaluate all on the same
    ``eval_images`` holdout images. Writes nothing itself (``write_results`` does). Returns the
    result dict: ``arms`` (per arm: accuracies with intervals, gate, times, budget), ``experts``
    (each phase-1 expert alone under PGD), ``config``, ``budget``, ``environment``, ``wall_time_s``."""
    t0, out = time.perf_counter(), Path(out)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms: expected some of {ARMS}, got {unknown}")
    x, y = _holdout(cfg, eval_images)
    ev = dict(pgd_steps=pgd_steps, preset=preset, preset_images=preset_images, gate_images=gate_images,
              batch_size=batch_size, seed=cfg.seed)
    E, n_train = cfg.num_experts, None
    s1, wall1 = _phase1(cfg, out, progress, log)
    n_train = s1["images_seen"] // max(1, cfg.pretrain_epochs * E) if cfg.pretrain_epochs else None
    p1 = E * cfg.pretrain_epochs * (n_train or 0)
    result = {"arms": {}, "config": cfg.to_dict(), "eval": {"images": len(y), **ev},
              "phase1": {"train_time_s": s1["train_time_s"], "wall_time_s": wall1, "checkpoint": s1["checkpoint"]}}
    result["experts"] = {"roles": list(s1["model"].roles), **expert_robustness(
        s1["model"], x, y, fgsm_eps=None, pgd_steps=pgd_steps, batch_size=batch_size, seed=cfg.seed)}
    for arm in arms:
        log(f"baselines: {arm}")
        if arm == "uniform":
            model = s1["model"]
            rec = _arm_record(s1, wall1, p1, evaluate_arm(model, x, y, **ev))
            rec["gate_is_uniform"] = _gate_is_uniform(model, x)
        elif arm == "pgd_at":
            s, wall = _phase1(matched_pgd_at_config(cfg, pgd_at_batch_scale), out / "pgd_at", progress, log)
            rec = _arm_record(s, wall, s["images_seen"], evaluate_arm(s["model"], x, y, **ev))
        else:
            arm_cfg = cfg.replace(train_experts=(arm == "dwf"))
            s, wall = _phase2(arm_cfg, out / arm, s1["model"], progress, log)
            rec = _arm_record(s, wall, p1 + E * s["images_seen"], evaluate_arm(s["model"], x, y, **ev))
            rec["phase1_train_time_s"] = s1["train_time_s"]
        result["arms"][arm] = rec
        write_json(out / "baselines.partial.json", result)    # what is done so far survives an interruption
    result["budget"] = (f"expert-image passes: DWF = E*(P1+P2)*N = {E}*({cfg.pretrain_epochs}+{cfg.train_epochs})*"
                        f"{n_train}; PGD-AT: one model, {matched_pgd_at_config(cfg).pretrain_epochs} epochs at batch "
                        f"{cfg.batch_size * pgd_at_batch_scale}; uniform: phase 1 only; gate-only: phase 1 + a phase 2 "
                        "whose expert weights do not move")
    result["environment"] = environment(s1.get("device"))
    result["wall_time_s"] = time.perf_counter() - t0
    return result


def gate_study(cfg: TrainConfig, out, variants=None, eval_images=None, pgd_steps=20, gate_images=256,
               batch_size=250, progress=False, log=print) -> dict:
    """Phase 2 from one shared phase 1 under each variant of ``variants`` (name -> TrainConfig
    changes; default ``GATE_VARIANTS``); every result evaluated clean / PGD-``pgd_steps`` with its
    gate diagnostics (input dependence, per-expert mean weight on clean and PGD inputs)."""
    t0, out = time.perf_counter(), Path(out)
    variants = dict(GATE_VARIANTS if variants is None else variants)
    x, y = _holdout(cfg, eval_images)
    s1, _ = _phase1(cfg, out, progress, log)
    result = {"variants": {}, "config": cfg.to_dict(), "eval": {"images": len(y), "pgd_steps": pgd_steps,
                                                                  "gate_images": gate_images}}
    for name, changes in variants.items():
        log(f"gate study: {name} {changes}")
        v_cfg = cfg.replace(**changes)
        s, wall = _phase2(v_cfg, out / f"gate_{name}", s1["model"], progress, log)
        ev = evaluate_arm(s["model"], x, y, pgd_steps=pgd_steps, preset=None, gate_images=gate_images,
                          batch_size=batch_size, seed=cfg.seed)
        result["variants"][name] = {"changes": changes, "train_time_s": s["train_time_s"], "wall_time_s": wall,
                                    "roles": list(s["model"].roles), **ev}
        write_json(out / "gate_study.partial.json", result)
    result["environment"] = environment(s1.get("device"))
    result["wall_time_s"] = time.perf_counter() - t0
    return result


# ============================================================================ tables
def _pct(a: dict) -> str:
    lo, hi = a["ci95"]
    return f"{a['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]" if lo is not None else "n/a"


def _weights(ws) -> str:
    return " / ".join(f"{w:.3f}" for w in ws)


def baselines_markdown(result: dict) -> str:
    """The side-by-side table (clean / PGD / preset with 95% intervals, gate, budget and times)."""
    ev = result["eval"]
    preset = ev.get("preset")
    head = f"| model | clean | PGD-{ev['pgd_steps']} |" + (f" {preset} preset |" if preset else "") + \
        " expert-image passes | train time | gate input dependence (clean) | gate mean weight (clean) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for arm, r in result["arms"].items():
        g = r.get("gate") or {}
        cells = [ARM_LABELS[arm], _pct(r["clean"]), _pct(r["pgd"])]
        if preset:
            cells.append(_pct(r["preset"]) + (f" (n={r['preset']['n']})" if r["preset"]["n"] != r["images"] else ""))
        train_s = (r["train_time_s"] or 0) + (r.get("phase1_train_time_s") or 0)
        cells += [f"{r['expert_image_passes']:,}", f"{train_s:.0f} s",
                  f"{g['input_dependence_clean']:.4f}" if g else "-", _weights(g["mean_clean"]) if g else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    ex = result["experts"]
    lines += ["", f"Phase-1 experts alone (roles {ex['roles']}): clean " + _weights(ex["clean"]) +
              f"; PGD-{ev['pgd_steps']} " + _weights(ex["pgd"]), "", f"Budget: {result['budget']}.",
              f"Holdout images: {ev['images']}; wall time {result['wall_time_s']:.0f} s."]
    if "uniform" in result["arms"]:
        lines.append(f"Phase-1 gate exactly uniform (1/E): {result['arms']['uniform']['gate_is_uniform']}.")
    return "\n".join(lines) + "\n"


def gate_study_markdown(result: dict) -> str:
    ev = result["eval"]
    head = (f"| variant | change | clean | PGD-{ev['pgd_steps']} | input dependence clean / PGD | "
            "mean weight clean | mean weight PGD | entropy (1 = flat) | train time |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in result["variants"].items():
        g = r["gate"]
        change = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(paper default)"
        lines.append(f"| {name} | {change} | {_pct(r['clean'])} | {_pct(r['pgd'])} | "
                     f"{g['input_dependence_clean']:.4f} / {g['input_dependence_pgd']:.4f} | "
                     f"{_weights(g['mean_clean'])} | {_weights(g['mean_pgd'])} | "
                     f"{g['normalized_entropy_clean']:.3f} | {r['train_time_s']:.0f} s |")
    lines += ["", f"Holdout images: {ev['images']} (gate statistics on the first {ev['gate_images']}); "
              f"wall time {result['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out, name: str, markdown: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    env = "\n".join(f"- {k}: {v}" for k, v in result.get("environment", {}).items())
    atomic_write_text(out / f"{name}.md", f"# {name}\n\n{markdown}\n## Environment\n\n{env}\n")


def subset_npz(root, path, images: int = 18000, seed: int = 0, dataset: str = "cifar10") -> Path:
    """A seeded ``images``-image subset of ``dataset``'s TRAINING split as an npz file (keeps its mean,
    std, class names and flip policy), e.g. to carry CIFAR-10 to a machine with an upload limit."""
    x, y = data.load_dataset(dataset, root=root, split="train", size=images, seed=seed)
    info = data.dataset_info(dataset, root)
    return data.save_npz(path, x, y, mean=info["mean"], std=info["std"], classes=info.get("classes"),
                         flip=info.get("flip"))


# ============================================================================ command line
def _parse_set(items) -> dict:
    """``key=value`` pairs typed by the TrainConfig field (tuples comma-separated, none -> None)."""
    import dataclasses
    import typing
    hints = typing.get_type_hints(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ValueError(f"--set: expected FIELD=VALUE with FIELD a TrainConfig field, got {item!r}")
        hint = hints[key]
        if text.lower() == "none":
            out[key] = None
        elif hint is bool:
            out[key] = text.lower() in ("1", "true", "yes", "on")
        elif key in ("roles", "fgsm_eps_set", "pgd_steps_set"):
            conv = {"roles": str, "fgsm_eps_set": float, "pgd_steps_set": int}[key]
            out[key] = tuple(conv(v) for v in text.split(","))
        elif hint in (int, float):
            out[key] = hint(text)
        else:
            out[key] = int(text) if key == "train_size" else text
    return out


def config_for(recipe: str, data_dir, dataset: str = "cifar10", **changes) -> TrainConfig:
    """``recipe`` ("cpu": ``CPU_SCALE``, or a name of ``recipes.RECIPES``) with ``changes`` on top."""
    from .recipes import RECIPES
    if recipe != "cpu" and recipe not in RECIPES:
        raise ValueError(f"recipe: expected 'cpu' or one of {tuple(RECIPES)}, got {recipe!r}")
    base = dict(CPU_SCALE) if recipe == "cpu" else dict(RECIPES[recipe])
    return TrainConfig(**{**base, "dataset": dataset, "data_dir": str(data_dir), **changes})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmoe_adv.experiments", description=__doc__.split("\n")[0])
    p.add_argument("study", choices=("baselines", "gate-study", "subset"), help="subset: write --subset-images "
                   "training images to --out as an .npz file")
    p.add_argument("--data-dir", required=True, help="CIFAR-10 folder (tar.gz or batches) or the .npz file")
    p.add_argument("--subset-images", type=int, default=18000)
    p.add_argument("--dataset", default="cifar10", help="cifar10 | npz | svhn | synthetic (default cifar10)")
    p.add_argument("--out", required=True, help="run folder (finished phases in it are reused)")
    p.add_argument("--recipe", default="cpu", help="cpu (CPU_SCALE, default) or a recipes.RECIPES name")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="TrainConfig change (repeatable)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"baselines: comma-separated, of {ARMS}")
    p.add_argument("--variants", default=None, help="gate-study: comma-separated names of GATE_VARIANTS")
    p.add_argument("--eval-images", type=int, default=None, help="holdout images evaluated (default all)")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--preset", default="quick", help="quick | standard | adaptive | none (baselines)")
    p.add_argument("--preset-images", type=int, default=None, help="images the preset attacks (default all)")
    p.add_argument("--gate-images", type=int, default=256)
    p.add_argument("--pgd-at-batch-scale", type=int, default=1, help="PGD-AT batch = this x batch_size (same "
                   "expert-image budget either way; default 1)")
    p.add_argument("--eval-batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--progress", action="store_true", help="progress bars while training")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.study == "subset":
        path = subset_npz(args.data_dir, args.out, args.subset_images, args.seed, args.dataset)
        print(f"wrote {path} ({args.subset_images} training images of {args.dataset})")
        return 0
    cfg = config_for(args.recipe, args.data_dir, args.dataset, device=args.device, seed=args.seed,
                     **_parse_set(args.set))
    common = dict(eval_images=args.eval_images, pgd_steps=args.pgd_steps, gate_images=args.gate_images,
                  batch_size=args.eval_batch_size, progress=args.progress)
    if args.study == "baselines":
        arms = tuple(a for a in args.arms.split(",") if a)
        preset = None if args.preset.lower() == "none" else args.preset
        result = run_baselines(cfg, args.out, arms=arms, preset=preset, preset_images=args.preset_images,
                               pgd_at_batch_scale=args.pgd_at_batch_scale, **common)
        md, name = baselines_markdown(result), "baselines"
    else:
        names = args.variants.split(",") if args.variants else list(GATE_VARIANTS)
        bad = [n for n in names if n not in GATE_VARIANTS]
        if bad:
            raise SystemExit(f"--variants: unknown {bad}; expected some of {list(GATE_VARIANTS)}")
        result = gate_study(cfg, args.out, {n: GATE_VARIANTS[n] for n in names}, **common)
        md, name = gate_study_markdown(result), "gate_study"
    result["command"] = " ".join(["python -m fastmoe_adv.experiments", *(argv if argv is not None else sys.argv[1:])])
    write_results(result, args.out, name, md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
