#!/usr/bin/env bash
# One prepared GPU check for smoe's fast MoE compute (issue 3), for a fresh H100/H200 machine with torch
# and triton installed system-wide (no .venv, no network). Run from the repository root:
#     bash benchmarks/gpu_check.sh            # writes logs and JSON under $OUT (default ./out)
# Steps (each under its own timeout, 600 s at most in all; a failing step does not stop the next), the figures first:
#   1. one MoE layer, 8x7B expert shapes (D 4096, H 14336, E 8, top-2), bf16 forward, 1..8192 tokens:
#      smoe triton vs torch grouped_mm, transformers' block, smoe grouped, the dense-equivalent and the
#      touched experts' own matmuls (+ naive, the reference of the max-abs-diff check printed in the JSON)
#   2. decode batch 1 of the mixtral-8x7b preset with random bf16 weights vs the HBM roofline: all 32 layers
#      (~87 GiB) when the GPU has > 120 GiB (H200), else 16 layers (H100), reported as a roofline fraction
#      and extrapolated to 32 layers at that fraction; eager decode, the CUDA graph of the eager step
#      (smoe-aot) and of the torch.compile'd step (smoe-jit); then the GPU kernels of one decode step by
#      name (benchmarks/step_profile.py), eager and compiled
#   3. correctness on CUDA: the Triton MoE cases (tests/kernels/triton_cases.py) and the CUDA-graph decode tests
set -u -o pipefail
set -x
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="$(command -v python3 || command -v python)"
status=0
step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, remember a failure, carry on
    local name="$1" limit="$2"
    shift 2
    echo "=== $name ($(date +%T))" | tee -a "$OUT/summary.txt"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "=== $name rc=$rc" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

step env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30, \"GiB\")'; $PY -c 'import pytest, hypothesis' || echo 'pytest/hypothesis missing'"

# 1. the MoE layer on the GPU
step moe_layer 110 "$PY" benchmarks/moe_layer.py --device cuda --preset mixtral-8x7b --dtypes bfloat16 --modes fwd \
    --tokens 1 4 16 64 256 1024 4096 8192 --impls triton torch_grouped_mm grouped hf_grouped_mm dense naive matmuls --repeat 10 \
    --out "$OUT/moe_layer_gpu.json"

# 2. decode at the 8x7B shape against the roofline
MEM_GIB=$("$PY" -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))" 2>/dev/null || echo 0)
NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo unknown)
case "$NAME" in
    *H200*) PEAK=4800 ;;
    *H100*) PEAK=3350 ;;
    *) PEAK=0 ;;
esac
if [ "$MEM_GIB" -gt 120 ]; then LAYERS=32; else LAYERS=16; fi
PEAK_ARG=()
[ "$PEAK" -gt 0 ] && PEAK_ARG=(--peak-bandwidth "$PEAK")
step decode 210 "$PY" benchmarks/decode.py --device cuda --models mixtral-8x7b --layers "$LAYERS" --dtypes bfloat16 \
    --batches 1 --impls smoe smoe-aot smoe-jit --repeat 3 --short 8 --long 40 ${PEAK_ARG[@]+"${PEAK_ARG[@]}"} \
    --out "$OUT/decode_gpu.json"

# 2b. the kernels of one eager decode step (4 layers of 8x7B), by name: what a token costs beyond the weights
step step_profile 60 "$PY" benchmarks/step_profile.py --model mixtral-8x7b --layers 4 --out "$OUT/step_profile.json"
step step_profile_jit 80 "$PY" benchmarks/step_profile.py --model mixtral-8x7b --layers 4 --compile jit \
    --out "$OUT/step_profile_jit.json"

# 3. correctness (pytest if present; the layer benchmark above also prints triton-vs-naive differences)
if "$PY" -c "import pytest" 2>/dev/null; then
    step correctness 120 "$PY" -m pytest -q --maxfail=5 -p no:cacheprovider -m "" tests/kernels/test_triton_moe.py \
        tests/kernels/test_decode_compile.py::test_cuda_graph_decode_gives_the_eager_tokens \
        tests/kernels/test_decode_compile.py::test_cuda_graph_of_the_compiled_step_gives_the_eager_tokens
else
    echo "pytest missing: correctness only through the benchmark's max_abs_diff" | tee -a "$OUT/summary.txt"
fi

echo "overall status $status (0: every step passed)" | tee -a "$OUT/summary.txt"
exit "$status"
