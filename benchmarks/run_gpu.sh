#!/usr/bin/env bash
# Every benchmark's gpu preset in one call on a lent CUDA machine (torch and transformers already there):
#   device run: bash benchmarks/run_gpu.sh     (results land in $OUT, then go to benchmarks/results/)
# Ray and vLLM parts run where those are installed (carry their wheels), and are skipped, saying so, otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/bench.py --preset gpu --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
if python3 -c "import ray" 2>/dev/null; then
    python3 benchmarks/bench_corpus.py --preset gpu --out "$OUT" 2>&1 | tee "$OUT/corpus-gpu.log"
else
    echo "ray is not installed: corpus-gpu skipped"
fi
if python3 -c "import vllm" 2>/dev/null; then
    python3 benchmarks/bench_serving.py --preset gpu --out "$OUT" 2>&1 | tee "$OUT/serving-gpu.log"
else
    echo "vllm is not installed: serving-gpu skipped"
fi
