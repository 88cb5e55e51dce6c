#!/usr/bin/env bash
# The one-shot GPU check (`make gpu-check OUT=dir`): at most ~10 minutes on one H100/H200 (the step
# limits, 200 + 100 + 180 + 120 s, bound it at 10; the first three were 240 + 120 + 240 before step 4).
#   1. the GPU-marked tests (large-vocabulary kernel cases, CUDA graphs), with their skip reasons;
#   2. `entcal bench kernels --json`  -> OUT/bench_kernels.json
#   3. benchmarks/bench_generate.py --json, every variant (entcal's sampler, HF generate, vLLM alone
#      and vLLM + entcal's re-score): at batch 64 on a random-weight Llama of Qwen2.5-0.5B's shape
#      (built once, no download); on CPU batch 8, 32 tokens, the bundled SmolLM2 -> OUT/bench_generate.json
#   4. benchmarks/vllm_support.py (CUDA only): engine: vllm in bf16 on that Llama, 64 rows x 128 tokens
#      under top-k and top-p decodings; per decoding, whether vLLM's sampler (Triton top-k / top-p)
#      drew each step from a larger or smaller set than entcal re-scores -> OUT/vllm_support.json
# Each step has its own time limit, so one that hangs cannot eat the others' time; every step's
# output is kept in OUT/<step>.log. On a machine without CUDA it runs what it can and says what it
# skipped. Exit status: the number of steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-test-output/gpu-check}"
mkdir -p "$out"
py=.venv/bin/python
failed=0

step() {  # step NAME LIMIT_S CMD...: run, keep the log, report pass/fail
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then
        echo "gpu-check: $name passed ($((SECONDS - start)) s)"
    else
        echo "gpu-check: $name FAILED (exit $?, $((SECONDS - start)) s); see $out/$name.log"
        tail -5 "$out/$name.log"
        failed=$((failed + 1))
    fi
}

$py - <<'PY' | tee "$out/device.txt"
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}; torch {torch.__version__}")
else:
    print("device: none (CPU only): the GPU tests skip and the kernel benchmark has no figures")
PY

step gpu-tests 200 "$py" -m pytest -q -rs -m gpu -p no:cacheprovider tests/kernels tests/tasks
grep -E "^SKIPPED" "$out/gpu-tests.log" | sed 's/^/gpu-check: /' || true
step bench-kernels 100 "$py" -m entcal.flows.cli bench kernels --json
json_line() { grep -E '^\{' "$1" | tail -1; }  # the result line (stderr shares the log, vLLM's included)
json_line "$out/bench-kernels.log" > "$out/bench_kernels.json"
if grep -q "device: none" "$out/device.txt"; then
    echo "gpu-check: no CUDA: bench-generate runs small (SmolLM2-135M, batch 8, 32 tokens, 1 repeat)" \
        "instead of batch 64 on a 0.5B Llama"
    gen_args=(--batch 8 --new-tokens 32 --repeats 1)
    if [ -n "${ENTCAL_GPU_CHECK_MODEL_PATH:-}" ]; then  # (the test suite's tiny model: the CPU part in CI)
        gen_args+=(--model-path "$ENTCAL_GPU_CHECK_MODEL_PATH" --prompts random)
    fi
else
    gen_args=(--batch 64 --random-llama 0.5b --prompts random)
fi
step bench-generate 180 "$py" benchmarks/bench_generate.py --json "${gen_args[@]}"
json_line "$out/bench-generate.log" > "$out/bench_generate.json"
if grep -q "device: none" "$out/device.txt"; then
    echo "gpu-check: vllm-support skipped: no CUDA (vLLM's GPU sampler, bf16 logits and Triton top-k / top-p," \
        "is what it measures; on CPU tests/tasks/test_vllm_engine.py checks the same comparison)"
else
    step vllm-support 120 "$py" benchmarks/vllm_support.py --random-llama 0.5b
    json_line "$out/vllm-support.log" > "$out/vllm_support.json"
    grep -E "^vllm_support " "$out/vllm-support.log" | sed 's/^/gpu-check: /' || true
fi
echo "gpu-check: JSON lines in $out/bench_kernels.json, $out/bench_generate.json (and on CUDA" \
    "$out/vllm_support.json); $failed step(s) failed"
exit "$failed"
