#!/usr/bin/env bash
# One GPU session, start to finish, within 9 minutes: install, the CUDA-marked tests, the profiler,
# the benchmarks (eager and CUDA-graphed rows side by side), the training-pipeline rows (eager and
# graphed). Offline; run from anywhere:
#
#     OUT=/path/to/output bash benchmarks/run_gpu.sh
#
# Stages, in order (each under `timeout`, cut from what is left of FASTMOE_GPU_BUDGET_S, default
# 510 s; a stage that runs out is interrupted with SIGINT and the next one starts). MAX is a
# stage's own limit; RESERVE is what it leaves for the stages after it (the sum of their MAX plus
# 5 s for the summary), so a slow stage eats its own time, never a later stage's:
#                                                                         MAX  RESERVE (s)
#   1. install + versions                                                 ~15      -
#   2. tests: pytest -m cuda tests/ with TRITON_INTERPRET=0                75    415
#      (at least 70 s while the install takes at most 25 s: 510 - 25 - 415 = 70)
#   3. profiler: benchmarks/profile_gpu.py -> PROFILE.md, profile.json    105    310
#      (written after every workload: a cut run keeps the experts rows, which come first)
#   4. benchmarks (FASTMOE_BENCH_COMPILE=0) -> gpu.json, RESULTS_gpu.md:
#      a. test_bench_experts.py, bf16 fwd+bwd at b128 and b512: ModuleList
#         references, grouped, loop, (b512) grouped/loop+fusedbn, each
#         followed by its +graph row                                       80    230
#      b. test_bench_attack.py::test_pgd, b512 bf16: reference,
#         fastmoe-auto, fastmoe-auto+graph (torchattacks rows skip where
#         it is not installed)                                             40    190
#      c. test_bench_train.py, b128 bf16 pgd-10, phase 1 and 2:
#         fastmoe and fastmoe+graph                                        30    160
#      d. test_bench_batchnorm.py (--benchmark-max-time=0.25)              25    135
#   5. pipeline: benchmarks/pipeline.py --seconds 15: s/epoch of phase 1 and 2, projected paper recipe
#      a. eager -> pipeline.json, pipeline.md                              65     70
#      b. --cuda-graphs -> pipeline-graphs.json, pipeline-graphs.md        65      5
#   6. summary: a short table of all of the above (both pipeline runs, each with its projected
#      recipe time), printed last                                          ~5
#   Sum of the limits: 15 + 75 + 105 + 80 + 40 + 30 + 25 + 65 + 65 + 5 = 505 s <= 510 s. A pipeline
#   run is ~30 s of timed steps (15 s a phase: ~18 phase-1 and ~35 phase-2 steps) plus ~30 s of
#   start-up, cuDNN search, auto probes and (graphed) captures. The 30 s between 510 s and 9 minutes
#   absorb the summary and the up-to-15 s grace a stage gets after its SIGINT (timeout -k 15).
# Leaves in $OUT: run_gpu.log (every stage's output), cuda_tests.txt, PROFILE.md, profile.json,
# gpu.json (benchmark rows, pytest-benchmark format), RESULTS_gpu.md (report.py), pipeline.json,
# pipeline.md, pipeline-graphs.json, pipeline-graphs.md, summary.txt. Rows left out for time:
# torch.compile rows, every fwd-only, fp32, b256 and vmap row of the experts benchmark, the
# attack rows at b256 and with a forced executor (grouped/loop, eager and graphed), torchattacks
# where it is not installed, APGD, the train steps' per-expert reference and fp32 rows, the
# peak-matmul rows, the kernel benchmarks (gated_mix, pgd_step): `pytest benchmarks/ --benchmark-only` with
# FASTMOE_BENCH_DEVICE=cuda runs them all; and `python benchmarks/kernel_floor.py`.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
PY="${PYTHON:-python}"
BUDGET="${FASTMOE_GPU_BUDGET_S:-510}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/run_gpu.log"
PARTS="$(mktemp -d)"
T0=$(date +%s)
: >"$LOG"

