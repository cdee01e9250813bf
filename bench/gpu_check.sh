#!/usr/bin/env bash
# One prepared GPU check on one H100 (about 2-4 minutes, hard limit 8): full-size CogVLM2 with
# random bf16 weights made on the GPU (no download), measured through the engine.
#   bash bench/gpu_check.sh [extra gpu_check.py flags]
# Writes ${OUT:-bench/results}/gpu_check.json and prints it. See docs/benchmarks-howto.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.version.cuda)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, not installed
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
timeout 480 python bench/gpu_check.py --device cuda --preset full --output "$out_dir/gpu_check.json" "$@"
