#!/usr/bin/env bash
# Cached ASSD tokens/s before and after the engine redesign, same command, same machine, back to
# back: OLD is a checkout of the commit before the redesign (e.g. `git worktree add /tmp/old 5d3a507`).
#   bash scripts/bench_old_vs_new.sh /tmp/old results/bench-engine-redesign
set -euo pipefail
OLD=${1:?path of a checkout of the old commit}
OUT=${2:-results/bench-engine-redesign}
PY=${PYTHON:-python}
ARGS=(bench --lengths 512 --settings 95% --batch-sizes 32 --only "cached ASSD self,B=32" --window 3)
for round in 1 2; do
  PYTHONPATH="$OLD/src" "$PY" -m asarm.cli "${ARGS[@]}" --out "$OUT/old-$round"
  PYTHONPATH=src "$PY" -m asarm.cli "${ARGS[@]}" --out "$OUT/new-$round"
done
