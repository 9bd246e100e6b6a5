#!/usr/bin/env bash
# Everything issue 7 asks of a lent GPU, as one command (at most about 9 minutes on an H200):
# the CUDA tests, then the bf16 benchmarks side by side with timm. Runs from the repository
# root with the machine's own python3 (torch, timm, triton there; nothing installed), logs and
# JSON reports under $OUT (or /tmp/gpu_check). Through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
# then copy the tables into benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
    git log -1 --format='commit %H %cd' 2>/dev/null
} 2>&1 | tee "$OUT/machine.txt"

# 1. Exactness on the GPU: every attn_impl against the reference (float32, bf16), the compiled
#    Triton kernels against their PyTorch form, the GPU bench path.
timeout 170 $PY -m pytest -q -p no:cacheprovider --timeout=120 \
    tests/test_gpu.py tests/test_triton_attention.py tests/test_bench.py -k "gpu or kernel or backward or padded" \
    2>&1 | tee "$OUT/tests.log"

# 2. Speed, Swin-T 224 bf16: swinkit's default (auto -> sdpa on CUDA) and its other paths, timm.
bench() {
    local name=$1 limit=$2
    shift 2
    timeout "$limit" $PY -m swinkit bench "$@" --device cuda --dtype bfloat16 --json "$OUT/$name.json" 2>&1 |
        tee "$OUT/$name.log"
}
# Most important first: whatever a timeout cuts is the least needed.
bench swin_t 200 swin_t --compare timm --impls triton,sdpa,fused,reference \
    --batch-size 128 --train-batch-size 64 --memory --rounds 8
bench swinv2_t 80 swinv2_t --compare timm --impls triton,sdpa --batch-size 128 --train-batch-size 64 --rounds 6
bench swin_t_compile 100 swin_t --compare timm --compile --batch-size 128 --train-batch-size 64 --rounds 4
exit 0
