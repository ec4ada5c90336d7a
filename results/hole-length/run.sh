#!/bin/sh
# The hole-length comparison (issue 13): oracle vs fixed vs learned-prior vs posterior lengths,
# greedy decoding. Resumable: rerun the same command to continue. One torch thread each (the
# machine is a shared 2-core CPU). Run from the repository root with asarm importable.
set -e
export OMP_NUM_THREADS=1
PY="${PYTHON:-python}"
"$PY" -c 'import sys; from asarm.cli import main; sys.exit(main())' eval rocstories --model asarm-en-small \
    --hole-length posterior --limit 500 --threads 1 --output results/hole-length/rocstories-asarm-en-small
# (rocstories-asarm-en-small and humaneval-single-line-asarm-py-small were made with version 1 of the
# shipped models; rocstories-asarm-en-small-v3 with the same command and version 3, into that folder)
# HumanEval single-line, all 1,033 tasks (program timeout 3 s: canonical solutions run in well under 1 s).
# humaneval-single-line-asarm-py-small is version 1's partial run (206 tasks) of this command;
# humaneval-single-line-asarm-py-small-v3 (all 1,033, version 3) came from scripts/hole_length_gpu.sh
# (the same command in 12 shards side by side on one H100), whose programs were then run again here
# (a sandbox bug on the GPU machine, since fixed, had failed every program there):
#   python scripts/rescore_humaneval_fills.py results/hole-length/humaneval-single-line-asarm-py-small-v3 --workers 2
"$PY" -c 'import sys; from asarm.cli import main; sys.exit(main())' eval humaneval-infilling \
    --variant single-line --model asarm-py-small --hole-length posterior --workers 2 --timeout 3 --threads 1 \
    --output results/hole-length/humaneval-single-line-asarm-py-small

# The order-mixture experiment (rocstories-orders-0, rocstories-orders-0.5): two English models
# trained side by side on one H100 by scripts/hole_length_gpu.sh (same recipe, seed and steps;
# random_order 0 vs 0.5), brought back to runs/orders-{0,0.5}/model, then evaluated here:
for p in 0 0.5; do
  [ -d "runs/orders-$p/model" ] || continue
  "$PY" -c 'import sys; from asarm.cli import main; sys.exit(main())' eval rocstories --model "runs/orders-$p/model" \
      --hole-length posterior --limit 500 --threads 1 --no-progress --output "results/hole-length/rocstories-orders-$p"
done
