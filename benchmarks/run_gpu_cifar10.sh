#!/usr/bin/env bash
# Real CIFAR-10 on one GPU in about 9 minutes: the "fast" recipe (fastmoe_adv/recipes.py: nine width-64
# experts, 16,000 training images, 4 + 2 epochs) trained as DWF, next to its baselines at the same
# budget (one PGD-AT ResNet-18, the phase-1 experts under the uniform gate, gate-only training),
# all evaluated on a 2,000-image holdout carved from the TRAINING split (clean, PGD-20, the "quick"
# preset) with 95% intervals; gate diagnostics for the mixtures. Prints the table last.
#
#   bash benchmarks/run_gpu_cifar10.sh DATA [OUT]
#
# DATA: a folder holding cifar-10-python.tar.gz (or cifar-10-batches-py/), an .npz file, or a folder
# holding exactly one .npz file. A subset that fits a 64 MiB upload (18,000 images):
#   python -m fastmoe_adv.experiments subset --data-dir DIR --out c10_18k.npz --subset-images 18000
# OUT: the run folder (default runs/gpu_cifar10); finished phases in it are reused, so a rerun after
# an interruption continues. Writes OUT/baselines.{json,md}, OUT/run.log and one folder per arm.
#
# Environment overrides (the CPU check of this script uses them to shrink everything):
#   PYTHON (default .venv/bin/python if present, else python), DEVICE (cuda), RECIPE (fast),
#   EVAL_IMAGES (2000), PRESET (quick), PRESET_IMAGES (all), GATE_IMAGES (256),
#   PGD_AT_BATCH_SCALE (9: the PGD-AT model takes DWF's step count at 9x the batch),
#   PGD_STEPS (20), THREADS (unset), EXTRA (more arguments, e.g. "--set pretrain_epochs=6").
set -euo pipefail

DATA=${1:?usage: run_gpu_cifar10.sh DATA [OUT]}
OUT=${2:-runs/gpu_cifar10}
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

if [[ -f "$DATA" && "$DATA" == *.npz ]]; then
    DATASET=npz
elif [[ -f "$DATA/cifar-10-python.tar.gz" || -d "$DATA/cifar-10-batches-py" ]]; then
    DATASET=cifar10
else
    shopt -s nullglob
    found=("$DATA"/*.npz)
    if [[ ${#found[@]} -ne 1 ]]; then
        echo "run_gpu_cifar10.sh: expected DATA to hold cifar-10-python.tar.gz, cifar-10-batches-py/ or one .npz" \
             "file, got $DATA (${#found[@]} .npz files)" >&2
        exit 2
    fi
    DATA=${found[0]}
    DATASET=npz
fi

mkdir -p "$OUT"
args=(baselines --dataset "$DATASET" --data-dir "$DATA" --out "$OUT" --recipe "${RECIPE:-fast}"
      --device "${DEVICE:-cuda}" --eval-images "${EVAL_IMAGES:-2000}" --preset "${PRESET:-quick}"
      --gate-images "${GATE_IMAGES:-256}" --pgd-steps "${PGD_STEPS:-20}"
      --pgd-at-batch-scale "${PGD_AT_BATCH_SCALE:-9}")
[[ -n "${PRESET_IMAGES:-}" ]] && args+=(--preset-images "$PRESET_IMAGES")
[[ -n "${THREADS:-}" ]] && args+=(--threads "$THREADS")
# shellcheck disable=SC2206  # EXTRA is split on purpose: several flags in one variable
[[ -n "${EXTRA:-}" ]] && args+=($EXTRA)

echo "data: $DATA ($DATASET); out: $OUT; $("$PYTHON" -c 'import torch; print("torch", torch.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')"
start=$(date +%s)
"$PYTHON" -m fastmoe_adv.experiments "${args[@]}" 2>&1 | tee "$OUT/run.log"
end=$(date +%s)

echo
echo "wall time $((end - start)) s (budget 540 s); reports: $OUT/baselines.md, $OUT/baselines.json"
echo
sed -n '/^| model/,/^$/p' "$OUT/baselines.md"
