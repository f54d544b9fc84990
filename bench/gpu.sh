#!/usr/bin/env bash
# What a lent GPU is for, most valuable first, within a time budget, with nothing from the network and
# nothing installed:
#   bash bench/gpu.sh [OUTPUT_DIR]       (default: $OUT when set, else gpu-results; PYTHON picks the interpreter)
# GPU_BUDGET_S (default 480, whole seconds): the seconds this script may run, from its start. A loan is
# 15 minutes of device time, the machine's start included, and one command runs 10 at most: the
# default returns within one command and leaves the loan time for a second one. Each step runs under
# `timeout` (SIGINT, so pytest still prints its summary; SIGKILL 10 s later), capped at what the budget
# has left less those 10 s; a step whose minimum no longer fits is skipped, and summary.txt says which.
# The benchmark writes after each workload, so one cut short keeps what it finished; tune writes only
# at its end. GPU_STEPS (comma-separated) runs those steps, in that order, instead of the default list
# (a second command: GPU_STEPS=tune,bench).
# 0. preflight (bench/preflight.py): CUDA visible to torch, a C compiler and Python.h (Triton builds
#    its launcher with them), the packages and their versions; stops here, naming what is missing.
# 1. tritongpt2 made importable without pip (no network, and setuptools < 70.1 cannot build an
#    editable install without the `wheel` package): a folder of symlinks on PYTHONPATH, laid out as
#    pyproject.toml maps the packages (bench/package_overlay.py); commands run as python -m tritongpt2.cli.
# The steps (minimum / cap in seconds; durations are estimates: no GPU has run this script yet):
#   tests-gpu (20 / 120): tests/test_gpu.py, what only a GPU can check: CUDA-graph replays against the
#       eager kernels, float16 and bfloat16 parity with transformers, greedy generation;
#   bench (60 / 240): gpt2 in float16 on BENCH_WORKLOADS (default: decode 1x1024, decode 8x1024, embed
#       1x128, prefill 1x1024) against every baseline, results written after each workload, then
#       README's GPU table from them;
#   tune (150 / 240; 600 / 1200 for all four sizes): every decode tile candidate of TUNE_MODELS' decode
#       products timed (default gpt2, 52 candidates; all four sizes with a budget of 1200 s or more;
#       about a second of compiling per candidate),
#       the fastest written into kernels/decode_tuning.json in this checkout (later steps run with
#       them) and with every candidate's report into OUTPUT_DIR/tune, then one gpt2 decode step's GB/s
#       per kernel and ms/token against transformers (tune/decode-step.md);
#   tests-all (600 / 1200): the whole test suite compiled on the GPU (float16 and bfloat16 join float32);
#   bench-all (600 / 1500): the full benchmark (BENCH_MODELS, default all four sizes, both half
#       dtypes, every workload), then README's table from it.
#   The last two, and tuning all four sizes, need a loan whose commands may run past 10 minutes.
# The compile and traffic audits need no GPU: any machine runs them (tritongpt2 audit).
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
out="${1:-${OUT:-gpu-results}}"
budget="${GPU_BUDGET_S:-480}"
workloads="${BENCH_WORKLOADS:-decode 1x1024,decode 8x1024,embed 1x128,prefill 1x1024}"
kill_after=10
if ! [[ "$budget" =~ ^[0-9]+$ ]]; then
  echo "gpu.sh: GPU_BUDGET_S must be whole seconds, got '$budget'" >&2
  exit 2
fi
chosen=()
IFS=, read -r -a listed <<< "${GPU_STEPS:-tests-gpu,bench,tune,tests-all,bench-all}"
for name in "${listed[@]}"; do
  name="${name//[[:space:]]/}"
  case "$name" in
    tests-gpu|bench|tune|tests-all|bench-all) chosen+=("$name") ;;
    *) echo "gpu.sh: GPU_STEPS names an unknown step, '$name' (known: tests-gpu, bench, tune, tests-all, bench-all)" >&2; exit 2 ;;
  esac
done
if [ "$budget" -ge 1200 ]; then
  tune_models="${TUNE_MODELS:-gpt2,gpt2-medium,gpt2-large,gpt2-xl}"
else
  tune_models="${TUNE_MODELS:-gpt2}"
fi
if [[ "$tune_models" == *,* ]]; then tune_limits=(600 1200); else tune_limits=(150 240); fi
mkdir -p "$out"
unset TRITON_INTERPRET TRITONGPT2_BACKEND

{ nvidia-smi || true; } > "$out/device.txt" 2>&1
"$python" bench/preflight.py 2>&1 | tee -a "$out/device.txt"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "gpu.sh: preflight failed (above, and in $out/device.txt): nothing was run" >&2
  exit 1
fi

overlay="$(mktemp -d)"
trap 'rm -rf "$overlay"' EXIT
"$python" bench/package_overlay.py "$overlay" > /dev/null || { echo "gpu.sh: could not lay out the tritongpt2 package" >&2; exit 1; }
export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import tritongpt2.cli" || { echo "gpu.sh: tritongpt2 does not import (above)" >&2; exit 1; }

status=0
# run NAME MINIMUM_S CAP_S COMMAND...: the command under timeout, its output in NAME.log. Returns 0 if
# it ran and passed, 1 if it ran and failed or was cut short, 2 if it was skipped.
run() {
  local name=$1 minimum=$2 cap=$3; shift 3
  local left=$(( budget - SECONDS - kill_after ))
  if [ "$left" -lt "$minimum" ]; then
    echo "== $name: skipped, ${left} s of the budget left, it needs ${minimum}" | tee -a "$out/summary.txt"
    return 2
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "== $name (at most ${limit} s): $*" | tee -a "$out/summary.txt"
  timeout -s INT --kill-after="$kill_after" "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "   cut short after ${limit} s, or killed (what it wrote is kept)" | tee -a "$out/summary.txt"
  else
    echo "   exit $rc" | tee -a "$out/summary.txt"
  fi
  [ $rc -eq 0 ] || status=1
  [ $rc -eq 0 ] || return 1
}

# README's GPU table from the first results file in a bench folder.
readme_table() {
  local results
  results="$(ls "$1"/*.json 2> /dev/null | head -n 1)"
  if [ -z "$results" ]; then
    echo "   no benchmark results in $1, so no README table" | tee -a "$out/summary.txt"
    status=1
    return
  fi
  "$python" -m tritongpt2.bench.readme_table "$results" README.md >> "$out/readme-table.log" 2>&1 || status=1
  cp README.md "$out/README.md"
}

for name in "${chosen[@]}"; do
  case "$name" in
    tests-gpu) run tests-gpu 20 120 "$python" -m pytest -q -ra tests/test_gpu.py ;;
    bench)
      run bench 60 240 "$python" -m tritongpt2.cli bench --models gpt2 --dtypes float16 --workloads "$workloads" --output "$out/bench"
      [ $? -eq 2 ] || readme_table "$out/bench" ;;
    tune) run tune "${tune_limits[0]}" "${tune_limits[1]}" "$python" -m tritongpt2.cli tune --models "$tune_models" --output "$out/tune" ;;
    tests-all) run tests-all 600 1200 "$python" -m pytest -q -ra ;;
    bench-all)
      run bench-all 600 1500 "$python" -m tritongpt2.cli bench --output "$out/bench-all" ${BENCH_MODELS:+--models "$BENCH_MODELS"}
      [ $? -eq 2 ] || readme_table "$out/bench-all" ;;
  esac
done
echo "gpu.sh: ${SECONDS} s of a ${budget} s budget" | tee -a "$out/summary.txt"
exit $status
