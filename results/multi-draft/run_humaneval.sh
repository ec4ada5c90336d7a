#!/bin/sh
# Multi-draft verification on HumanEval single-line infilling, asarm-py-small with its shipped
# head, float32, 1 torch thread, seed 0, 8 tasks per sampling call, tests run by 2 workers; the
# one-chain baselines run here too. DRAFTS=self runs only the self-draft lines. Usage: sh results/multi-draft/run_humaneval.sh [LIMIT]
LIMIT=${1:-100}
OUT=results/multi-draft/humaneval-single-line
export OMP_NUM_THREADS=1
common="--model asarm-py-small --variant single-line --limit $LIMIT --threads 1 --seed 0 --output $OUT --no-progress --batch-size 8 --workers 2"
for draft in ${DRAFTS:-self head}; do
  for branches in 1 3; do
    asarm eval humaneval-infilling $common --method assd --draft $draft -k 5 --one-pass --branches $branches
  done
done
if [ "${DRAFTS:-head}" != self ]; then
  for branches in 1 3; do
    asarm eval humaneval-infilling $common --method assd --draft head -k 5 --branches $branches
  done
fi
