"""Our attacks next to torchattacks' on one trained mixture: robust accuracy with 95% Wilson intervals,
wall time and per-point agreement for FGSM, PGD-20, APGD-CE/DLR/T, Square and the ``standard`` preset,
plus Square on an undefended model (the clean expert alone). Prints a table last; writes JSON beside it.

    .venv/bin/python benchmarks/compare_attacks.py --checkpoint runs/demo/phase2.pt --images 256 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastmoe_adv import data
from fastmoe_adv.apgd import apgd, apgd_targeted
from fastmoe_adv.attacks import attack_mode, fgsm, pgd
from fastmoe_adv.evaluate import wilson_interval
from fastmoe_adv.presets import run_preset
from fastmoe_adv.reporting import environment
from fastmoe_adv.square import square
from fastmoe_adv.train import load_model

TOLERANCE = 0.02  # the acceptance bound: 2 accuracy points
GROUPS = ("misc", "square", "ce", "dlr", "t", "preset", "fast")


class ExpertAlone(torch.nn.Module):
    """One expert of a mixture as a plain classifier on raw [0, 1] pixels (no gate): the undefended model."""

    def __init__(self, moe, index):
        super().__init__()
        ref = moe.to_reference()
        self.mean, self.std = ref.mean.clone(), ref.std.clone()
        self.expert = ref.experts[index]

    def forward(self, x):
        return self.expert((x - self.mean) / self.std)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a phase-2 checkpoint (e.g. runs/demo/phase2.pt)")
    p.add_argument("--images", type=int, default=256, help="synthetic test images (default 256)")
    p.add_argument("--eps", type=float, default=8 / 255, help="L-inf radius (default 8/255)")
    p.add_argument("--steps", type=int, default=100, help="APGD iterations (default 100)")
    p.add_argument("--targets", type=int, default=9, help="APGD-T target classes (default 9)")
    p.add_argument("--queries", type=int, default=5000, help="Square queries (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every attack (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--skip-fast-torchattacks", action="store_true",
                   help="run torchattacks on the reference twin only, not also on the FastSoftMoE")
    p.add_argument("--only", default=",".join(GROUPS),
                   help=f"comma-separated groups to run, of {GROUPS} (default all; ce, dlr and t also as "
                        "ce-ours / ce-theirs etc.); run groups as separate processes on a busy machine, then "
                        "--merge their JSON files")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine the JSON files of earlier --only runs into one table and JSON (runs nothing)")
    p.add_argument("--out", default=None, help="JSON path (default: compare_attacks.json beside the checkpoint)")
    return p.parse_args(argv)


def _robust(model, x_adv, y):
    with torch.no_grad(), attack_mode(model):
        return model(x_adv).argmax(dim=1) == y


def _row(name, impl, model_name, robust, seconds, settings):
    n, k = int(robust.numel()), int(robust.sum())
    lo, hi = wilson_interval(k, n)
    return {"attack": name, "implementation": impl, "model": model_name, "robust": k, "n": n,
            "accuracy": k / max(n, 1), "wilson95": [lo, hi], "seconds": seconds, "settings": settings,
            "mask": robust.cpu()}


def _timed(name, impl, model_name, model, settings, make_adv, y):
    start = time.perf_counter()
    x_adv = make_adv()
    seconds = time.perf_counter() - start
    row = _row(name, impl, model_name, _robust(model, x_adv, y), seconds, settings)
    print(f"  {name:<28} {impl:<13} {model_name:<17} {100 * row['accuracy']:5.1f}%  {seconds:7.1f} s", flush=True)
    return row


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def our_specs(model, x, y, a):
    """name -> (settings, thunk) of our attacks on the FastSoftMoE; each its own generator seeded ``a.seed``."""
    eps, s = a.eps, a.seed
    return {
        "FGSM": ({}, lambda: fgsm(model, x, y, eps)),
        "PGD-20": ({"alpha": 2 / 255, "steps": 20, "random_start": True},
                   lambda: pgd(model, x, y, eps, 2 / 255, 20, generator=_gen(s))),
        "APGD-CE": ({"steps": a.steps}, lambda: apgd(model, x, y, eps, a.steps, loss="ce", generator=_gen(s))),
        "APGD-DLR": ({"steps": a.steps}, lambda: apgd(model, x, y, eps, a.steps, loss="dlr", generator=_gen(s))),
        "APGD-T": ({"steps": a.steps, "n_targets": a.targets},
                   lambda: apgd_targeted(model, x, y, eps, a.steps, n_targets=a.targets, generator=_gen(s))),
        "Square": ({"n_queries": a.queries}, lambda: square(model, x, y, eps, a.queries, generator=_gen(s))),
    }


def their_specs(model, a):
    """name -> (settings, attack) of torchattacks' APGD-CE, APGD-DLR and APGD-T, same budget and seed."""
    import torchattacks

    k = a.targets + 1  # torchattacks' APGDT attacks n_classes - 1 targets
    return {
        "APGD-CE": ({"steps": a.steps}, torchattacks.APGD(model, norm="Linf", eps=a.eps, steps=a.steps,
                                                          n_restarts=1, seed=a.seed, loss="ce")),
        "APGD-DLR": ({"steps": a.steps}, torchattacks.APGD(model, norm="Linf", eps=a.eps, steps=a.steps,
                                                           n_restarts=1, seed=a.seed, loss="dlr")),
        "APGD-T": ({"steps": a.steps, "n_targets": a.targets},
                   torchattacks.APGDT(model, norm="Linf", eps=a.eps, steps=a.steps, n_restarts=1, seed=a.seed,
                                      n_classes=k)),
    }


