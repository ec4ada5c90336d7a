#!/bin/sh
# Token-wise vs block verification on the WikiText-2 paper protocol (95% hidden, 128-token chunks),
# shipped asarm-en-small, 1 torch thread, 8 chunks per sampling call (counts do not depend on the batch;
# per-row time is the call's time / 8). Every command appends to the same folder (records are
# keyed by configuration), so a larger --limit resumes. Usage: sh results/block-verification/run.sh [LIMIT]
LIMIT=${1:-64}
OUT=results/block-verification
export OMP_NUM_THREADS=1
common="--model asarm-en-small --length 128 --limit $LIMIT --evaluator self --threads 1 --seed 0 --output $OUT --no-progress --batch-size 8"
for variant in "" "--one-pass" "--one-pass --adaptive-k"; do
  for verification in token block; do
    asarm eval wikitext $common --method assd -k 5 $variant --verification $verification
  done
done
for verification in token block; do
  asarm eval wikitext $common --method assd --draft ngram -k 5 --bonus --verification $verification
done
# wall-clock, batch 1, paired and interleaved (the eval's times above are per row of a batch of 8, on a loaded machine):
# python scripts/verification_timing.py --chunks 6 --repeats 1 > $OUT/timing.txt
# sequential (quality reference; not run in the measured session for time): asarm eval wikitext $common --method sequential
