#!/usr/bin/env bash
# Every version of the shipped models, side by side, with the same commands (CPU, 1 thread each).
# Usage: bash results/shipped-models/run.sh en|py VERSION MODEL_DIR
#   VERSION v3: the shipped ones (asarm-en-small, asarm-py-small); v2 and v1: the models of git
#   commits 7bd46bb and bbc89fb, extracted with
#   mkdir -p runs/v2 && git archive 7bd46bb src/asarm/shipped/asarm-en-small | tar -x -C runs/v2 --strip-components=3
set -euo pipefail
cd "$(dirname "$0")/../.."
KIND=$1; V=$2; M=$3
OUT=results/shipped-models/$V
mkdir -p "$OUT"
ASARM=${ASARM:-python -m asarm.cli}
COMMON="--threads 1 --no-progress --seed 0"
if [ "$KIND" = en ]; then
  # held-out chain perplexity, 16 visible / 112 hidden per 128-token chunk, and a unigram baseline
  python scripts/heldout_loss.py "$M" ../shared/data/wikitext-2/test.txt.gz --seq-len 128 --max-chunks 512 \
    --hidden 0.875 0.875 --unigram-fit ../shared/data/wikitext-2/valid.txt.gz > "$OUT/wikitext-heldout.json"
  # ASSD passes per token, k = 5, 95% hidden: plain and one-pass rounds
  $ASARM eval wikitext --model "$M" --length 128 --limit 200 --evaluator self --method assd $COMMON --output "$OUT/wikitext-assd"
  $ASARM eval wikitext --model "$M" --length 128 --limit 200 --evaluator self --method assd --one-pass $COMMON --output "$OUT/wikitext-one-pass"
  # ROCStories ROUGE (the paper's 1,000 stories, true hole length), ASSD k = 5
  $ASARM eval rocstories --model "$M" --method assd $COMMON --output "$OUT/rocstories"
  # 100 default infills: <unk>, U+FFFD, spacing
  python scripts/infill_hygiene.py "$M" --n 100 --out "$OUT/infill-hygiene.json"
  # the same without the exclusion of special tokens (what infill did before it excluded them)
  python scripts/infill_hygiene.py "$M" --n 100 --allow-special --out "$OUT/infill-hygiene-allow-special.json"
else
  # held-out chain perplexity on the standard library's own test files (never trained on)
  python scripts/heldout_loss.py "$M" python-stdlib-tests --kind code --seq-len 256 --max-chunks 256 > "$OUT/stdlib-tests-heldout.json"
  $ASARM eval humaneval-infilling --model "$M" --variant single-line --max-tokens 256 --workers 1 $COMMON --output "$OUT/humaneval-single-line"
fi
