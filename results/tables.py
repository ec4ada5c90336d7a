"""Print the markdown tables of every results/<run>/summary.md, or with --readme rewrite the
block between the <!-- tables:start --> and <!-- tables:end --> markers of results/README.md."""

import sys
from pathlib import Path

root = Path(__file__).resolve().parent
ORDER = ["wikitext-L128", "wikitext-sweep-k", "wikitext-speedups", "wikitext-one-pass-sweep-k", "rocstories", "humaneval-single-line", "humaneval-single-line-sweep-k",
         "humaneval-multi-line", "humaneval-random-span", "humaneval-random-span-light"]


def tables(folders) -> str:
    out = []
    for folder in folders:
        md = (root / folder / "summary.md").read_text().splitlines()
        out.append(f"### `{folder}/`\n")
        body = [line for line in md[1:] if not line.startswith(("- mean", "- elapsed_s", "- nfe"))]
        out.append("\n".join(body).strip() + "\n")
        if (root / folder / "sweep_k.png").is_file():
            out.append(f"![k sweep]({folder}/sweep_k.png)\n")
    return "\n".join(out)


args = [a for a in sys.argv[1:] if a != "--readme"]
found = {p.parent.name for p in root.glob("*/summary.md")}
folders = args or [f for f in ORDER if f in found] + sorted(found - set(ORDER))
text = tables(folders)
if "--readme" in sys.argv:
    readme = root / "README.md"
    s = readme.read_text()
    a, b = s.index("<!-- tables:start -->"), s.index("<!-- tables:end -->")
    readme.write_text(s[: a + len("<!-- tables:start -->")] + "\n\n" + text + "\n" + s[b:])
else:
    print(text)
