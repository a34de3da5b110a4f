#!/usr/bin/env bash
# The checks that need CUDA, as one prepared run that writes one summary file. CI never runs this; on a
# GPU machine (sized for about 10 minutes on one H100/H200):
#
#   bash scripts/gpu_check.sh                 # summary in runs/gpu-check/summary.md, each step's log beside it
#   GPU_CHECK_OUT=DIR GPU_CHECK_BUDGET=420 bash scripts/gpu_check.sh   # elsewhere, ending within 420 s
#
# GPU_CHECK_BUDGET (seconds, default 1800) bounds the whole run: each step gets what is left of it (at most
# GPU_CHECK_STEP_TIMEOUT, default the budget), a step cut short is recorded with exit 124, and once less
# than 30 s is left the remaining steps are recorded as not run. Give it well under the time the machine is
# held for: a run killed from outside loses what it had not yet written.
#
# Steps (each one's output goes to its own log and into the summary; a failing step is recorded and the
# next one still runs; the exit status says whether any failed):
#   1. the gpu-marked tests (bf16: the sparse LM head's gradients against TRL's fused head)
#   2. benchmarks/lm_head.py with forking.sparse_lm_head auto, true (the fused-kernel sparse path) and false:
#      loss step and peak CUDA memory against stock TRL, bf16
#   3. benchmarks/step_time.py at rho 0.2 and 1.0
#   4. a bf16 quickstart
#   5. benchmarks/recipe_memory.py: the Qwen3-30B-A3B and GPT-OSS-20B recipes' geometry at 2 and 4 layers
#      (random init, one process, ZeRO off): activation peak and loss-step time per layer, and the GPUs
#      each recipe needs, planned for 80 GiB GPUs
#   6. routing replay from vLLM's routed experts (scripts/vllm_check.py), where vLLM is installed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-1800}  # seconds for the whole run
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-$BUDGET}  # seconds per step at most
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
FAILED=0

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || { echo "no CUDA device"; exit 1; }
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    python -c "import torch, trl, transformers; print(f'- {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
    git rev-parse --short HEAD 2>/dev/null | sed 's/^/- commit /'
} > "$SUMMARY"

step() {  # step NAME COMMAND...: run, log, append the log's tail to the summary
    local name=$1
    shift
    local log="$OUT/$name.log"
    local start=$SECONDS
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        printf '\n## %s\n\nnot run: the budget of %s s was spent\n' "$name" "$BUDGET" >> "$SUMMARY"
        FAILED=1
        return
    fi
    timeout "$((left < STEP_TIMEOUT ? left - 10 : STEP_TIMEOUT))" "$@" > "$log" 2>&1
    local status=$?
    {
        echo
        echo "## $name ($((SECONDS - start)) s, exit $status)"
        echo
        echo '```'
        echo "$ $*"
        tail -n 50 "$log"
        echo '```'
    } >> "$SUMMARY"
    if [ "$status" -ne 0 ]; then FAILED=1; fi
}

step gpu_tests python -m pytest -q -m gpu tests/
for setting in auto true false; do
    step "lm_head_sparse_$setting" python benchmarks/lm_head.py --repeats 5 --sparse-head "$setting"
done
for rho in 0.2 1.0; do
    step "step_time_rho_$rho" python benchmarks/step_time.py --rho "$rho" --rounds 3 --steps 8
done
step quickstart_bf16 python -m rlvr quickstart grpo.bf16=true "output_dir=$OUT/quickstart"
step recipe_memory python benchmarks/recipe_memory.py --gpu-gib 80
if python -c "import vllm" 2>/dev/null; then
    step vllm_routing_replay python scripts/vllm_check.py --out "$OUT/vllm-check"
else
    printf '\n## vllm_routing_replay\n\nvLLM is not installed: scripts/vllm_check.py did not run.\n' >> "$SUMMARY"
fi
cat "$SUMMARY"
exit "$FAILED"