def ours(model, x, y, a, names):
    specs = our_specs(model, x, y, a)
    return [_timed(n, "fastmoe_adv", "FastSoftMoE", model, specs[n][0], specs[n][1], y) for n in names]


def theirs(model, mname, x, y, a, names):
    specs = their_specs(model, a)
    with attack_mode(model):  # the per-forward pixel check off, as for our attacks
        return [_timed(n, "torchattacks", mname, model, specs[n][0], lambda atk=specs[n][1]: atk(x, y), y)
                for n in names]


def preset(model, x, y, a):
    start = time.perf_counter()
    res = run_preset(model, x, y, preset="standard", eps=a.eps, seed=a.seed)
    seconds = time.perf_counter() - start
    print(f"  {'standard preset':<28} {'fastmoe_adv':<13} {'FastSoftMoE':<17} {100 * res.robust_accuracy:5.1f}%  "
          f"{seconds:7.1f} s", flush=True)
    return [_row("standard preset", "fastmoe_adv", "FastSoftMoE", res.robust, seconds, res.to_dict())]


def run_group(group, moe, ref, x, y, a):
    """The rows of one group; groups are independent, so they may run as separate processes."""
    if group == "misc":
        return ([_row("clean", "-", "FastSoftMoE", _robust(moe, x, y), 0.0, {})]
                + ours(moe, x, y, a, ["FGSM", "PGD-20"]) + undefended(moe, x, y, a))
    if group == "square":  # the costliest group on a robust model: 5000 forwards of the still-robust points
        return ours(moe, x, y, a, ["Square"])
    base, _, side = group.partition("-")  # "ce-ours" / "ce-theirs": one side of a pair, for parallel processes
    if base in ("ce", "dlr", "t") and side in ("", "ours", "theirs"):
        name = {"ce": "APGD-CE", "dlr": "APGD-DLR", "t": "APGD-T"}[base]
        return ((ours(moe, x, y, a, [name]) if side != "theirs" else [])
                + (theirs(ref, "ReferenceSoftMoE", x, y, a, [name]) if side != "ours" else []))
    if group == "preset":
        return preset(moe, x, y, a)
    if group == "fast":
        return theirs(moe, "FastSoftMoE", x, y, a, ["APGD-CE", "APGD-DLR", "APGD-T"])
    raise ValueError(f"--only: expected groups among {GROUPS}, got {group!r}")


def undefended(moe, x, y, a):
    """Square on the clean expert e0 alone: it must lower accuracy below clean within its budget."""
    e0 = ExpertAlone(moe, 0).eval()
    name = "expert e0 alone"
    clean = _row("clean", "-", name, _robust(e0, x, y), 0.0, {})
    sq = _timed("Square", "fastmoe_adv", name, e0, {"n_queries": a.queries},
                lambda: square(e0, x, y, a.eps, a.queries, generator=_gen(a.seed)), y)
    return [clean, sq]


def _find(rows, attack, impl, model):
    return next((r for r in rows if (r["attack"], r["implementation"], r["model"]) == (attack, impl, model)), None)


