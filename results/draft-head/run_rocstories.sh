#!/bin/sh
# The learned draft head against the self-draft on ROCStories (sentence 3 hidden with its true
# length, the paper's protocol; `asarm eval rocstories`), asarm-en-small (version 3, float32, with
# its shipped head), 1 torch thread, seed 0, 8 stories per sampling call (passes and rounds are
# per row and do not depend on the batch). Usage: sh results/draft-head/run_rocstories.sh [LIMIT]
LIMIT=${1:-300}
OUT=results/draft-head/rocstories
export OMP_NUM_THREADS=1
common="--model asarm-en-small --limit $LIMIT --threads 1 --seed 0 --output $OUT --no-progress --batch-size 8"
for draft in head self; do
  for variant in "" "--one-pass"; do
    asarm eval rocstories $common --method assd --draft $draft -k 5 $variant
  done
done
asarm eval rocstories $common --method sequential
