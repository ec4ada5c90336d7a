#!/bin/sh
# The learned draft head against the self-draft on the WikiText-2 paper protocol (95% hidden,
# 128-token chunks), asarm-en-small (version 3, float32), 1 torch thread, seed 0, 8 chunks per
# sampling call (passes and rounds are per row and do not depend on the batch). Records are keyed
# by configuration, so a larger LIMIT resumes. Usage: sh results/draft-head/run.sh [LIMIT] [MODEL]
# MODEL: a directory holding the model and its draft_head.* files (default: the shipped model,
# which carries its head; the measured run used a copy of the shipped model with the same head files).
LIMIT=${1:-64}
MODEL=${2:-asarm-en-small}
OUT=results/draft-head
export OMP_NUM_THREADS=1
common="--model $MODEL --length 128 --limit $LIMIT --evaluator self --threads 1 --seed 0 --output $OUT --no-progress --batch-size 8"
for variant in "" "--one-pass" "--one-pass --adaptive-k" "--adaptive-k"; do
  asarm eval wikitext $common --method assd --draft head -k 5 $variant
done
for variant in "" "--one-pass"; do  # the self-draft on the same chunks (results/block-verification has its variants)
  asarm eval wikitext $common --method assd --draft self -k 5 $variant
done
asarm eval wikitext $common --method sequential  # the quality reference
