#!/usr/bin/env bash
# The CUDA path in one call of at most 10 minutes: what a first GPU must confirm.
#
#   bash bench/gpu_check.sh [RESULTS_FOLDER]          # on a machine with a GPU
#   bash bench/gpu_check.sh --dry-run [RESULTS_FOLDER] # every stage tiny on the CPU (tests/test_gpu_check.py)
#
# Stages, each under its own time limit (a hang loses that stage only), all within GPU_CHECK_BUDGET
# seconds (default 540): the environment (nvidia-smi, torch, CUDA, cuDNN, compute capability, native
# bf16, /dev/shm); train.py for 2 epochs on phantoms with the CUDA defaults (vnet preset, 128^3 patches,
# 1.5 mm, mixed precision by capability: bf16 natively, else fp16 with a GradScaler), then with
# --compile --gpu-augment; a run started on the CPU resumed on the GPU; the suite's tests marked cuda
# (a bf16 step, inference on CUDA against the CPU, the fp16 + GradScaler branch); bench/bench_infer.py
# on a 512x512x300 scan; bench/bench_train.py against MONAI's VNet at 128^3, batch 2, fp32 and bf16.
# RESULTS_FOLDER (default $OUT, else ./gpu_check_results) receives one log per stage and summary.txt
# (each stage's status, seconds and last lines), written as the stages end.
set -u
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
RESULTS=${1:-${OUT:-./gpu_check_results}}
BUDGET=${GPU_CHECK_BUDGET:-540}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export ABDOMEN_VNET_CACHE="$WORK/cache" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
START=$SECONDS
SUMMARY="$RESULTS/summary.txt"
FAILED=0

if [ $DRY = 1 ]; then
    DEVICE=cpu
    CASES=4
    PHANTOM_SPACING="8.0, 8.0, 8.0"
    # The CUDA defaults shrunk: the small preset on 16^3 patches at 8 mm, a few steps.
    TRAIN=(--device cpu --preset small --patch 16 --spacing 8 --batch-size 2 --steps-per-epoch 2 --epochs 1
           --workers 0)
    RESUME_CPU=(--device cpu --preset small --patch 16 --spacing 8 --batch-size 2 --steps-per-epoch 2 --epochs 1
                --workers 0)
    BENCH_TRAIN=(--device cpu --patch 16 --batch-size 2 --dtypes fp32 --steps 1 --warmup 0
                 --models ours-elu,monai --loader-patch 16 --loader-spacing 8 --loader-batches 1)
    BENCH_INFER=(--device cpu --synthetic 64,64,40 --preset small --spacing 8 --window 32 --repeats 1 --warmup 0)
    export TORCH_COMPILE_DISABLE=1  # --compile's code path without minutes of CPU compiling
    TESTS=tests/test_cuda.py  # collecting the whole suite only to skip its cuda tests takes longer
    LIMIT_TRAIN=120 LIMIT_COMPILE=120 LIMIT_RESUME=120 LIMIT_BENCH=120 LIMIT_TESTS=120
    echo "gpu_check dry run (CPU, tiny): $(date -u +%FT%TZ)" > "$SUMMARY"
else
    DEVICE=cuda
    CASES=8
    PHANTOM_SPACING=""
    # train.py's CUDA defaults (vnet, 128^3, 1.5 mm, mixed precision); 25 steps an epoch to fit the budget.
    TRAIN=(--device cuda --steps-per-epoch 25 --epochs 2)
    RESUME_CPU=(--device cpu --preset small --patch 32 --spacing 4 --batch-size 2 --steps-per-epoch 3 --epochs 1
                --workers 0)
    BENCH_TRAIN=(--device cuda --patch 128 --batch-size 2 --dtypes fp32,bf16 --models ours-prelu,monai
                 --steps 10 --warmup 3 --loader-batches 2)
    BENCH_INFER=(--device cuda --synthetic 512,512,300 --preset vnet --sw-batch 2 --repeats 2 --warmup 1)
    TESTS=tests/
    LIMIT_TRAIN=150 LIMIT_COMPILE=150 LIMIT_RESUME=90 LIMIT_BENCH=150 LIMIT_TESTS=120
    echo "gpu_check: $(date -u +%FT%TZ)" > "$SUMMARY"
