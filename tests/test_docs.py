"""The repository's documentation stands on its own (docs/README.md, "How the code cites these pages").

- No tracked file cites the team's private notes, which a user's checkout does not have.
- Every citation of a docs page section (`docs/published_system.md §6.4`, or the short form `published §6.4`)
  resolves: the page exists and has a heading with that section number. Outside docs/, every `§` belongs to such a
  citation (a bare `§4.2` cannot be looked up); inside a docs page a bare `§N` is a section of that page.
"""
from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SELF = "tests/test_docs.py"

# Names of the team's private notes; a user never has them (matched case-insensitively).
PRIVATE = ("spec §", "DESIGN.md", "official_spec", "trellis_spec", "../shared")

# Short forms of the pages (docs/README.md), matched case-insensitively ("Published §2.1: ..." opens a sentence).
SHORT = {"published": "published_system", "trellis": "trellis", "paper": "paper", "architecture": "architecture"}

NUM = r"\d+(?:\.\d+)*"
RANGE = rf"{NUM}(?:\s*[-–]\s*{NUM})?"
QUALIFIER = r"(?:\s+(?:step|steps)\s+\d+(?:\s*[-–]\s*\d+)?)?"  # "§6.4 step 5", "§6.4 steps 3-6"
ITEM = rf"§{RANGE}{QUALIFIER}"
SEPARATOR = r"(?:\s*,\s*|\s+and\s+|\s+or\s+|\s*/\s*)"
PAGE = (r"(?:`?docs/(?P<path>[\w-]+)\.md`?"                # docs/published_system.md §6.4
        r"|\]\((?:docs/)?(?P<link>[\w-]+)\.md\)"         # [published_system.md](published_system.md) §6.4
        rf"|\b(?P<short>(?i:{'|'.join(SHORT)})))")        # published §6.4
CITATION = re.compile(rf"{PAGE}\s+(?P<items>{ITEM}(?:{SEPARATOR}{ITEM})*)")
BARE = re.compile(rf"§{RANGE}")
HEADING = re.compile(rf"^#{{1,6}}\s+§({NUM})\b", re.M)


def tracked_text_files() -> dict[str, str]:
    """{path: text} of every git-tracked UTF-8 text file except this test."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    files = {}
    for name in sorted(out.decode().split("\0")):
        path = ROOT / name
        if not name or name == SELF or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            files[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files


@cache
def sections(page: str) -> frozenset[str] | None:
    """The section numbers of docs/<page>.md's headings, None when the page does not exist."""
    path = DOCS / f"{page}.md"
    return frozenset(HEADING.findall(path.read_text(encoding="utf-8"))) if path.is_file() else None


def numbers(item: str) -> list[str]:
    """The section numbers one item names: both ends of a range ("§10.8-9" is 10.8 to 10.9), qualifiers dropped."""
    ends = re.findall(NUM, re.match(rf"§({RANGE})", item).group(1))
    if len(ends) == 2:
        start, end = ends[0].split("."), ends[1].split(".")
        if len(end) < len(start):  # "10.8-9": the end replaces the last parts of the start
            ends[1] = ".".join(start[: len(start) - len(end)] + end)
    return ends


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def unresolved(name: str, text: str) -> list[str]:
    """`name:line: problem` for each citation in `text` that does not resolve, and each bare § outside docs/."""
    problems, covered = [], set()
    own_page = name[len("docs/"):-len(".md")] if name.startswith("docs/") and name.endswith(".md") else None
    for match in CITATION.finditer(text):
        page = match.group("path") or match.group("link") or SHORT[match.group("short").lower()]
        covered.update(range(match.start("items"), match.end("items")))
        for item in re.finditer(ITEM, match.group("items")):
            for number in numbers(item.group(0)):
                have = sections(page)
                if have is None:
                    problems.append(f"{name}:{line_of(text, match.start())}: docs/{page}.md does not exist")
                elif number not in have:
                    problems.append(f"{name}:{line_of(text, match.start())}: docs/{page}.md has no section §{number}")
    for match in re.finditer("§", text):
        if match.start() in covered:
            continue
        bare = BARE.match(text, match.start())
        line = line_of(text, match.start())
        where = f"{name}:{line}"
        if own_page is None:
            problems.append(f"{where}: a bare '§' (cite docs/<page>.md §N or <short> §N): "
                            f"{text.splitlines()[line - 1].strip()[:100]}")
        elif own_page != "README" and bare and sections(own_page):
            for number in numbers(bare.group(0)):
                if number not in sections(own_page):
                    problems.append(f"{where}: docs/{own_page}.md has no section §{number}")
    return problems


def test_no_file_cites_the_private_notes():
    offenders: dict[str, list[str]] = {}
    for name, text in tracked_text_files().items():
        lowered = text.lower()
        for needle in PRIVATE:
            start = 0
            while (pos := lowered.find(needle.lower(), start)) >= 0:
                line = line_of(text, pos)
                offenders.setdefault(name, []).append(f"  {line}: {text.splitlines()[line - 1].strip()[:120]}")
                start = pos + 1
    report = "\n".join(f"{name} ({len(lines)}):\n" + "\n".join(sorted(set(lines), key=lambda s: int(s.split(":")[0])))
                       for name, lines in sorted(offenders.items()))
    assert not offenders, ("these files cite notes a user does not have; cite the docs/ page holding the fact instead "
                           f"(docs/README.md):\n{report}")


def test_every_docs_citation_resolves():
    problems = [p for name, text in tracked_text_files().items() for p in unresolved(name, text)]
    assert not problems, "citations that do not resolve (docs/README.md explains the scheme):\n" + "\n".join(problems)


def test_the_docs_pages_number_their_sections_once():
    for path in sorted(DOCS.glob("*.md")):
        found = HEADING.findall(path.read_text(encoding="utf-8"))
        assert len(found) == len(set(found)), f"{path.name}: a section number used twice"


def test_the_citation_grammar():
    text = ("see docs/published_system.md §6.4 step 5, published §5.2-5.3 and §10.8-9; Trellis §0/§9; "
            "[paper.md](paper.md) §7; published §99")
    problems = unresolved("x.py", text)
    assert problems == ["x.py:1: docs/published_system.md has no section §99"]
    assert unresolved("x.py", "a bare §4.2") == ["x.py:1: a bare '§' (cite docs/<page>.md §N or <short> §N): "
                                                 "a bare §4.2"]
    assert numbers("§10.8-9") == ["10.8", "10.9"] and numbers("§4.1-4.4") == ["4.1", "4.4"]
