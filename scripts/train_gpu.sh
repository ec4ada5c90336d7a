#!/usr/bin/env bash
# Train the larger asarm-en-small and asarm-py-small (configs asarm-{en,py}-small-gpu) side by
# side on one GPU, in one call of a few minutes, from the source tree (nothing installed).
#
# The packed data (tokenizer + train/validation chunks) is built first where it is missing, from
# the configs' sources: version 2's tokenizer, data and seeded split, so the same chunks as
# runs/asarm-{en,py}-small-v2/prepared (copying those works too). A GPU machine that cannot read
# the corpora gets them packed, in at most 64 MiB (token ids fit int16):
#   python -c "import torch,sys; [torch.save({k: v.to(torch.int16) for k, v in torch.load(p).items()}, p) for p in sys.argv[1:]]" runs/asarm-*-small-gpu/prepared/chunks.pt
#   tar -C runs -czf runs/gpu-data.tar.gz asarm-en-small-gpu/prepared asarm-py-small-gpu/prepared
# and this script unpacks runs/gpu-data.tar.gz where the prepared folders are missing.
#
# Usage: MINUTES=6 MAX_EPOCHS=24 OUT=/some/dir bash scripts/train_gpu.sh
#   1. a timed 40-step trial of both models at once gives the step time;
#   2. max_steps = what fits MINUTES (at most MAX_EPOCHS passes over the data), so the cosine
#      schedule ends on time (max_time_minutes stops a run anyway, one minute later);
#   3. each run exports its best checkpoint (by validation loss) in <= 15 MiB shards; $OUT gets
#      the shards (named en-model-…, py-model-…) and one tar.gz per model of everything else
#      (config, shard index, tokenizer, logs, plot).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MINUTES=${MINUTES:-6}
MAX_EPOCHS=${MAX_EPOCHS:-24}  # the data are small (3.7 M English, 6.4 M Python tokens): more passes overfit
OUT=${OUT:-runs/gpu-out}
EXTRA=${EXTRA:-}  # more --set overrides for both runs (a CPU dry run: EXTRA="--set device=cpu ...")
mkdir -p "$OUT"

if [ -f runs/gpu-data.tar.gz ] && [ ! -d runs/asarm-en-small-gpu/prepared ]; then
  tar -C runs -xzf runs/gpu-data.tar.gz
fi

for k in en py; do
  if [ ! -f "runs/asarm-$k-small-gpu/prepared/chunks.pt" ]; then
    $PY -c "from pathlib import Path; from asarm.train.config import load_config; from asarm.train.prepare import prepare_data
cfg = load_config('asarm-$k-small-gpu'); prepare_data(cfg, Path(cfg.out_dir))"
  fi
done

trial_steps=40
trial() {  # a timed 40-step run of both models at once
  for k in en py; do
    rm -rf "runs/trial-$k" && mkdir -p "runs/trial-$k"
    cp -r "runs/asarm-$k-small-gpu/prepared" "runs/trial-$k/"
    $PY -m asarm.train --config "asarm-$k-small-gpu" --out "runs/trial-$k" $EXTRA --set max_steps=$trial_steps \
      --set eval_every=1000 --set save_every=1000 --set eval_chunks=8 --set export_dir="runs/trial-$k/model" \
      > "$OUT/trial-$k.log" 2>&1 &
  done
  wait
}
trial
if ! [ -f runs/trial-en/metrics.json ] || ! [ -f runs/trial-py/metrics.json ]; then
  # bf16 autocast failed (a NaN loss, say): train in fp32 (TF32 matmuls) instead
  echo "bf16 trial failed; fp32 instead" | tee -a "$OUT/steps.txt"
  mv "$OUT/trial-en.log" "$OUT/trial-en-bf16.log"; mv "$OUT/trial-py.log" "$OUT/trial-py-bf16.log"
  EXTRA="$EXTRA --set mixed_precision=false"
  trial
fi

steps_for() {  # max_steps that fit MINUTES at the trial's step time (steps 10..last, both runs at once),
              # and at most MAX_EPOCHS passes over the training chunks
  $PY - "$1" "$MINUTES" "$MAX_EPOCHS" "$trial_steps" <<'EOF'
import csv, json, sys
kind, minutes, max_epochs, last = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rows = {int(r["step"]): float(r["elapsed_s"]) for r in csv.DictReader(open(f"runs/trial-{kind}/train_log.csv"))}
step_s = (rows[last] - rows[10]) / (last - 10)  # the first 10 steps warm up
by_time = int(minutes * 60 / step_s / 1.08)  # 8% for validation and checkpoints
batch = json.load(open(f"src/asarm/configs/asarm-{kind}-small-gpu.json"))["batch_size"]
chunks = json.load(open(f"runs/trial-{kind}/metrics.json"))["train_chunks"]
by_epochs = int(max_epochs * chunks / batch)
steps = max(50, min(by_time, by_epochs))
print(steps)
print(f"{kind}: {step_s * 1000:.1f} ms/step in the trial; {by_time} steps fit {minutes} min, "
      f"{max_epochs} epochs are {by_epochs} steps -> max_steps {steps}", file=sys.stderr)
EOF
}
for k in en py; do
  steps=$(steps_for $k 2>>"$OUT/steps.txt")
  rm -rf "runs/asarm-$k-small-gpu/checkpoints"
  $PY -m asarm.train --config "asarm-$k-small-gpu" $EXTRA --set max_steps=$steps \
    --set max_time_minutes=$($PY -c "print($MINUTES + 1)") > "$OUT/train-$k.log" 2>&1 &
done
wait
cat "$OUT/steps.txt"

for k in en py; do
  run=runs/asarm-$k-small-gpu
  for f in "$run"/model/model*.safetensors; do mv "$f" "$OUT/$k-$(basename "$f")"; done
  cp "$run"/{train_log.csv,valid_log.csv,metrics.json,loss.png} "$run/model/" 2>/dev/null || true
  mv "$OUT/trial-$k.log" "$OUT/train-$k.log" "$run/model/"
  cp "$OUT/steps.txt" "$run/model/"
  tar -czf "$OUT/$k-rest.tar.gz" -C "$run" model
done
rm "$OUT/steps.txt"
ls -la "$OUT"  # at most 8 files come back from a GPU call: the shards and one tar.gz per model
