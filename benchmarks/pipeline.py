"""Seconds per training epoch, both phases, at full size, and the projected time of the paper recipe.

    python benchmarks/pipeline.py [--out DIR] [--seconds 75] [--steps 300] [--bn-backend torch] [--cuda-graphs]
    python benchmarks/pipeline.py --quick          # tiny sizes on CPU: an end-to-end check

Full size (CUDA): 9 width-64 experts, batch 128 (phase 1: per expert), bf16 autocast,
channels_last, 50,000 synthetic uint8 images held on the device, augmented by ``DeviceLoader``
(crop + flip) as the trainer does. Each step is ``fastmoe_adv.train.phase1_step`` /
``phase2_step`` with this step's attack drawn as the trainer draws it (``draw_phase1_plan`` /
``draw_phase2_attack``: FGSM eps from {0.01..0.09}, PGD steps from {10, 20, 30, 40, 50},
arXiv 2512.20821). After ``--warmup`` steps, steps are timed one by one (a synchronize after
each) until ``--steps`` or ``--seconds`` run out.

``--cuda-graphs``: the steps with ``graph=True`` (``TrainConfig.cuda_graphs``): every attack step
and the training forward+backward the replay of a captured CUDA graph (``fastmoe_adv.graphs``).
A step that captures a graph (a phase-1 plan whose span of running experts was not seen yet)
pays the capture once per training run: such steps are kept out of the fit and the mean and
reported apart (``capture_steps``, ``capture_s``). Without CUDA the graphed steps run uncaptured
(``--quick --cuda-graphs`` checks the plumbing). Outputs go to pipeline-graphs.json/.md instead
of pipeline.json/.md, so one folder can hold both runs; the flag is recorded in both.

Projection: a step costs about ``a + b * passes`` (passes: attack iterations of the step; phase 1:
the largest PGD step count drawn, all experts running in one grouped pass; phase 2: the PGD steps,
or 1 for FGSM). ``project`` fits a and b by least squares over the timed steps and evaluates the
fit at the recipe's expected passes, so a short sample with unlucky draws does not skew the
epoch time; the plain mean per step is reported next to it. Epoch = steps per epoch (50,000 //
128 = 390, the trainer drops the last partial batch) x seconds per step; recipe = 30 epochs of
phase 1 + 30 of phase 2. Written to DIR/pipeline.json and DIR/pipeline.md (with ``--cuda-graphs``:
DIR/pipeline-graphs.json and .md), table printed last.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

FULL = dict(device="cuda", width=64, experts=9, batch=128, images=50_000, bf16=True, channels_last=True,
            steps_scale=1.0, hw=32)
QUICK = dict(device="cpu", width=4, experts=3, batch=2, images=16, bf16=False, channels_last=False,
             steps_scale=0.1, hw=8)
RECIPE_EPOCHS = (30, 30)  # phase 1, phase 2 (TrainConfig.pretrain_epochs / train_epochs defaults)


# ============================================================================ pure arithmetic
def expected_max_draw(values, n: int) -> float:
    """E[max of n independent uniform draws from ``values``] (phase 1: the longest PGD expert)."""
    vals = sorted(values)
    m = len(vals)
    if m == 0 or n < 1:
        raise ValueError(f"expected_max_draw: expected a non-empty set and n >= 1, got {vals} and n={n}")
    return sum(v * (((k + 1) / m) ** n - (k / m) ** n) for k, v in enumerate(vals))


def project(times_s, passes, expected_passes: float, steps_per_epoch: int) -> dict:
    """Seconds per step and per epoch from timed steps with their attack passes.

    Fits ``t = a + b * passes`` (least squares; b = 0 when every step had the same passes) and
    evaluates it at ``expected_passes``. Returns mean_step_s, fit (a, b), step_s (the fit at the
    expectation), epoch_s (= step_s * steps_per_epoch) and mean_epoch_s (plain mean * steps).
    """
    if len(times_s) != len(passes) or not times_s:
        raise ValueError(f"project: expected as many step times as pass counts (>= 1), got {len(times_s)} and "
                         f"{len(passes)}")
    n = len(times_s)
    mean_t, mean_p = sum(times_s) / n, sum(passes) / n
    var_p = sum((p - mean_p) ** 2 for p in passes)
    b = sum((p - mean_p) * (t - mean_t) for p, t in zip(passes, times_s)) / var_p if var_p > 0 else 0.0
    a = mean_t - b * mean_p
    step_s = a + b * expected_passes if var_p > 0 else mean_t
    return {"steps_timed": n, "mean_step_s": mean_t, "mean_passes": mean_p, "expected_passes": expected_passes,
            "fit_a_s": a, "fit_b_s": b, "step_s": step_s, "epoch_s": step_s * steps_per_epoch,
            "mean_epoch_s": mean_t * steps_per_epoch, "steps_per_epoch": steps_per_epoch}


# ============================================================================ the run
def _setup(size, phase, bn_backend, executor, cuda_graphs=False):
    from fastmoe_adv import FastSoftMoE, data
    from fastmoe_adv.train import TrainConfig
    from fastmoe_adv.train.steps import optimizer_groups
    cfg = TrainConfig(dataset="synthetic", width=size["width"], num_experts=size["experts"],
                      batch_size=size["batch"], bf16=size["bf16"], channels_last=size["channels_last"],
                      steps_scale=size["steps_scale"], device=size["device"], executor=executor,
                      cuda_graphs=cuda_graphs)
    dev = torch.device(size["device"])
    torch.manual_seed(0)
    with dev:
        model = FastSoftMoE(num_experts=cfg.num_experts, width=cfg.width, roles=cfg.expert_roles,
                            executor=executor, bn_backend=bn_backend)
    if size["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model.check_inputs = False  # batches come from the loader: in [0, 1] by construction
    hw = size["hw"]
    images = torch.randint(0, 256, (size["images"], 3, hw, hw), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (size["images"],), device=dev)
    seeds = range(cfg.num_experts) if phase == 1 else [0]
    loaders = data.DeviceLoader.group(images, labels, cfg.batch_size, dev, seeds=seeds, augment=True, drop_last=True)
    params = [p for p in (model.experts if phase == 1 else model).parameters()]
    opt = torch.optim.SGD(optimizer_groups(model, params, cfg, phase), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    return cfg, model, loaders, opt


def _batches(loaders):
    """Endless batches: phase 1 stacks the experts' streams into [B,E,3,H,W] / [B,E]."""
    iters = [iter(ld) for ld in loaders]
    while True:
        got = []
        for i, ld in enumerate(loaders):
            try:
                got.append(next(iters[i]))
            except StopIteration:
                iters[i] = iter(ld)
                got.append(next(iters[i]))
        if len(got) == 1:
            yield got[0]
        else:
            yield torch.stack([x for x, _ in got], 1), torch.stack([y for _, y in got], 1)


