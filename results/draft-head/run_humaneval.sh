#!/bin/sh
# The learned draft head against the self-draft on HumanEval single-line infilling (the reference
# line hidden with its true token length; `asarm eval humaneval-infilling`), asarm-py-small
# (version 3, float32) with its head, 1 torch thread, seed 0, 8 tasks per sampling call.
# Usage: sh results/draft-head/run_humaneval.sh [LIMIT] [MODEL]
# MODEL: a directory holding the model and its draft_head.* files (default: the shipped model).
LIMIT=${1:-150}
MODEL=${2:-asarm-py-small}
OUT=results/draft-head/humaneval-single-line
export OMP_NUM_THREADS=1
common="--model $MODEL --variant single-line --limit $LIMIT --threads 1 --seed 0 --output $OUT --no-progress --batch-size 8 --workers 2"
for draft in head self; do
  for variant in "" "--one-pass"; do
    asarm eval humaneval-infilling $common --method assd --draft $draft -k 5 $variant
  done
done
