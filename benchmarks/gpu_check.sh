#!/usr/bin/env bash
# What issue 7 asks of a lent GPU but torch.compile (see the end), as one command (at most about
# 9.3 minutes on an H200): the CUDA tests, then the bf16 benchmarks side by side with timm and a
# profile. Runs from the repository root with the machine's own python3 (torch, timm, triton
# there; nothing installed); one log, $OUT/gpu_check.log, and a JSON report per `swinkit bench`
# under $OUT (or /tmp/gpu_check): three files,
# inside the 8 the device tool brings back. Through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
# then copy the tables into benchmarks/RESULTS.md. Sized from the 2026-12-04 runs on an H200:
# the GPU tests took about 3.5 minutes (Triton compiles and autotunes each kernel per shape), a
# Swin-T bench with three contenders under a minute, torch.compile more than 75 s per model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
    git log -1 --format='commit %H %cd' 2>/dev/null
} 2>&1 | tee "$LOG"

# 1. Exactness on the GPU: every attn_impl against the reference (float32; bf16 against the
#    reference's own bf16 error), the compiled Triton kernels against their PyTorch form, the GPU
#    bench path. -v names each test as it ends, so a timeout still shows how far it got.
#    (The compile-without-a-GPU tests are left to CI: here the kernels compile for real.)
timeout 240 $PY -m pytest -v --tb=short -p no:cacheprovider --timeout=100 \
    tests/test_gpu.py tests/test_triton_attention.py tests/test_bench.py \
    -k "(gpu or kernel or backward or padded) and not compile_for" 2>&1 | tee -a "$LOG"

# 2. Speed, bf16, batch 128 (the official recipe's per-GPU batch; at 64 every implementation
#    trained at the same 44.9 ms, apparently bound by the host): swinkit's default (auto -> triton
#    on CUDA) and other paths, timm.
bench() {
    local name=$1 limit=$2
    shift 2
    timeout "$limit" $PY -m swinkit bench "$@" --device cuda --dtype bfloat16 --json "$OUT/$name.json" 2>&1 |
        tee -a "$LOG"
}
# Most important first: whatever a timeout cuts is the least needed. The limits sum to 550 s,
# inside the tool's 600 s per command (the machine's start is not counted in it).
bench swin_t 110 swin_t --compare timm --impls reference,sdpa --batch-size 128 --train-batch-size 128 --memory --rounds 8
# The triton path's norm kernels on and off, inference and training, side by side: built without a GPU.
timeout 80 $PY benchmarks/triton_norms.py --batch 128 --train-batch 128 --rounds 5 --repeats 5 2>&1 | tee -a "$LOG"
# Where a training step's time goes, the host's or the GPU's (wall against kernel time): every
# attn_impl trained at the same 44.9 ms at batch 64 on 2026-12-04.
timeout 70 $PY benchmarks/gpu_profile.py swin_t 128 swinkit timm 2>&1 | tee -a "$LOG"
bench swinv2_t 50 swinv2_t --compare timm --batch-size 128 --train-batch-size 128 --rounds 4
# Not here: torch.compile (`--compare timm,swinkit+compile`) compiled for more than 75 s and 100 s
# on 2026-12-04 and was cut both times; it needs a device call of its own, with 300 s or more.
exit 0