def _stepper(phase, cfg, model, opt, device):
    """step(x, y) -> attack passes of this step, drawing the attack as the trainer does."""
    from fastmoe_adv.train import draw_phase1_plan, draw_phase2_attack, phase1_step, phase2_step
    from fastmoe_adv.train.steps import ExpertsNet
    choice_gen = torch.Generator().manual_seed(1)
    gen = torch.Generator(device=device).manual_seed(2)
    net = ExpertsNet(model)

    def step(x, y):
        if phase == 1:
            plan = draw_phase1_plan(model.roles, cfg, choice_gen)
            phase1_step(model, net, opt, x, y, plan, generator=gen, bf16=cfg.bf16, graph=cfg.cuda_graphs)
            return max(s if k == "pgd" else 1 if k == "fgsm" else 0 for k, s in zip(plan.kinds, plan.steps))
        attack = draw_phase2_attack(cfg, choice_gen)
        phase2_step(model, model, opt, x, y, attack, cfg, generator=gen, graph=cfg.cuda_graphs)
        return int(attack.steps)
    return step


def _expected_passes(phase, cfg, roles) -> float:
    steps = cfg.pgd_steps_scaled
    if phase == 1:
        return expected_max_draw(steps, roles.count("pgd")) if "pgd" in roles else 1.0
    return cfg.phase2_fgsm_prob * 1 + (1 - cfg.phase2_fgsm_prob) * sum(steps) / len(steps)


