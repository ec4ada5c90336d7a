#!/usr/bin/env bash
# Old (v1) vs new (v2) shipped models, side by side, with the same commands (CPU, 1 thread each).
# Usage: bash results/models-v1-v2/run.sh en|py VERSION MODEL_DIR
#   VERSION v1: the models of git commit bbc89fb (extract them with the command in
#   src/asarm/configs/asarm-*-small.json); v2: the shipped ones (src/asarm/shipped/...).
set -euo pipefail
cd "$(dirname "$0")/../.."
KIND=$1; V=$2; M=$3
OUT=results/models-v1-v2/$V
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
