"""The repository carries its own method document, and everything that cites it points at a
section that exists."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"


def repository_files() -> list[Path]:
    """The files git tracks (a fresh clone's content), else every file outside build outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "outputs", "multirun", "data"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.parts)]


def text_of(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:  # figures and other binary files
        return ""


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_nothing_refers_to_a_method_document_outside_the_repository():
    outside = ("PAPER" + ".md", "../" + "shared")  # spelt apart so this file does not match
    hits = [
        f"{p.relative_to(ROOT)}: {word}"
        for p in repository_files()
        for word in outside
        if word in text_of(p)
    ]
    assert not hits


def test_every_citation_of_the_method_document_names_a_section_that_exists():
    headings = re.findall(r"^#+ (.+)$", METHOD.read_text(), flags=re.M)
    anchors = {anchor(h) for h in headings}
    assert {"algorithm-1", "the-upper-bound", "variance-reduction-measured-exactly"} <= anchors
    cited = {
        (p.relative_to(ROOT), a)
        for p in repository_files()
        for a in re.findall(r"docs/method\.md#([\w\-]+)", text_of(p))
    }
    assert cited, "nothing cites docs/method.md by section"
    missing = sorted(str(c) for c in cited if c[1] not in anchors)
    assert not missing