log() { echo "[run_gpu +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# stage_timeout MAX RESERVE: seconds for a stage, at most MAX, leaving RESERVE for what follows.
stage_timeout() { local t=$(( $(left) - $2 )); (( t > $1 )) && t=$1; echo $t; }
run_stage() {  # run_stage NAME MAX RESERVE CMD... : the command under a timeout, output into the log
    local name=$1 max=$2 reserve=$3; shift 3
    local t; t=$(stage_timeout "$max" "$reserve")
    if (( t < 20 )); then log "SKIP $name: only ${t}s left of the ${BUDGET}s budget"; return 0; fi
    log "START $name (timeout ${t}s): $*"
    timeout -s INT -k 15 "$t" "$@" >>"$LOG" 2>&1
    local rc=$?
    if (( rc == 124 )); then log "TIMEOUT $name after ${t}s (what finished before it is kept)";
    else log "END $name rc=$rc"; fi
    return 0
}

# ---------------------------------------------------------------------------- 1. install
cd "$REPO"
RUN_DIR="$REPO"
log "install: pip install -e . --no-deps --no-build-isolation"
"$PY" -m pip install -e . --no-deps --no-build-isolation -q >>"$LOG" 2>&1 || log "pip install failed (see above)"
if ! (cd "$RUN_DIR" && "$PY" -c "import fastmoe_adv.kernels" >>"$LOG" 2>&1); then
    # kernels/ must import as fastmoe_adv.kernels: a shim package of symlinks, used from outside
    # the repo so that ./fastmoe_adv (without kernels/) does not shadow it.
    SHIM="$(mktemp -d)"
    mkdir -p "$SHIM/fastmoe_adv"
    for f in "$REPO"/fastmoe_adv/*; do ln -s "$f" "$SHIM/fastmoe_adv/"; done
    ln -s "$REPO/kernels" "$SHIM/fastmoe_adv/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    RUN_DIR="$SHIM"
    log "editable install unusable: using the PYTHONPATH shim $SHIM"
fi
# torchattacks (the peer of the attack rows) and pytest-xdist cannot come from the network there:
# wheels put in benchmarks/wheels/ beforehand (`pip download --no-deps torchattacks==3.5.1
# pytest-xdist execnet -d benchmarks/wheels`, an ignored folder: carry it) are installed without
# their dependencies.
if compgen -G "$REPO/benchmarks/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install --no-deps --no-index -q "$REPO"/benchmarks/wheels/*.whl >>"$LOG" 2>&1 \
        && log "installed $(cd "$REPO/benchmarks/wheels" && ls *.whl | tr '\n' ' ')" || log "wheel install failed (see above)"
else
    log "no benchmarks/wheels/*.whl: the torchattacks rows will skip"
fi
cd "$RUN_DIR"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, fastmoe_adv, fastmoe_adv.kernels
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"unavailable ({exc!r})"
print(f"fastmoe_adv {fastmoe_adv.__version__} from {fastmoe_adv.__file__}; torch {torch.__version__}; "
      f"triton {tv}; CUDA {torch.version.cuda}; device: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
EOF

# ---------------------------------------------------------------------------- 2. CUDA tests
# TRITON_INTERPRET=0: tests/conftest.py sets the interpreter by default; here the kernels are
# tested compiled. At least 70 s (the reserve leaves it that), at most 75.
# With pytest-xdist (a wheel in benchmarks/wheels/), four workers share the GPU: most of this
# stage is Triton compilation and Python, which the 16 CPU cores run in parallel.
XDIST=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4 --dist loadfile); fi
log "cuda tests: ${XDIST[*]:-one process (no pytest-xdist)}"
run_stage "cuda tests" 75 415 env TRITON_INTERPRET=0 "$PY" -m pytest -m cuda "$REPO/tests" -q -p no:cacheprovider \
    -o addopts="" --rootdir="$REPO" -rs --junitxml="$OUT/cuda_tests.xml" "${XDIST[@]}"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|errors?)( |,|$)|no tests ran" "$LOG" | tail -20 >"$OUT/cuda_tests.txt" || true

unset TRITON_INTERPRET FASTMOE_BENCH_QUICK FASTMOE_EXECUTOR

# ---------------------------------------------------------------------------- 3. profiler
run_stage "profiler" 105 310 "$PY" "$REPO/benchmarks/profile_gpu.py" --out "$OUT"

# ---------------------------------------------------------------------------- 4. benchmarks
export FASTMOE_BENCH_DEVICE=cuda
bench() {  # bench NAME MAX RESERVE JSON ARGS...
    local name=$1 max=$2 reserve=$3 json=$4; shift 4
    run_stage "$name" "$max" "$reserve" "$PY" -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
        --rootdir="$REPO" --benchmark-json="$PARTS/$json"
}
export FASTMOE_BENCH_COMPILE=0
EXPERTS_K="bf16 and fwd+bwd and (b128 or b512) and not compile and not vmap"
ATTACK_K="b512 and bf16 and not grouped and not loop"
TRAIN_K="bf16 and fastmoe"
bench "experts fwd+bwd b128+b512 bf16 (eager, graphed)" 80 230 experts.json \
    "$REPO/benchmarks/test_bench_experts.py" -k "$EXPERTS_K"
bench "attack pgd-10 b512 bf16 (eager, graphed)" 40 190 attack.json \
    "$REPO/benchmarks/test_bench_attack.py::test_pgd" -k "$ATTACK_K"
bench "train steps b128 bf16 (eager, graphed)" 30 160 train.json "$REPO/benchmarks/test_bench_train.py" -k "$TRAIN_K"
bench "batchnorm" 25 135 batchnorm.json "$REPO/benchmarks/test_bench_batchnorm.py" --benchmark-max-time=0.25
unset FASTMOE_BENCH_COMPILE
"$PY" - "$PARTS" "$OUT/gpu.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
parts = sorted(pathlib.Path(sys.argv[1]).glob("*.json"))
merged, n = None, 0
for p in parts:
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        print(f"skipping unreadable {p.name}: {exc}")
        continue
    if merged is None:
        merged = data
    else:
        merged["benchmarks"].extend(data["benchmarks"])
    n += len(data["benchmarks"])
if merged is None:
    print("no benchmark JSON was written")
    sys.exit(0)
pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=1))
print(f"merged {n} rows from {[p.name for p in parts]} into {sys.argv[2]}")
EOF
if [ -f "$OUT/gpu.json" ]; then
    CMD="OUT=\$OUT bash benchmarks/run_gpu.sh (FASTMOE_BENCH_DEVICE=cuda FASTMOE_BENCH_COMPILE=0 pytest --benchmark-only: benchmarks/test_bench_experts.py -k '$EXPERTS_K'; benchmarks/test_bench_attack.py::test_pgd -k '$ATTACK_K'; benchmarks/test_bench_train.py -k '$TRAIN_K'; benchmarks/test_bench_batchnorm.py --benchmark-max-time=0.25)"
    "$PY" "$REPO/benchmarks/report.py" "$OUT/gpu.json" --out "$OUT/RESULTS_gpu.md" --command "$CMD" >>"$LOG" 2>&1 \
        || log "report.py failed (see the log)"
fi
rm -rf "$PARTS"

# ---------------------------------------------------------------------------- 5. pipeline
# Eager first, then graphed (--cuda-graphs writes pipeline-graphs.json/.md): 15 s of timed steps
# per phase, about 18 phase-1 and 35 phase-2 steps, enough for the a + b * passes fit.
run_stage "pipeline eager" 65 70 "$PY" "$REPO/benchmarks/pipeline.py" --out "$OUT" --seconds 15 --executor auto
run_stage "pipeline graphed" 65 5 "$PY" "$REPO/benchmarks/pipeline.py" --out "$OUT" --seconds 15 --executor auto \
    --cuda-graphs

# ---------------------------------------------------------------------------- 6. summary
"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG" >/dev/null
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("=" * 30, "SUMMARY", "=" * 30)
tests = out / "cuda_tests.txt"
print("cuda tests:", (tests.read_text().strip().splitlines() or ["no result line"])[-1] if tests.exists() else "not run")
prof = out / "profile.json"
if prof.exists():
    data = json.loads(prof.read_text())
    print(f"profile ({data['meta']['device']}; ms per iteration; idle = 1 - busy/wall):")
    print(f"  {'workload':42s} {'wall':>7s} {'busy':>7s} {'idle':>5s} {'conv':>6s} {'bn':>6s} {'elem':>6s} {'copy':>6s}")
    for r in data["workloads"]:
        label = f"{r['group']} | {r['path']}"[:42]
        if "error" in r:
            print(f"  {label:42s} failed: {r['error'][:60]}")
            continue
        c = r["categories"]
        print(f"  {label:42s} {r['wall_ms']:7.1f} {r['busy_ms']:7.1f} {100 * r['idle_fraction']:4.0f}% "
              f"{c['conv']:6.1f} {c['batchnorm']:6.1f} {c['elementwise']:6.1f} {c['copy+slice']:6.1f}")
else:
    print("profile: not run")
bench = out / "gpu.json"
if bench.exists():
    rows = json.loads(bench.read_text())["benchmarks"]
    path = lambda b: b.get("extra_info", {}).get("path", b["name"])  # noqa: E731
    med = {(b.get("group"), path(b)): b["stats"]["median"] for b in rows}
    refs = {}
    for b in rows:
        if b.get("extra_info", {}).get("reference"):
            g = b.get("group")
            refs[g] = min(refs.get(g, float("inf")), b["stats"]["median"])
    print("benchmarks (median ms; x ref: the group's fastest reference row / this row; "
          "x eager: a +graph row's eager twin / this row):")
    for b in sorted(rows, key=lambda b: (b.get("group") or "", b["stats"]["median"])):
        g, p, m = b.get("group"), path(b), b["stats"]["median"]
        twin = med.get((g, p.replace("+graph", ""))) if "+graph" in p else None
        print(f"  {(g or '')[:44]:44s} {p[:26]:26s} {1e3 * m:9.2f} "
              f"{f'{refs[g] / m:6.2f}x ref' if g in refs else '':>10s} {f'{twin / m:6.2f}x eager' if twin else ''}")
else:
    print("benchmarks: no rows")
runs = []
for stem, label in (("pipeline", "eager"), ("pipeline-graphs", "graphed")):
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    print(f"pipeline, {label}:", ("\n" + md.read_text().split("```")[1].strip()) if md.exists() else "not run")
    if js.exists():
        phases = {r["phase"]: r for r in json.loads(js.read_text())["phases"]}
        runs.append((label, phases, json.loads(js.read_text())["meta"].get("recipe_epochs", [30, 30])))
if runs:
    print("pipeline side by side (fit s/epoch; projected paper recipe: its epochs of phase 1 + phase 2):")
    print(f"  {'run':8s} {'phase 1':>9s} {'phase 2':>9s} {'recipe':>30s}")
    recipe = {}
    for label, phases, epochs in runs:
        cells = [f"{phases[k]['epoch_s']:9.1f}" if k in phases else f"{'-':>9s}" for k in (1, 2)]
        if 1 in phases and 2 in phases:
            recipe[label] = epochs[0] * phases[1]["epoch_s"] + epochs[1] * phases[2]["epoch_s"]
            total = f"{epochs[0]}+{epochs[1]} ep: {recipe[label]:.0f} s = {recipe[label] / 3600:.2f} h"
        else:
            total = "- (a phase missing)"
        print(f"  {label:8s} {cells[0]} {cells[1]} {total:>30s}")
    if len(recipe) == 2:
        print(f"  graphed / eager: {recipe['eager'] / recipe['graphed']:.2f}x faster")
EOF
log "done in $(( $(date +%s) - T0 ))s (budget ${BUDGET}s); outputs in $OUT"
cat "$OUT/summary.txt"
