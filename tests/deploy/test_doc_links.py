"""Links between the project's Markdown documents land: every `(#anchor)` and
`(file.md#anchor)` names a heading that exists (GitHub's anchor for it), every linked
Markdown file exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.support import REPO

DOCS = sorted([*(REPO / "docs").glob("*.md"), REPO / "README.md", REPO / "bench" / "README.md"])
_HEADING = re.compile(r"^#+\s+(.*?)\s*$", re.M)
_LINK = re.compile(r"\]\(([\w./-]*\.md)?#([^)\s]+)\)")
_FILE_LINK = re.compile(r"\]\(([\w./-]+\.md)(?:#[^)\s]*)?\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"`([^`]*)`", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))  # a '#' in code is no heading
    return {anchor(h) for h in _HEADING.findall(text)}


def test_anchor_rules() -> None:
    assert anchor("6. The Python HTTP stack is most of the budget") == (
        "6-the-python-http-stack-is-most-of-the-budget"
    )
    assert anchor("1-3. Applied: metering, metric children") == (
        "1-3-applied-metering-metric-children"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_land(doc: Path) -> None:
    text = _FENCE.sub("", doc.read_text(encoding="utf-8"))
    broken = [t for t in _FILE_LINK.findall(text) if not (doc.parent / t).is_file()]
    for target, name in _LINK.findall(text):
        path = doc.parent / target if target else doc
        if path.is_file() and name not in anchors(path):
            broken.append(f"{target}#{name}")
    assert not broken, broken
