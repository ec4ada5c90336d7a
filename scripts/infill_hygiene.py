"""Does a model's default infill read as text? 100 default infills, counted.

    python scripts/infill_hygiene.py MODEL [--n 100] [--allow-special] [--out results/infill-hygiene/NAME.json]

Texts: the first N ROCStories stories (../shared/data/rocstories) with sentence 3 replaced by
``[MASK]`` (a hole of unknown length, as a person would write it). Each text is filled with
``asarm.infill`` at its defaults (ASSD self-draft k = 5, temperature 1, seed = the story's index).
Counts, over the N outputs: outputs containing ``<unk>`` or any other special-token string,
outputs containing U+FFFD, holes with a doubled space at either edge (the hole's text starts
with a space after the context's space, or ends with one before it), and holes glued to the
word before them (their first character is a letter or digit: the model chose a token without
the word's leading space; a newline or punctuation there is not counted). ``--allow-special`` turns off the exclusion of non-text special tokens (what
``infill`` did before it excluded them).
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from asarm.checkpoint import load_model  # noqa: E402
from asarm.evaluation.common import find_shared_data  # noqa: E402
from asarm.evaluation.rocstories import read_stories, split_story  # noqa: E402
from asarm.text import escape_markup, infill  # noqa: E402

SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "<mask>", "<cls>", "<sep>")


def stories(n: int) -> list[tuple[str, str, str]]:
    """(sentences 1-2, sentence 3, sentences 4-5) of the first n stories, as the ROCStories harness splits them."""
    path = find_shared_data("rocstories", "cloze_test_val__spring2016.csv.gz")
    return [split_story(story["sentences"]) for story in read_stories(path)[:n]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--allow-special", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    counts = {"special": 0, "unk": 0, "replacement_char": 0, "double_space": 0, "glued": 0}
    samples, double_cases = [], []
    start = time.perf_counter()
    for i, (left, _, right) in enumerate(stories(args.n)):
        right = right.lstrip()  # split_story gives " S4 S5"; the markup puts the space back
        out = infill(model, f"{escape_markup(left)} [MASK] {escape_markup(right)}", seed=i,
                     allow_special=args.allow_special)
        middle = out[len(left):len(out) - len(right)] if out.startswith(left) and out.endswith(right) else None
        counts["special"] += any(s in out for s in SPECIAL)
        counts["unk"] += "<unk>" in out
        counts["replacement_char"] += "\ufffd" in out
        # the markup moved the space before the hole into it, and " " + right is the right context
        doubled = middle is None or middle.startswith("  ") or middle.endswith("  ")
        counts["double_space"] += doubled
        if doubled:  # what is around it: e.g. two spaces after a full stop, as older typed text has them
            edge = (left[-20:] + "|" + middle[:20]) if middle and middle.startswith("  ") else (
                (middle[-20:] + "|" + right[:20]) if middle else out[len(left) - 20:len(left) + 40])
            double_cases.append({"story": i, "edge": edge, "after_sentence_end": bool(re.search(r'[.!?]["\']?\|?  ', edge))})
        counts["glued"] += bool(middle) and middle[0].isalnum()
        samples.append(out)
    result = {"model": args.model, "n": args.n, "allow_special": args.allow_special, "counts": counts,
              "threads": args.threads, "seconds": round(time.perf_counter() - start, 1),
              "command": "python scripts/infill_hygiene.py " + " ".join(sys.argv[1:]), "double_space_cases": double_cases,
              "first_samples": samples[:10]}
    print(json.dumps({k: v for k, v in result.items() if k != "first_samples"}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
