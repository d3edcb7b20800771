#!/usr/bin/env bash
# One GPU session, start to finish, within 9 minutes: install, the CUDA-marked tests, the profiler,
# the benchmarks, the training-pipeline row. Offline; run from anywhere:
#
#     OUT=/path/to/output bash benchmarks/run_gpu.sh
#
# Stages, in order (each under `timeout`, cut from what is left of FASTMOE_GPU_BUDGET_S, default
# 510 s; a stage that runs out is interrupted with SIGINT and the next one starts):
#   1. install + versions                                            (~15 s)
#   2. tests: pytest -m cuda tests/ with TRITON_INTERPRET=0          (70..100 s)
#   3. profiler: benchmarks/profile_gpu.py -> PROFILE.md, profile.json (<= 130 s)
#   4. benchmarks: test_bench_experts.py (b512 bf16 rows, torch and fused BN), test_bench_batchnorm.py
#                                                                    (<= 90 + 45 s)
#   5. pipeline: benchmarks/pipeline.py -> s/epoch of phase 1 and 2, projected paper recipe (<= 130 s)
#   6. summary: a short table of all of the above, printed last
# Leaves in $OUT: run_gpu.log (every stage's output), cuda_tests.txt, PROFILE.md, profile.json,
# gpu.json (benchmark rows, pytest-benchmark format), RESULTS_gpu.md (report.py), pipeline.json,
# pipeline.md, summary.txt. Rows left out for time (torch.compile, CUDA graphs at b256, kernels,
# attack and train steps): `pytest benchmarks/ --benchmark-only` with FASTMOE_BENCH_DEVICE=cuda.
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
# tested compiled. At least 70 s (the reserve leaves it that), at most 100.
run_stage "cuda tests" 100 330 env TRITON_INTERPRET=0 "$PY" -m pytest -m cuda "$REPO/tests" -q -p no:cacheprovider \
    -o addopts="" --rootdir="$REPO" -rs --junitxml="$OUT/cuda_tests.xml"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|errors?)( |,|$)|no tests ran" "$LOG" | tail -20 >"$OUT/cuda_tests.txt" || true

unset TRITON_INTERPRET FASTMOE_BENCH_QUICK FASTMOE_EXECUTOR

# ---------------------------------------------------------------------------- 3. profiler
run_stage "profiler" 130 270 "$PY" "$REPO/benchmarks/profile_gpu.py" --out "$OUT"

# ---------------------------------------------------------------------------- 4. benchmarks
export FASTMOE_BENCH_DEVICE=cuda
bench() {  # bench NAME MAX RESERVE JSON ARGS...
    local name=$1 max=$2 reserve=$3 json=$4; shift 4
    run_stage "$name" "$max" "$reserve" "$PY" -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
        --rootdir="$REPO" --benchmark-json="$PARTS/$json"
}
FASTMOE_BENCH_COMPILE=0 bench "experts b512 bf16" 90 180 experts.json "$REPO/benchmarks/test_bench_experts.py" \
    -k "b512 and bf16 and not compile"
FASTMOE_BENCH_COMPILE=0 bench "batchnorm" 45 140 batchnorm.json "$REPO/benchmarks/test_bench_batchnorm.py"
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
    CMD="OUT=\$OUT bash benchmarks/run_gpu.sh (FASTMOE_BENCH_DEVICE=cuda FASTMOE_BENCH_COMPILE=0 pytest benchmarks/test_bench_experts.py -k 'b512 and bf16 and not compile' and benchmarks/test_bench_batchnorm.py --benchmark-only)"
    "$PY" "$REPO/benchmarks/report.py" "$OUT/gpu.json" --out "$OUT/RESULTS_gpu.md" --command "$CMD" >>"$LOG" 2>&1 \
        || log "report.py failed (see the log)"
fi
rm -rf "$PARTS"

# ---------------------------------------------------------------------------- 5. pipeline
run_stage "pipeline" 130 12 "$PY" "$REPO/benchmarks/pipeline.py" --out "$OUT" --seconds 40 --executor auto

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
    print("benchmarks (median ms):")
    for b in sorted(rows, key=lambda b: (b.get("group") or "", b["stats"]["median"])):
        print(f"  {(b.get('group') or '')[:44]:44s} {b.get('extra_info', {}).get('path', b['name'])[:26]:26s} "
              f"{1e3 * b['stats']['median']:9.2f}")
else:
    print("benchmarks: no rows")
pipe = out / "pipeline.md"
print(pipe.read_text().split("```")[1].strip() if pipe.exists() else "pipeline: not run")
EOF
log "done in $(( $(date +%s) - T0 ))s (budget ${BUDGET}s); outputs in $OUT"
cat "$OUT/summary.txt"
