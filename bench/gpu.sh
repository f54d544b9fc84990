#!/usr/bin/env bash
# Everything a lent GPU is for, in one command, with nothing from the network:
#   bash bench/gpu.sh [OUTPUT_DIR]            (default: $OUT when set, else gpu-results)
# 1. the whole test suite compiled on the GPU (float16 and bfloat16 join float32),
# 2. the full benchmark with every baseline (BENCH_MODELS=gpt2,gpt2-xl to shorten it),
# 3. the compile audit of every kernel configuration (registers, spills, shared memory from ptxas).
# Each step runs even when an earlier one failed; the exit code says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
unset TRITON_INTERPRET TRITONGPT2_BACKEND

python -m pip install --quiet --no-index --no-deps --no-build-isolation -e . || exit 1
{
  nvidia-smi || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  python -c "import transformers; print('transformers', transformers.__version__)" || echo "transformers: not installed (baselines and parity tests skip)"
} > "$out/device.txt" 2>&1

status=0
step() {
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}

step tests python -m pytest -q -ra
step bench tritongpt2 bench --output "$out" ${BENCH_MODELS:+--models "$BENCH_MODELS"}
step compile-audit tritongpt2 audit compile --models gpt2,gpt2-medium,gpt2-large,gpt2-xl --json "$out/compile-audit.json"
cp "$out/compile-audit.log" "$out/compile-audit.md"
exit $status
