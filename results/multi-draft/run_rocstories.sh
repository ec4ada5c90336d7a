#!/bin/sh
# Multi-draft verification on ROCStories (sentence 3 hidden at its true length), asarm-en-small
# with its shipped head, float32, 1 torch thread, seed 0, 8 stories per sampling call; the
# one-chain baselines run here too. DRAFTS=self runs only the self-draft lines. Usage: sh results/multi-draft/run_rocstories.sh [LIMIT]
LIMIT=${1:-300}
OUT=results/multi-draft/rocstories
export OMP_NUM_THREADS=1
common="--model asarm-en-small --limit $LIMIT --threads 1 --seed 0 --output $OUT --no-progress --batch-size 8"
for draft in ${DRAFTS:-self head}; do
  for branches in 1 3; do
    asarm eval rocstories $common --method assd --draft $draft -k 5 --one-pass --branches $branches
  done
done
if [ "${DRAFTS:-head}" != self ]; then
  for branches in 1 3; do
    asarm eval rocstories $common --method assd --draft head -k 5 --branches $branches
  done
fi
