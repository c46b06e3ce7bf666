#!/usr/bin/env bash
# Every GPU check in one pass, for a machine with one CUDA GPU and the package importable (installed, or the
# repository on PYTHONPATH): the encoder benchmark in fp32 and bf16 (SDPA kernels named), the pretraining-step
# benchmark in bf16, the k-means benchmark on the GPU, then the whole test suite (slow tests included), where
# every `device: auto` path picks CUDA. Each step has a time limit; one log per step goes to OUT_DIR.
#
#   bash bench/gpu.sh [OUT_DIR]                  # default gpu_results/
#   STEP_LIMIT=100 bash bench/gpu.sh             # cap every step at 100 s (a short lease on a lent machine)
set -u
out=${1:-gpu_results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2 start rc
    [ -n "${STEP_LIMIT:-}" ] && [ "$STEP_LIMIT" -lt "$limit" ] && limit=$STEP_LIMIT
    shift 2
    echo "=== $name: $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    tail -n 40 "$out/$name.log"
    echo "=== $name: exit $rc after $(( $(date +%s) - start )) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"

step encoder_fp32 300 "$py" bench/encoder.py --device cuda --dtype fp32 --iters 20 --warmup 3
step encoder_bf16 300 "$py" bench/encoder.py --device cuda --dtype bf16 --batch 8 --seconds 10 --iters 20 --warmup 3
step pretrain_bf16 300 "$py" bench/pretrain.py --device cuda --precision bf16
step tests 900 "$py" -m pytest -q -p no:cacheprovider --timeout 120 tests
step kmeans_cuda 600 "$py" bench/kmeans.py --device cuda --threads 8
