#!/usr/bin/env bash
# Everything a lent GPU is for, in one command, with nothing from the network and nothing installed:
#   bash bench/gpu.sh [OUTPUT_DIR]       (default: $OUT when set, else gpu-results; PYTHON picks the interpreter)
# 0. preflight (bench/preflight.py): CUDA visible to torch, a C compiler and Python.h (Triton builds
#    its launcher with them), the packages and their versions; stops here, naming what is missing.
# 1. tritongpt2 made importable without pip (no network, and setuptools < 70.1 cannot build an
#    editable install without the `wheel` package): a folder of symlinks on PYTHONPATH, laid out as
#    pyproject.toml maps the packages (bench/package_overlay.py); commands run as python -m tritongpt2.cli.
# 2. tune (about 5 minutes on an H100, estimated, not yet measured): every decode tile candidate of
#    every decode product of gpt2 to gpt2-xl timed (float16, batch 1; 141 to ~180 kernel compiles at
#    about a second each are most of it), the fastest written into kernels/decode_tuning.json in this
#    checkout, so every later step runs with them, and a copy into OUTPUT_DIR/tune with the report of
#    every candidate; then one gpt2 decode step's GB/s per kernel and its ms/token against
#    transformers (sdpa + static cache + torch.compile): OUTPUT_DIR/tune/decode-step.md,
# 3. the whole test suite compiled on the GPU (float16 and bfloat16 join float32),
# 4. the full benchmark with every baseline (BENCH_MODELS=gpt2,gpt2-xl to shorten it), its results
#    written after each model and dtype,
# 5. the compile audit of every kernel configuration (with the tuned table: the tiles tune chose),
#    the same for every tuning candidate (about 2 minutes on 16 cores), and the traffic audit,
# 6. README.md's GPU table from the benchmark's results (a copy of README.md goes into the output too).
# Steps 2 to 6 each run even when an earlier one failed; the exit code says whether all passed. The
# whole script must finish within the GPU's 30 minutes: a new step says here about how long it takes.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
out="${1:-${OUT:-gpu-results}}"
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
step() {
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}

step tune "$python" -m tritongpt2.cli tune --output "$out/tune"
step tests "$python" -m pytest -q -ra
step bench "$python" -m tritongpt2.cli bench --output "$out/bench" ${BENCH_MODELS:+--models "$BENCH_MODELS"}
step compile-audit "$python" -m tritongpt2.cli audit compile --models gpt2,gpt2-medium,gpt2-large,gpt2-xl --json "$out/compile-audit.json"
cp "$out/compile-audit.log" "$out/compile-audit.md"
step compile-audit-candidates "$python" -m tritongpt2.cli audit compile --candidates --models gpt2,gpt2-medium,gpt2-large,gpt2-xl --json "$out/compile-audit-candidates.json"
step traffic-decode "$python" -m tritongpt2.cli audit traffic --workload decode --context 1024 --output "$out"
step traffic-prefill "$python" -m tritongpt2.cli audit traffic --workload prefill --context 128 --output "$out"
step traffic-embed "$python" -m tritongpt2.cli audit traffic --workload embed --context 16 --output "$out"
results="$(ls "$out"/bench/*.json 2> /dev/null | head -n 1)"
if [ -n "$results" ]; then
  step readme-table "$python" -m tritongpt2.bench.readme_table "$results" README.md
  cp README.md "$out/README.md"
else
  echo "gpu.sh: no benchmark results, so no README table" | tee -a "$out/summary.txt"
  status=1
fi
exit $status
