"""The README and the pages under docs/: every relative link resolves, every page is linked from the
README and links back to it. Plain file reads, no subprocess."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    found = sorted((REPO / "docs").glob("*.md"))
    assert found, "no docs/*.md pages"
    return found


def relative_links(doc: Path) -> list[str]:
    """Link targets outside code, without external URLs or pure anchors, anchors stripped."""
    text = CODE_SPAN.sub("", FENCE.sub("", doc.read_text()))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def resolved(doc: Path, target: str) -> str:
    return (doc.parent / target).resolve().relative_to(REPO.resolve()).as_posix()


def test_every_relative_link_points_to_a_file_that_exists():
    broken = []
    for doc in (REPO / "README.md", *pages()):
        for target in relative_links(doc):
            path = resolved(doc, target)
            if not (REPO / path).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme_and_links_back():
    readme = REPO / "README.md"
    linked = {resolved(readme, target) for target in relative_links(readme)}
    for page in pages():
        name = page.relative_to(REPO).as_posix()
        assert name in linked, f"README.md does not link {name}"
        head = "\n".join(page.read_text().splitlines()[:4])
        assert "](../README.md)" in head, f"{name} does not link back to the README at its top"


def test_the_layout_page_names_every_module_of_the_package():
    """docs/layout.md is the map a newcomer reads: a module missing from it is a room off the map."""
    layout = (REPO / "docs" / "layout.md").read_text()
    package = REPO / "src" / "ftkit"
    modules = [p.name for p in (*package.glob("*.py"), *(package / "lab").glob("*.py"))]
    missing = [name for name in modules if name != "__init__.py" and name not in layout]
    assert not missing, missing
