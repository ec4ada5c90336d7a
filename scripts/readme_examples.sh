#!/usr/bin/env bash
# The example outputs shown in README.md, regenerated with the shipped models (one thread).
# Usage: bash scripts/readme_examples.sh   (from a checkout with asarm installed or PYTHONPATH=src)
set -euo pipefail
cd "$(dirname "$0")/.."
ASARM=${ASARM:-$(command -v asarm || echo "python -m asarm.cli")}
echo '--- the first command'
$ASARM infill "The old man walked to the [MASK:6] and sat down." --seed 0 --stats 2>&1
echo '--- Python quickstart'
python - <<'PY'
import torch, asarm
from asarm.tokenization import decode, encode
torch.set_num_threads(1)
model = asarm.load_model("asarm-en-small")
print(asarm.infill(model, "She opened the [MASK:4] and smiled.", seed=0))
ids = torch.tensor(encode(model.tokenizer, "A quiet morning in the village, the baker opened his shop."))
masked = torch.zeros_like(ids, dtype=torch.bool); masked[3:8] = True
res = asarm.sample(model, ids, masked, method="assd", draft="self", k=5, seed=0)
print(decode(model.tokenizer, res.input_ids))
print(f"passes: {int(res.nfe)}, rounds: {int(res.rounds)}, tokens per round: {res.accepted}")
nll = -float(asarm.score(model, ids, masked).log_prob)
print(f"NLL of the original tokens: {nll:.2f} nats")
PY
echo '--- a hole of unknown length'
$ASARM infill "The [MASK] sat on the mat." --seed 0 --stats 2>&1
