#!/usr/bin/env bash
# The GPU checks, for a machine with CUDA: tests on the GPU, `asarm bench` in fp32 and bf16, and
# the cached-pass profile against the weight-only pass. Run from the repository root:
#     OUT=gpu-results bash scripts/gpu_checks.sh
# Works from the source tree (PYTHONPATH=src) where the package cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
if $PY -c "import pytest, scipy" 2>/dev/null; then
  $PY -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/tests-cuda.txt"
else
  echo "pytest or scipy missing: GPU tests not run" | tee "$OUT/tests-cuda.txt"
fi
$PY scripts/profile_cached_pass.py --device cuda --length 512 2>&1 | tee "$OUT/profile-cuda-fp32.txt"
$PY scripts/profile_cached_pass.py --device cuda --dtype bf16 --length 512 2>&1 | tee "$OUT/profile-cuda-bf16.txt"
for dtype in fp32 bf16; do
  $PY -m asarm.cli bench --device cuda --dtype "$dtype" --window 6 --out "$OUT/bench-cuda-$dtype"
  $PY -m asarm.cli bench --device cuda --dtype "$dtype" --suite speedups --lengths 512 --settings 95% \
      --window 6 --out "$OUT/bench-speedups-cuda-$dtype"
done
