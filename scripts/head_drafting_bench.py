"""One row's head drafting (``HeadDrafter.draft``, a block of 5) on a shipped model, a baseline
commit's drafting code against the current one, in one process, one torch thread:

    OMP_NUM_THREADS=1 python scripts/head_drafting_bench.py [--baseline ac68f70] [--model asarm-en-small]
        [--blocks 200] [--profile]

Per dtype (bf16 = "auto" on CPUs with native bf16, and fp32): whether both codes draw the same
tokens with bit-identical proposals (``--blocks`` blocks at T = 1 and at T = 0.7 with top-k 50,
random query states, with and without an exact first draft), ms per block of each code (taking
turns at going first), and with ``--profile`` where the current code's time goes by op
(``torch.profiler``, self CPU time by op and shape). The baseline's sampling package is loaded
with ``git show`` as in scripts/host_work_bench.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_work_bench import load_baseline  # noqa: E402

from asarm.checkpoint import load_model  # noqa: E402
from asarm.draft_head import load_head  # noqa: E402
from asarm.sampling.drafts import HeadDrafter  # noqa: E402
from asarm.sampling.target import TargetDistribution  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="ac68f70")
    p.add_argument("--model", default="asarm-en-small")
    p.add_argument("--blocks", type=int, default=200)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    load_baseline(args.baseline)
    from asarm.sampling_baseline.drafts import HeadDrafter as BaselineDrafter

    for dtype in ("auto", "fp32"):
        model = load_model(args.model, dtype=dtype)
        head = load_head(model.name_or_path, model.config)
        before, after = BaselineDrafter(head, model), HeadDrafter(head, model)
        d, mask = model.config.d_model, model.config.mask_token_id
        same, total = 0, 0
        g = torch.Generator().manual_seed(1)
        for target in (TargetDistribution(mask), TargetDistribution(mask, temperature=0.7, top_k=50)):
            for trial in range(args.blocks):
                hidden = (torch.randn(5, d, generator=g) * 3).to(model.dtype)
                positions = torch.randperm(60, generator=g)[:5].tolist()
                if trial % 2:
                    positions.sort()
                prev_pos = None if trial % 3 == 0 else 70
                first = None if trial % 2 else (7, torch.softmax(torch.randn(model.config.vocab_size, generator=g), 0))
                a = before.draft(hidden, positions, 5, prev_pos, target, torch.Generator().manual_seed(trial), first)
                b = after.draft(hidden, positions, 5, prev_pos, target, torch.Generator().manual_seed(trial), first)
                same += a[0] == b[0] and torch.equal(a[1], b[1])
                total += 1
        hidden, positions, target = torch.randn(5, d).to(model.dtype), [10, 12, 13, 20, 21], TargetDistribution(mask)
        seconds = {"before": 0.0, "after": 0.0}
        codes = {"before": before, "after": after}
        for rep in range(30):
            for name in (("before", "after") if rep % 2 else ("after", "before")):
                gen = torch.Generator().manual_seed(rep)
                start = time.perf_counter()
                for _ in range(10):
                    codes[name].draft(hidden, positions, 5, 8, target, gen)
                seconds[name] += time.perf_counter() - start
        ms = {k: 1000 * v / 300 for k, v in seconds.items()}
        print(f"{args.model} {dtype} ({model.dtype}): identical tokens and proposals in {same}/{total} blocks; "
              f"ms per block of 5: before {ms['before']:.2f}, after {ms['after']:.2f} "
              f"(after/before {ms['after'] / ms['before']:.2f})", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(50):
                    after.draft(hidden, positions, 5, 8, target, gen)
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12,
                                                                     max_name_column_width=24,
                                                                     max_shapes_column_width=60))


if __name__ == "__main__":
    main()