def run_phase(size, phase, args) -> dict:
    """Warm up, time steps one by one (steps that captured a CUDA graph apart), project the epoch."""
    from fastmoe_adv import graphs
    dev = torch.device(size["device"])
    cfg, model, loaders, opt = _setup(size, phase, args.bn_backend, args.executor, args.cuda_graphs)
    step, batches = _stepper(phase, cfg, model, opt, dev), _batches(loaders)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t_warm = time.perf_counter()
    for _ in range(args.warmup):  # cuDNN algorithm search, Triton compiles, allocator, graph captures
        step(*next(batches))
    sync()
    warm_s = time.perf_counter() - t_warm
    times, passes, capture_times, t0 = [], [], [], time.perf_counter()
    while len(times) < args.steps and (time.perf_counter() - t0 < args.seconds or len(times) < 2):
        x, y = next(batches)
        captured_before = len(graphs.records())
        t = time.perf_counter()
        p = step(x, y)
        sync()
        if len(graphs.records()) > captured_before:   # a new graph (or a failed capture): once per run
            capture_times.append(time.perf_counter() - t)
            continue
        passes.append(p)
        times.append(time.perf_counter() - t)
    out = project(times, passes, _expected_passes(phase, cfg, model.roles), len(loaders[0]))
    statuses = [r.status for r in graphs.records()]
    out.update(phase=phase, warmup_steps=args.warmup, warmup_s=warm_s, median_step_s=statistics.median(times),
               pgd_steps_set=list(cfg.pgd_steps_scaled), batch=cfg.batch_size, images=size["images"],
               cuda_graphs=cfg.cuda_graphs, capture_steps=len(capture_times), capture_s=sum(capture_times),
               graph_bodies={s: statuses.count(s) for s in sorted(set(statuses))})
    if dev.type == "cuda":
        out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del model, opt, loaders, step
    graphs.clear()   # this phase's graphs and their memory pools
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def render(results, meta) -> str:
    """The short table (also the body of pipeline.md)."""
    lines = [f"pipeline: {meta['device']}, width {meta['width']}, {meta['experts']} experts, batch {meta['batch']}, "
             f"{'bf16' if meta['bf16'] else 'fp32'}, {'channels_last' if meta['channels_last'] else 'NCHW'}, "
             f"bn_backend={meta['bn_backend']}, executor={meta['executor']}, "
             f"cuda_graphs={'on' if meta.get('cuda_graphs') else 'off'}, {meta['images']} images",
             f"{'phase':6s} {'steps':>6s} {'mean s/step':>12s} {'passes':>7s} {'exp.':>6s} {'fit s/step':>11s} "
             f"{'s/epoch':>9s} {'mean-based':>11s}"]
    for r in results:
        lines.append(f"{r['phase']:<6d} {r['steps_timed']:6d} {r['mean_step_s']:12.4f} {r['mean_passes']:7.1f} "
                     f"{r['expected_passes']:6.1f} {r['step_s']:11.4f} {r['epoch_s']:9.1f} {r['mean_epoch_s']:11.1f}")
    if len(results) == 2:
        total = sum(e * r["epoch_s"] for e, r in zip(RECIPE_EPOCHS, results))
        lines.append(f"paper recipe ({RECIPE_EPOCHS[0]}+{RECIPE_EPOCHS[1]} epochs, PGD steps "
                     f"{results[0]['pgd_steps_set']}): projected {total:.0f} s = {total / 3600:.2f} h")
    for r in results:
        if r.get("capture_steps"):
            lines.append(f"phase {r['phase']}: {r['capture_steps']} timed steps captured new graphs "
                         f"({r['capture_s']:.1f} s, once per run): left out of the fit")
        failed = sum(n for status, n in r.get("graph_bodies", {}).items() if status.startswith("failed"))
        if failed:
            lines.append(f"phase {r['phase']}: {failed} CUDA graph captures FAILED (those bodies ran uncaptured)")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on CPU (an end-to-end check; times mean nothing)")
    ap.add_argument("--out", default=None, help="folder for pipeline.json and pipeline.md (default: print only)")
    ap.add_argument("--steps", type=int, default=None, help="at most this many timed steps per phase (300; quick 2)")
    ap.add_argument("--seconds", type=float, default=75.0, help="stop timing a phase after this many seconds")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; quick 1)")
    ap.add_argument("--bn-backend", default="torch", choices=("torch", "triton", "auto"))
    ap.add_argument("--executor", default="auto", choices=("auto", "grouped", "loop"))
    ap.add_argument("--phases", default="1,2", help="comma-separated: 1, 2 or both")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="graph=True for the steps (TrainConfig.cuda_graphs); writes pipeline-graphs.json/.md")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 300)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if size["device"] == "cuda" and not torch.cuda.is_available():
        print(f"skipped: needs CUDA (torch {torch.__version__} sees no CUDA device); --quick runs tiny sizes on CPU")
        return 0
    if size["device"] == "cuda":
        torch.backends.cudnn.benchmark = True
    meta = {**{k: size[k] for k in ("width", "experts", "batch", "images", "bf16", "channels_last")},
            "device": torch.cuda.get_device_name() if size["device"] == "cuda" else "CPU (quick: times mean nothing)",
            "torch": torch.__version__, "bn_backend": args.bn_backend, "executor": args.executor,
            "cuda_graphs": args.cuda_graphs, "recipe_epochs": list(RECIPE_EPOCHS),
            "command": "python " + " ".join(["benchmarks/pipeline.py", *argv])}
    stem = "pipeline-graphs" if args.cuda_graphs else "pipeline"
    results = []
    for phase in [int(p) for p in args.phases.split(",") if p]:
        results.append(run_phase(size, phase, args))
        table = render(results, meta)
        print(f"[pipeline] phase {phase}: {table.splitlines()[1 + len(results)]}", flush=True)
        if args.out:  # after every phase: a run cut short by its time limit keeps phase 1
            out = pathlib.Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "phases": results}, indent=1))
            (out / f"{stem}.md").write_text(f"# Training pipeline{' (CUDA graphs)' if args.cuda_graphs else ''}"
                                            f"\n\nCommand: `{meta['command']}`\n\n```\n{table}\n```\n")
    print(render(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
