"""The documentation stays true to the code: the CLI reference matches `--help`, the README stays
short and links every page under docs/, and no link points to a missing file."""

from __future__ import annotations

import re
import runpy

from conftest import ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_cli_reference_matches_the_parsers():
    gen = runpy.run_path(str(ROOT / "scripts" / "gen_cli_reference.py"))
    assert (ROOT / "docs" / "cli.md").read_text() == gen["reference"](), \
        "docs/cli.md is out of date: run python scripts/gen_cli_reference.py"


def test_readme_is_short_and_links_every_doc_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(LINK.findall(readme))
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README does not link docs/{page.name}"


def test_links_point_to_files():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target.strip("`")).exists(), f"{doc.name}: {target}"