def acceptance(rows):
    """The three acceptance points, with the figures they rest on."""
    out = {}
    for model in ("ReferenceSoftMoE", "FastSoftMoE"):
        for attack in ("APGD-CE", "APGD-DLR", "APGD-T"):
            mine, peer = _find(rows, attack, "fastmoe_adv", "FastSoftMoE"), _find(rows, attack, "torchattacks", model)
            if mine is None or peer is None:
                continue
            gap = mine["accuracy"] - peer["accuracy"]
            both = int((mine["mask"] == peer["mask"]).sum())
            out[f"{attack} vs torchattacks on {model}"] = {
                "ours": mine["accuracy"], "theirs": peer["accuracy"], "gap_points": 100 * gap,
                "same_verdict_points": both, "holds": abs(gap) <= TOLERANCE + 1e-12}
        ce, t = _find(rows, "APGD-CE", "torchattacks", model), _find(rows, "APGD-T", "torchattacks", model)
        if ce is None or t is None:
            continue
        worst = ce["mask"] & t["mask"]
        rows.append(_row("worst(APGD-CE, APGD-T)", "torchattacks", model, worst,
                         ce["seconds"] + t["seconds"], {"per_point": "robust under both"}))
        preset = _find(rows, "standard preset", "fastmoe_adv", "FastSoftMoE")
        if preset is None:
            continue
        gap = preset["accuracy"] - worst.float().mean().item()
        out[f"standard preset vs torchattacks worst case on {model}"] = {
            "ours": preset["accuracy"], "theirs": worst.float().mean().item(), "gap_points": 100 * gap,
            "robust_to_preset_but_not_torchattacks": int((preset["mask"] & ~worst).sum()),
            "holds": gap <= TOLERANCE + 1e-12}
    clean, sq = _find(rows, "clean", "-", "expert e0 alone"), _find(rows, "Square", "fastmoe_adv", "expert e0 alone")
    if clean is None or sq is None:
        return out
    out["Square lowers accuracy on the undefended expert e0"] = {
        "ours": sq["accuracy"], "theirs": clean["accuracy"], "gap_points": 100 * (sq["accuracy"] - clean["accuracy"]),
        "holds": sq["accuracy"] < clean["accuracy"]}
    return out


def table(rows) -> str:
    head = (f"| {'attack':<26} | {'implementation':<14} | {'model':<17} | robust acc | 95% Wilson   "
            f"| robust/n | wall s  |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lo, hi = r["wilson95"]
        lines.append(f"| {r['attack']:<26} | {r['implementation']:<14} | {r['model']:<17} | "
                     f"{100 * r['accuracy']:8.1f}%  | [{100 * lo:4.1f}, {100 * hi:4.1f}] | "
                     f"{r['robust']:>3}/{r['n']:<4} | {r['seconds']:7.1f} |")
    return "\n".join(lines)


def acceptance_lines(acc) -> str:
    return "\n".join(f"- {name}: ours {100 * v['ours']:.1f}% vs {100 * v['theirs']:.1f}% "
                     f"(gap {v['gap_points']:+.1f} points) -> {'HOLDS' if v['holds'] else 'FAILS'}"
                     for name, v in acc.items())


def _load_rows(paths):
    rows, meta = [], None
    for path in paths:
        part = json.loads(Path(path).read_text())
        meta = meta or part
        rows += [dict(r, mask=torch.tensor(r["mask"], dtype=torch.bool)) for r in part["rows"]]
    return rows, meta


def _order(rows):
    keys = ["clean", "FGSM", "PGD-20", "APGD-CE", "APGD-DLR", "APGD-T", "Square", "standard preset",
            "worst(APGD-CE, APGD-T)"]
    models = ["FastSoftMoE", "ReferenceSoftMoE", "expert e0 alone"]
    return sorted(rows, key=lambda r: (r["model"] == "expert e0 alone", keys.index(r["attack"]),
                                       r["implementation"], models.index(r["model"])))


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    if a.merge:
        rows, meta = _load_rows(a.merge)
        twin_gap, n = meta["twin_logit_gap"], meta["images"]
        rows = [r for r in rows if r["attack"] != "worst(APGD-CE, APGD-T)"]
    else:
        moe = load_model(a.checkpoint, map_location="cpu").eval()
        ref = moe.to_reference().eval()
        images, labels = data.load_dataset("synthetic", split="test", seed=0, size=a.images)
        x, y = images.float() / 255, labels.long()
        with torch.no_grad(), attack_mode(moe), attack_mode(ref):
            twin_gap = (moe(x) - ref(x)).abs().max().item()
        n = a.images
        print(f"{n} synthetic test images, eps {a.eps:.6f}, seed {a.seed}; max |FastSoftMoE - reference| "
              f"logit gap {twin_gap:.2e}", flush=True)
        rows = [r for g in a.only.split(",") for r in run_group(g.strip(), moe, ref, x, y, a)]
    acc = acceptance(rows)
    rows = _order(rows)
    total = time.perf_counter() - start
    out = Path(a.out) if a.out else Path(a.checkpoint).with_name("compare_attacks.json")
    report = {"command": " ".join(["benchmarks/compare_attacks.py"] + (argv or sys.argv[1:])), "args": vars(a),
              "images": n, "twin_logit_gap": twin_gap, "total_seconds": total,
              "rows": [dict(r, mask=r["mask"].tolist()) for r in rows], "acceptance": acc,
              "environment": environment("cpu")}
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out}; {total:.1f} s\n\n{acceptance_lines(acc)}\n\n{table(rows)}")
    return report


if __name__ == "__main__":
    main()
