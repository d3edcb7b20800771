#!/usr/bin/env bash
# One GPU session, start to finish, in about 8 minutes: install, the CUDA-marked tests, the
# benchmarks (GPU rows only), the report. Offline; run from anywhere:
#
#     OUT=/path/to/output bash benchmarks/run_gpu.sh
#
# Leaves in $OUT (4 files): run_gpu.log (every stage's output), gpu.json (all benchmark rows,
# pytest-benchmark format), RESULTS_gpu.md (report.py), throughput_gpu.png; prints a short
# table last. Every stage runs under a timeout cut from what is left of FASTMOE_GPU_BUDGET_S
# (default 470 s); a stage that runs out is interrupted (SIGINT: pytest still writes the rows it
# has) and the next one starts. Stages, in order of value: tests, experts, kernels,
# attack+train, torch.compile rows.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
PY="${PYTHON:-python}"
BUDGET="${FASTMOE_GPU_BUDGET_S:-470}"
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
    timeout -s INT -k 20 "$t" "$@" >>"$LOG" 2>&1
    local rc=$?
    if (( rc == 124 )); then log "TIMEOUT $name after ${t}s (rows finished before it are kept)";
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
# TRITON_INTERPRET=0: tests/conftest.py only sets the interpreter by default; on the GPU the
# kernels must be tested compiled.
run_stage "cuda tests" 100 330 env TRITON_INTERPRET=0 "$PY" -m pytest -m cuda "$REPO/tests" -q -p no:cacheprovider \
    -o addopts="" --rootdir="$REPO"

# ---------------------------------------------------------------------------- 3. benchmarks
export FASTMOE_BENCH_DEVICE=cuda
unset TRITON_INTERPRET FASTMOE_BENCH_QUICK FASTMOE_EXECUTOR
bench() {  # bench NAME MAX RESERVE JSON ARGS...
    local name=$1 max=$2 reserve=$3 json=$4; shift 4
    run_stage "$name" "$max" "$reserve" "$PY" -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
        --rootdir="$REPO" --benchmark-json="$PARTS/$json"
}
FASTMOE_BENCH_COMPILE=0 bench "experts" 170 170 experts.json "$REPO/benchmarks/test_bench_experts.py"
if [ -f "$REPO/benchmarks/test_bench_kernels.py" ]; then
    bench "kernels" 60 140 kernels.json "$REPO/benchmarks/test_bench_kernels.py"
fi
bench "attack+train" 120 25 attack_train.json "$REPO/benchmarks/test_bench_attack.py" \
    "$REPO/benchmarks/test_bench_train.py"
FASTMOE_BENCH_COMPILE=1 bench "torch.compile" 200 25 compile.json "$REPO/benchmarks/test_bench_experts.py" \
    -k compile

# ---------------------------------------------------------------------------- 4. report
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
    CMD="OUT=\$OUT bash benchmarks/run_gpu.sh (stages: pytest benchmarks/test_bench_{experts,attack,train,kernels}.py --benchmark-only with FASTMOE_BENCH_DEVICE=cuda; compile rows: -k compile)"
    "$PY" "$REPO/benchmarks/report.py" "$OUT/gpu.json" --out "$OUT/RESULTS_gpu.md" --plot "$OUT/throughput_gpu.png" \
        --command "$CMD" --print 2>&1 | tee -a "$LOG"
else
    log "no benchmark rows: nothing to report"
fi
rm -rf "$PARTS"
log "done in $(( $(date +%s) - T0 ))s (budget ${BUDGET}s); outputs in $OUT"
