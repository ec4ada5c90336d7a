#!/usr/bin/env bash
# The exact commands behind results/ (CPU, one torch thread per job, two jobs at a time).
# Usage: [JOBS=en|py] bash results/run_all.sh [EN_MODEL] [PY_MODEL]   (defaults: the shipped models)
# Every command resumes where it stopped when run again (same --output).
set -euo pipefail
cd "$(dirname "$0")/.."
EN=${1:-asarm-en-small}
PY=${2:-asarm-py-small}
ASARM=${ASARM:-$(command -v asarm || echo "python -m asarm.cli")}
COMMON="--threads 1 --no-progress --seed 0"

en_jobs() {
  # the paper's speed/quality table at the model's limit (128 tokens, its training length;
  # the paper's 512 exceeds it and is refused with a clear error)
  $ASARM eval wikitext --model "$EN" --length 128 --limit 200 --evaluator self $COMMON --output results/wikitext-L128
  # ROCStories: the paper's 1,000 stories, sequential + ASSD at k = 1, 2, 3, 5, 8
  $ASARM eval rocstories --model "$EN" --sweep-k $COMMON --output results/rocstories
  # k sweep on WikiText (sequential + ASSD self-draft at k = 1, 2, 3, 5, 8)
  $ASARM eval wikitext --model "$EN" --length 128 --limit 30 --evaluator self --sweep-k $COMMON --output results/wikitext-sweep-k
  # the faster exact ASSD variants side by side, and one-pass rounds at larger k
  $ASARM eval wikitext --model "$EN" --length 128 --limit 200 --evaluator self --speedups $COMMON --output results/wikitext-speedups
  $ASARM eval wikitext --model "$EN" --length 128 --limit 200 --evaluator self --method assd --one-pass --sweep-k 5,8,12 $COMMON --output results/wikitext-one-pass-sweep-k
}

py_jobs() {
  $ASARM eval humaneval-infilling --model "$PY" --variant single-line --max-tokens 256 --workers 1 $COMMON --output results/humaneval-single-line
  $ASARM eval humaneval-infilling --model "$PY" --variant random-span-light --max-tokens 256 --workers 1 $COMMON --output results/humaneval-random-span-light
  $ASARM eval humaneval-infilling --model "$PY" --variant multi-line --limit 200 --max-tokens 256 --workers 1 $COMMON --output results/humaneval-multi-line
  $ASARM eval humaneval-infilling --model "$PY" --variant random-span --limit 200 --max-tokens 256 --workers 1 $COMMON --output results/humaneval-random-span
  $ASARM eval humaneval-infilling --model "$PY" --variant single-line --limit 100 --sweep-k --max-tokens 256 --workers 1 $COMMON --output results/humaneval-single-line-sweep-k
}

# JOBS="en" or JOBS="py" runs one half (e.g. as soon as its model exists); default both at once
JOBS=${JOBS:-en py}
PIDS=()
for job in $JOBS; do
  ${job}_jobs > "results/${job}_jobs.log" 2>&1 &
  PIDS+=($!)
done
RC=0
for pid in "${PIDS[@]}"; do wait "$pid" || RC=$?; done
echo "jobs ($JOBS) finished with exit code $RC"
exit $RC