fi
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); results $RESULTS" >> "$SUMMARY"
printf '%-16s %-8s %6s\n' stage status seconds >> "$SUMMARY"

# stage NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, capped by what is left of the budget,
# its output in NAME.log; appends its status (ok, FAILED exit N, TIMEOUT) and last lines to the summary.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then
        printf '%-16s %-8s %6s\n' "$name" SKIPPED - >> "$SUMMARY"
        echo "  (budget of ${BUDGET} s spent)" >> "$SUMMARY"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s): $*" > "$RESULTS/$name.log"
    if declare -F "$1" > /dev/null; then  # a function of this script: timeout runs it in a bash of its own
        set -- bash -c "$(declare -p WORK PY CASES PHANTOM_SPACING DEVICE RESUME_CPU); $(declare -f "$1"); $1"
    fi
    local t0=$SECONDS status
    timeout -k 10 "$limit" "$@" >> "$RESULTS/$name.log" 2>&1
    local rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT; FAILED=1 ;;
        *) status="FAILED($rc)"; FAILED=1 ;;
    esac
    printf '%-16s %-8s %6d\n' "$name" "$status" $((SECONDS - t0)) >> "$SUMMARY"
    {
        grep -E "parameters on|^error|Error|warning: out of memory" "$RESULTS/$name.log" | head -n 4
        grep -v '^\s*$' "$RESULTS/$name.log" | tail -n 4
    } | cut -c1-400 | sed 's/^/    /' >> "$SUMMARY"
}

environment() {
    nvidia-smi || echo "nvidia-smi: not available"
    df -h /dev/shm || true
    "$PY" - <<'EOF'
import os
import torch
from utils import mixed_precision_dtype
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{os.cpu_count()} CPU cores")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{torch.cuda.device_count()} device(s)")
    print(f"bf16 native: {torch.cuda.is_bf16_supported(including_emulation=False)}; "
          f"torch's default answer (emulation counted): {torch.cuda.is_bf16_supported()}")
print(f"mixed precision train.py and infer.py choose here: {mixed_precision_dtype(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))}")
EOF
}

phantoms() {
    "$PY" - "$WORK/data" "$CASES" "$PHANTOM_SPACING" <<'EOF'
import os, sys
from phantom import write_dataset
spacing = tuple(float(s) for s in sys.argv[3].split(",")) if sys.argv[3] else None
write_dataset(sys.argv[1], int(sys.argv[2]), seed=0, workers=min(8, os.cpu_count() or 1), progress=False,
              spacing=spacing)
print(f"{sys.argv[2]} phantoms in {sys.argv[1]}")
EOF
}

# The CPU run, then its --resume on the device (2 epochs in all): moments and scaler across devices.
resume() {
    "$PY" train.py --data "$WORK/data" --out "$WORK/runs" --run cpu_then_$DEVICE "${RESUME_CPU[@]}" &&
        "$PY" train.py --resume "$WORK/runs/cpu_then_$DEVICE" --device $DEVICE --epochs 2 &&
        "$PY" - "$WORK/runs/cpu_then_$DEVICE/last.pt" <<'EOF'
import sys
import torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print("history:", [(h["epoch"], round(h["train_loss"], 4), round(h["mean"], 4)) for h in ckpt["history"]])
EOF
}

stage environment 30 environment
stage phantoms 90 phantoms
stage train $LIMIT_TRAIN "$PY" train.py --data "$WORK/data" --out "$WORK/runs" --run defaults "${TRAIN[@]}"
stage resume $LIMIT_RESUME resume
stage cuda_tests $LIMIT_TESTS "$PY" -m pytest -q -m cuda "$TESTS"
stage bench_infer $LIMIT_BENCH "$PY" bench/bench_infer.py "${BENCH_INFER[@]}"
stage bench_train $LIMIT_BENCH "$PY" bench/bench_train.py "${BENCH_TRAIN[@]}"
stage train_compile $LIMIT_COMPILE "$PY" train.py --data "$WORK/data" --out "$WORK/runs" --run compiled \
    "${TRAIN[@]}" --compile --gpu-augment

echo "total $((SECONDS - START)) s; $([ $FAILED = 0 ] && echo 'every stage ok' || echo 'some stages did not pass')" \
    >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
