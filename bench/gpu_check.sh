#!/usr/bin/env bash
# One prepared GPU check on one H100 or H200 (at most 8 minutes; the script stops itself at
# --max-seconds 420): full-size CogVLM2 with random bf16 weights made on the GPU (no download),
# measured through the engine. Needs CUDA torch + transformers (+ triton); the JSON is written
# after every figure, so a run cut short by `timeout` still leaves what it measured.
#   bash bench/gpu_check.sh [extra gpu_check.py flags]
# Writes ${OUT:-bench/results}/gpu_check.json and prints it. See docs/benchmarks-howto.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || true
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.version.cuda)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, not installed
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
timeout -k 20 480 python3 bench/gpu_check.py --device cuda --preset full --output "$out_dir/gpu_check.json" "$@"
