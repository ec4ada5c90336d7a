"""Print the markdown tables of every results/<run>/summary.md (for results/README.md)."""

import sys
from pathlib import Path

root = Path(__file__).resolve().parent
for folder in sys.argv[1:] or sorted(p.parent.name for p in root.glob("*/summary.md")):
    md = (root / folder / "summary.md").read_text().splitlines()
    print(f"### `{folder}/`\n")
    body = [line for line in md[1:] if not line.startswith(("- mean", "- elapsed_s", "- nfe"))]
    print("\n".join(body).strip() + "\n")
    if (root / folder / "sweep_k.png").is_file():
        print(f"![k sweep]({folder}/sweep_k.png)\n")
