#!/usr/bin/env bash
# The GPU preset in one call on a lent CUDA machine (torch and transformers already there):
#   device run: bash benchmarks/run_gpu.sh     (results land in $OUT, then go to benchmarks/results/)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/bench.py --preset gpu --out "${OUT:-benchmarks/results}" 2>&1 | tee "${OUT:-/tmp}/gpu.log"
