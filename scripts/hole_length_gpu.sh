#!/usr/bin/env bash
# Issue 13's GPU work in one call of under ten minutes, from the source tree (nothing installed):
#
#   1. The order-mixture experiment: two English models trained from scratch side by side on the
#      GPU, identical (asarm-en-small-gpu: version 3's architecture, data, split, schedule, seed)
#      except the training order: left to right (random_order=0, what version 3 was trained with)
#      and a mixture (random_order=$MIX: each sequence in a uniformly random order with that
#      probability). Same max_steps for both; max_time_minutes stops both if the GPU is slower.
#   2. Meanwhile, HumanEval single-line without the oracle length, all 1,033 tasks, with the
#      shipped asarm-py-small, in $SHARDS shards side by side (one folder, a record file each).
#   3. After training, ROCStories without the oracle length (first 500 stories) for both new
#      models, in shards.
#
# Measured on one H100 (2026-11-26): the 12 HumanEval processes time-slice the GPU, so the two
# training runs took about 475 ms a step (about 100 ms with only the two of them) and stopped by
# time at step 910; HumanEval took about 5 s a task per shard and finished all 1,033 tasks.
#
# Everything stops by $BUDGET seconds after the start (what is done is kept: each evaluation
# resumes from its records), then $OUT gets at most 8 files: each model's weight shards and one
# tar.gz of everything else (logs, evaluation folders).
#
# Inputs the GPU machine cannot read from ../shared, made on this side first (runs/ is ignored):
#   tar -C runs -czf runs/gpu-data-en.tar.gz asarm-en-small-gpu/prepared   (packed int16 chunks, see train_gpu.sh)
#   mkdir -p runs/gpu-shared/data && cp -r ../shared/data/{rocstories,humaneval-infilling} runs/gpu-shared/data/
# and the evaluation folders' prior.json files (learned length priors: the HumanEval one reads this
# machine's Python standard library, which the GPU machine's Python must not replace).
# CPU dry run (a copy of the prior.json files in /tmp/dry): RESULTS=/tmp/dry OUT=/tmp/dry-out DEVICE=cpu STEPS=6 HE_LIMIT=3 RS_LIMIT=2 SHARDS=2 RS_SHARDS=1 BUDGET=900 bash scripts/hole_length_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-out}
DEVICE=${DEVICE:-cuda}
MIX=${MIX:-0.5}
STEPS=${STEPS:-3000}
SHARDS=${SHARDS:-12}
RS_SHARDS=${RS_SHARDS:-6}
HE_LIMIT=${HE_LIMIT:-}
RS_LIMIT=${RS_LIMIT:-500}
BUDGET=${BUDGET:-530}
ASARM="$PY -c 'import sys; from asarm.cli import main; sys.exit(main())'"
RESULTS=${RESULTS:-results/hole-length}  # holding each evaluation folder's prior.json
HE=$RESULTS/humaneval-single-line-asarm-py-small-v3
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
export ASARM_DATA=runs/gpu-shared/data
mkdir -p "$OUT" runs/logs-gpu

if [ -f runs/gpu-data-en.tar.gz ] && [ ! -f runs/asarm-en-small-gpu/prepared/chunks.pt ]; then
  tar -C runs -xzf runs/gpu-data-en.tar.gz
fi

# 1. the two training runs (trainer's time limit: what is left, less 100 s for the ROCStories part)
train_minutes=$($PY -c "print(round(($(left) - 100) / 60, 2))")
train_pids=()
for p in 0 "$MIX"; do
  d=runs/orders-$p
  rm -rf "$d" && mkdir -p "$d" && cp -r runs/asarm-en-small-gpu/prepared "$d/"
  OMP_NUM_THREADS=2 $PY -m asarm.train --config asarm-en-small-gpu --out "$d" --set random_order=$p \
    --set max_steps=$STEPS --set max_time_minutes=$train_minutes --set export_dir="$d/model" --set device=$DEVICE \
    > "runs/logs-gpu/train-orders-$p.log" 2>&1 &
  train_pids+=($!)
done

# 2. HumanEval shards, side by side with the training
for i in $(seq 0 $((SHARDS - 1))); do
  OMP_NUM_THREADS=1 timeout $(($(left) - 30)) bash -c "$ASARM eval humaneval-infilling --variant single-line \
    --model asarm-py-small --hole-length posterior --workers 1 --timeout 3 --threads 1 --device $DEVICE \
    --shard $i/$SHARDS --no-progress ${HE_LIMIT:+--limit $HE_LIMIT} --output $HE" \
    > "runs/logs-gpu/he-$i.log" 2>&1 &
done

wait "${train_pids[@]}"
echo "training done at $(( $(date +%s) - START )) s" | tee -a runs/logs-gpu/times.txt

# 3. ROCStories for both new models (ROUGE needs rouge-score, which the GPU machine's Python lacks:
#    bring it as wheels, see /work/.library/device/README.md, and export PYTHONPATH to them; or run
#    this part of results/hole-length/run.sh afterwards on the CPU, as issue 13's run did)
if ! $PY -c "import rouge_score" 2>/dev/null; then
  echo "rouge_score missing here: ROCStories skipped" | tee -a runs/logs-gpu/times.txt
  RS_SHARDS=0
fi
for p in 0 "$MIX"; do
  [ "$RS_SHARDS" -gt 0 ] || break
  for i in $(seq 0 $((RS_SHARDS - 1))); do
    OMP_NUM_THREADS=1 timeout $(($(left) - 20)) bash -c "$ASARM eval rocstories --model runs/orders-$p/model \
      --hole-length posterior --limit $RS_LIMIT --threads 1 --device $DEVICE --shard $i/$RS_SHARDS --no-progress \
      --output $RESULTS/rocstories-orders-$p" > "runs/logs-gpu/rs-$p-$i.log" 2>&1 &
  done
done
wait
for d in "$HE" "$RESULTS"/rocstories-orders-*; do  # each folder's summary over all its shards
  ls "$d"/records*.jsonl >/dev/null 2>&1 || continue
  $PY -c "import sys; from asarm.evaluation.hole_length_report import write_report; write_report(sys.argv[1])" "$d"
done
echo "all done at $(( $(date +%s) - START )) s" | tee -a runs/logs-gpu/times.txt

# what comes back: the weight shards, and one tar.gz of the rest
for p in 0 "$MIX"; do
  for f in runs/orders-$p/model/model*.safetensors; do [ -f "$f" ] && mv "$f" "$OUT/orders-$p-$(basename "$f")"; done
  cp runs/orders-$p/{train_config.json,train_log.csv,valid_log.csv,metrics.json,loss.png} "runs/orders-$p/model/" 2>/dev/null
done
tar -czf "$OUT/rest.tar.gz" runs/logs-gpu runs/orders-*/model "$RESULTS"/rocstories-orders-* "$HE"
ls -la "$OUT"
