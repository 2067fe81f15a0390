"""The documents a user reads: a short README that still says how to start, and no dead links.

The README is the page a newcomer lands on: it must stay short (everything else lives in
docs/), keep the two set-up commands exactly as they are, and name the test command that
.ci/run calls. Every relative markdown link in README.md and docs/*.md must lead somewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 10_000

SETUP_COMMANDS = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/arp-gateway dev",
    "bash .ci/run",
)
TEST_COMMAND = ".venv/bin/python -m pytest -q"
# Generated from the configuration models by another part of the build; it may not exist yet.
GENERATED = {DOCS / "configuration.md"}

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text outside code: a `[x](y)` inside a code block or span is not a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return _LINK.findall(prose(path.read_text(encoding="utf-8")))


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub renders for a markdown file."""
    found: set[str] = set()
    for heading in _HEADING.findall(prose(path.read_text(encoding="utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        base, n = slug, 1
        while slug in found:
            slug, n = f"{base}-{n}", n + 1
        found.add(slug)
    return found


def is_test_file(target: Path) -> bool:
    """Test files are moving to a new layout in parallel: their paths are not checked here."""
    try:
        rel = target.relative_to(ROOT)
    except ValueError:
        return False
    return rel.parts[:1] == ("tests",) and rel.name.startswith("test_") and rel.suffix == ".py"


def dead_links(path: Path) -> list[str]:
    dead = []
    for link in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I):  # https:, mailto:: not a file here
            continue
        file_part, _, fragment = link.partition("#")
        target = (path.parent / file_part).resolve() if file_part else path
        if target in GENERATED and not target.exists() or is_test_file(target):
            continue
        if not target.exists():
            dead.append(f"{link}: no such file")
        elif fragment and target.suffix == ".md" and fragment.lower() not in anchors(target):
            dead.append(f"{link}: no heading #{fragment} in {target.relative_to(ROOT)}")
    return dead


def test_readme_is_at_most_10_kb() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT})"


def test_readme_keeps_the_two_setup_commands_and_the_test_command() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = [m.group(0) for m in _FENCE.finditer(text)]
    for command in SETUP_COMMANDS:
        assert any(command in block.splitlines() for block in blocks), f"README lost the set-up command {command!r}"
    assert TEST_COMMAND in text, "README no longer names the test command .ci/run calls"


def test_readme_links_every_document_in_docs() -> None:
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"docs/ pages the README does not link: {missing}"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(path: Path) -> None:
    assert dead_links(path) == []


def test_the_readme_and_operations_give_the_same_kubernetes_steps() -> None:
    """The deploy steps appear in both (tests/support/deploy.py walks the README's): a change to one
    must reach the other."""

    def kubectl_steps(text: str) -> list[str]:
        return [line.strip() for m in _FENCE.finditer(text) for line in m.group(0).splitlines()
                if re.match(r"\s*kubectl (apply|-n \S+ create) ", line)]

    readme = kubectl_steps(README.read_text(encoding="utf-8"))
    assert readme, "README's Deploy section lost its kubectl steps"
    assert kubectl_steps((DOCS / "operations.md").read_text(encoding="utf-8")) == readme
