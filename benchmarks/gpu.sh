#!/usr/bin/env bash
# On a machine with CUDA: the CUDA tests, then the GPU timings (benchmarks/results/gpu.md).
# Under 8 minutes on one H100/H200-class GPU; each part has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to do')" || exit 1
mkdir -p benchmarks/results
timeout 180 python -m pytest -q -n 0 -m cuda tests/test_cuda.py 2>&1 | tee benchmarks/results/gpu_tests.txt
timeout 300 python benchmarks/gpu.py --device cuda
