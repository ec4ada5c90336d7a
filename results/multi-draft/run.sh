#!/bin/sh
# Multi-draft verification (--branches) on the WikiText-2 paper protocol (95% hidden, 128-token
# chunks), asarm-en-small (version 3, float32), 1 torch thread, seed 0, 8 chunks per sampling call
# (passes and rounds are per row and do not depend on the batch). Every configuration, the
# one-chain baselines included, runs here side by side; records are keyed by configuration, so a
# larger LIMIT resumes. Usage: sh results/multi-draft/run.sh [LIMIT] [MODEL] [PART]
# MODEL: a directory holding the model and its draft_head.* files (default: the shipped model).
# PART: self, head or all (default).
LIMIT=${1:-64}
MODEL=${2:-asarm-en-small}
PART=${3:-all}
OUT=results/multi-draft
export OMP_NUM_THREADS=1
common="--model $MODEL --length 128 --limit $LIMIT --evaluator self --threads 1 --seed 0 --output $OUT --no-progress --batch-size 8"
if [ "$PART" != head ]; then
  asarm eval wikitext $common --method sequential  # the quality reference
  for branches in 1 2 3; do
    asarm eval wikitext $common --method assd --draft self -k 5 --one-pass --branches $branches
  done
  asarm eval wikitext $common --method assd --draft self -k 5 --branches 3
fi
if [ "$PART" != self ]; then
  for branches in 1 2 3 4; do
    asarm eval wikitext $common --method assd --draft head -k 5 --one-pass --branches $branches
  done
  for branches in 1 3; do
    asarm eval wikitext $common --method assd --draft head -k 5 --branches $branches
  done
fi
