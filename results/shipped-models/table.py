"""Markdown table of results/shipped-models: every version of the shipped models side by side.

    python results/shipped-models/table.py        (reads v1/, v2/, v3/ … beside this file)

Version 1's HumanEval single-line figure is results/humaneval-single-line (same command, same
model, made before this comparison).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read(path: Path):
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def metric(folder: Path, name: str, config: str | None = None):
    summary = read(folder / "summary.json")
    if summary is None:
        return None
    configs = summary["configs"]
    entry = configs[config] if config else next(iter(configs.values()))
    return entry["metrics"].get(name)


def fmt(m, digits=3, scale=1.0):
    return "–" if m is None else f"{m['mean'] * scale:.{digits}f} ± {m['ci95'] * scale:.{digits}f}"


def rows(v: str) -> dict:
    d = HERE / v
    held = read(d / "wikitext-heldout.json")
    hyg = read(d / "infill-hygiene.json")
    hyg_free = read(d / "infill-hygiene-allow-special.json")
    stdlib = read(d / "stdlib-tests-heldout.json")
    he = d / "humaneval-single-line"
    if v == "v1" and not (he / "summary.json").is_file():
        he = HERE.parent / "humaneval-single-line"
    return {
        "WikiText-2 test chain perplexity (16 visible / 112 hidden)": f"{held['ppl']:.1f}" if held else "–",
        "unigram perplexity (fitted on WikiText-2 validation)": f"{held['unigram_perplexity']:.0f}" if held else "–",
        "**ratio to unigram** (target ≥ 8×)": f"**{held['ratio_to_unigram']:.2f}×**" if held else "–",
        "ASSD passes per token, k = 5, 95% hidden": fmt(metric(d / "wikitext-assd", "passes_per_token")),
        "**one-pass ASSD passes per token**, k = 5 (target ≤ 0.60)": fmt(metric(d / "wikitext-one-pass", "passes_per_token")),
        "ROCStories ROUGE-1 / 2 / L (×100, ASSD k = 5)": " / ".join(
            fmt(metric(d / "rocstories", n), 2) for n in ("rouge1", "rouge2", "rougeL")),
        "Python `Lib/test/test_*.py` chain perplexity (85-99% hidden)": f"{stdlib['ppl']:.1f}" if stdlib else "–",
        "**HumanEval single-line pass@1** (%, 1,033 tasks; target ≥ 5%)": fmt(metric(he, "pass@1"), 2),
        "100 default `[MASK]` infills with `<unk>` (target 0)": str(hyg["counts"]["unk"]) if hyg else "–",
        "… with U+FFFD / a doubled space at a hole edge / a hole glued to the word before": (
            f"{hyg['counts']['replacement_char']} / {hyg['counts']['double_space']} / {hyg['counts']['glued']}")
        if hyg else "–",
        "… `<unk>` with the exclusion turned off (`allow_special`, as before)": str(hyg_free["counts"]["unk"])
        if hyg_free else "–",
    }


def main() -> None:
    versions = sorted(p.name for p in HERE.iterdir() if p.is_dir() and p.name[1:].isdigit() and p.name[0] == "v")
    table = {v: rows(v) for v in versions}
    print("| | " + " | ".join(f"version {v[1:]}" for v in versions) + " |")
    print("|---|" + "---|" * len(versions))
    for key in table[versions[0]]:
        print(f"| {key} | " + " | ".join(table[v][key] for v in versions) + " |")


if __name__ == "__main__":
    main()
