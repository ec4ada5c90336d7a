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
# HumanEval single-line, all 1,033 tasks (program timeout 3 s: canonical solutions run in well under 1 s)
"$PY" -c 'import sys; from asarm.cli import main; sys.exit(main())' eval humaneval-infilling \
    --variant single-line --model asarm-py-small --hole-length posterior --workers 2 --timeout 3 --threads 1 \
    --output results/hole-length/humaneval-single-line-asarm-py-small
