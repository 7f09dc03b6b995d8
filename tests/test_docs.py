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


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_link_between_documents_reaches_a_file_and_a_heading_that_exist():
    broken = []
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, section = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif section and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                if section not in {anchor(h) for h in headings}:
                    broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken


def test_the_readme_is_a_front_door():
    """At most 300 lines; its first screen sets up (activating the venv), runs and configures."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    first_screen = "\n".join(lines[:60])
    for needed in ("make train", "source .venv/bin/activate", "make test", "sampler=", "dataset="):
        assert needed in first_screen


def test_the_suites_longest_first_order_names_real_scopes():
    """conftest.FIRST (the order in which make test starts the longest scopes) names modules
    and classes that exist: a renamed one would silently fall to the end of the queue."""
    import importlib

    from conftest import FIRST

    for scope in FIRST:
        module, _, cls = scope.partition("::")
        assert (ROOT / "tests" / module).is_file(), scope
        if cls:
            assert hasattr(importlib.import_module(module.removesuffix(".py")), cls), scope
