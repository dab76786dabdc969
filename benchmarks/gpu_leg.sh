#!/usr/bin/env bash
# The GPU leg of the benchmark suite in one bounded command, for a GPU machine lent for a few
# minutes (torch, transformers and onnxruntime already installed there; tensorly installed
# beside them). Every run is appended to RESULTS_DIR/speed.jsonl as it finishes, so a step cut
# short by its time limit still leaves the runs it completed.
#
#   bash benchmarks/gpu_leg.sh RESULTS_DIR [SECONDS] [PLAN]
#
# PLAN "full" (the default):
# 1. eager, float32 and bfloat16: every default variant of ResNet-50, ViT-B/16 and BERT-base at
#    batch 1, 64 and 256 (3 fresh processes per model, the variants taking turns in each;
#    searched variants built once per dtype, their layers timed on the GPU in that dtype);
# 2. torch.compile (inductor), bfloat16 then float32: the original and the quantized variant
#    (compiling is what takes the time: minutes per model on a cold cache);
# 3. fxlrd's CUDA unit tests.
# PLAN "followup" (what a first full leg could not finish in its lease):
# 1. fxlrd's CUDA unit tests;
# 2. BERT-base eager, bfloat16 and float32: original, vanilla, quantized (building the searched
#    variants took most of a lease's minutes: quantized@vanilla alone 66 s);
# 3. ViT-B/16 eager bfloat16 with its searched variant's layers timed in bfloat16 at batch 64
#    (the first batch size is the one the search times at);
# 4. torch.compile of ViT-B/16 and BERT-base, bfloat16 then float32, original and quantized.
# PLAN "rest" (what the first two leases left):
# 1. ResNet-50 eager in channels_last (cuda_bf16_cl, cuda_cl): original, quantized, merged;
# 2. torch.compile of BERT-base, bfloat16 then float32, original and quantized;
# 3. training steps on the GPU (forward, backward, SGD) at batch 64, each freezing policy:
#    ResNet-50 in NCHW and in channels_last, then ViT-B/16 and BERT-base.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_leg.sh RESULTS_DIR [SECONDS] [full|followup|rest]}
budget=${2:-540}
plan=${3:-full}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
work=${TMPDIR:-/tmp}/fxlrd-gpu-leg
mkdir -p "$out"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '·', torch.cuda.get_device_name(), '· onnxruntime providers', o.get_available_providers())"

step() {  # step NAME SECONDS ARGS...: one suite command, cut at SECONDS
    local name=$1 limit=$2
    shift 2
    echo "== $name: up to ${limit} s (at $((SECONDS - start)) s)"
    if ((limit < 30)); then echo "== $name: skipped, no time left"; return; fi
    timeout --kill-after=10 "$limit" python3 -m benchmarks gpu "$@" --results-dir "$out" --work-dir "$work"
    echo "== $name: exit $? after $((SECONDS - start)) s"
}

unit_tests() {
    echo "== CUDA unit tests (at $((SECONDS - start)) s)"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_factorized.py tests/test_io.py tests/test_transformers.py -k cuda
}

case $plan in
full)
    step eager $(($(left) - 240)) --backends cuda cuda_bf16
    step compile $(($(left) - 45)) --backends cuda_compile_bf16 cuda_compile --variants original quantized
    unit_tests
    ;;
followup)
    unit_tests
    step bert-eager $((($(left) - 60) * 2 / 5)) --models bert_base --backends cuda_bf16 cuda --batch 64 256 1 \
        --variants original vanilla quantized
    step vit-bf16-search $((($(left) - 60) / 3)) --models vit_b_16 --backends cuda_bf16 \
        --variants original quantized optimized --batch 64 256 1
    step compile $(($(left) - 10)) --models vit_b_16 bert_base --backends cuda_compile_bf16 cuda_compile \
        --variants original quantized --batch 64 256 1
    ;;
rest)
    step resnet-channels-last $((($(left) - 20) / 5)) --models resnet50 --backends cuda_bf16_cl cuda_cl \
        --variants original quantized merged --batch 64 256 1
    step bert-compile $((($(left) - 20) * 11 / 20)) --models bert_base --backends cuda_compile_bf16 cuda_compile \
        --variants original quantized --batch 64 256 1
    train() {  # train NAME SECONDS ARGS...: the training suite on the GPU, cut at SECONDS
        local name=$1 limit=$2
        shift 2
        echo "== $name: up to ${limit} s (at $((SECONDS - start)) s)"
        if ((limit < 30)); then echo "== $name: skipped, no time left"; return; fi
        timeout --kill-after=10 "$limit" python3 -m benchmarks training --backends cuda --batch 64 "$@" \
            --results-dir "$out" --work-dir "$work"
        echo "== $name: exit $? after $((SECONDS - start)) s"
    }
    train resnet-training $((($(left) - 10) / 2)) --models resnet50 --layouts nchw channels_last
    train transformer-training $(($(left) - 10)) --models vit_b_16 bert_base
    ;;
*) echo "unknown plan: $plan (full, followup or rest)"; exit 2 ;;
esac
echo "== done after $((SECONDS - start)) s"
