#!/usr/bin/env bash
# The checks that need CUDA, in bf16: the sparse LM head's gradients against TRL's fused head, the
# LM-head benchmark, the quickstart, and (where vLLM is installed) routing replay from vLLM's routed
# experts. CI never runs this; run it on a GPU machine:
#
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -m gpu tests/
python -m pytest -q tests/test_sparse_head.py
python benchmarks/lm_head.py --repeats 5 --sparse-head true
python -m rlvr quickstart grpo.bf16=true output_dir=runs/gpu-quickstart
if python -c "import vllm" 2>/dev/null; then
    python scripts/vllm_check.py --out runs/gpu-vllm-check
else
    echo "vLLM is not installed: the routing-replay-from-vLLM check (scripts/vllm_check.py) did not run"
fi
