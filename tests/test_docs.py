"""The documentation holds together: every relative link in README.md, CHANGELOG.md and docs/*.md
reaches an existing file (and heading, for a #anchor), every vae/, pipeline/, tests/, benchmarks/
or docs/ path they name exists, every `pipeline.x.f(...)` they call can be imported, and no project
file cites a design note that is not in the repository."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
OUTSIDE = ("DESIGN" + ".md", "STYLE" + ".md")  # notes kept outside the repository (split: not a citation here)

FENCE = re.compile(r"^```.*?^```[^\n]*$", flags=re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.M)
PATH = re.compile(r"(?<![\w./~-])((?:vae|pipeline|tests|benchmarks|docs)/[\w./-]*)")
CALL = re.compile(r"`((?:vae|pipeline)(?:\.\w+)+)\(")


def prose(text: str) -> str:
    """The text without fenced code blocks (whose '# comments' are no headings and hold no links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not '-' or '_'), spaces to '-'."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    count: dict[str, int] = {}
    for heading in HEADING.findall(prose(path.read_text())):
        base = slug(heading)
        n = count.get(base, 0)
        count[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of the page whose file, or whose #anchor in a Markdown file, is missing."""
    broken = []
    for target in LINK.findall(CODE.sub("", prose(page.read_text()))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_project_path_exists(page: Path) -> None:
    named = {m.rstrip(".") for m in PATH.findall(page.read_text())}
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_function_imports(page: Path) -> None:
    missing = []
    for dotted in set(CALL.findall(page.read_text())):
        module, _, name = dotted.rpartition(".")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{dotted}: {exc}")
    assert missing == []


def test_the_checks_find_a_broken_link_anchor_and_path(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## The `log` scale: y's units\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Readme\n\n[ok](docs/a.md#the-log-scale-ys-units) [ok](#readme) [web](https://example.org/x)\n"
        "[gone](docs/b.md) [anchor](docs/a.md#not-a-heading) [self](#nowhere) `[not](a-link.md)`\n"
    )
    assert broken_links(page) == [
        f"docs/b.md: no file {tmp_path / 'docs' / 'b.md'}",
        "docs/a.md#not-a-heading: no heading #not-a-heading in a.md",
        "#nowhere: no heading #nowhere in README.md",
    ]
    assert PATH.findall("see `vae/model.py`, tests/vae/test_ppca.py. and ~/vae/x") == [
        "vae/model.py", "tests/vae/test_ppca.py."]


def test_github_anchors() -> None:
    assert slug("Missing cells: anomaly_pvalue") == "missing-cells-anomaly_pvalue"
    assert slug("At scale: big tables, folders, Dask, several processes") == (
        "at-scale-big-tables-folders-dask-several-processes")
    assert slug("2026-12-07") == "2026-12-07"


def test_repeated_headings_get_numbered(tmp_path: Path) -> None:
    page = tmp_path / "x.md"
    page.write_text("## Notes\n\n## Notes\n\n## Notes\n")
    assert anchors(page) >= {"notes", "notes-1", "notes-2"}


def test_no_project_file_cites_the_outside_design_notes() -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    citing = []
    for name in listed:
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # a binary file
            continue
        citing += [f"{name} cites {note}" for note in OUTSIDE if note in text]
    assert citing == []
