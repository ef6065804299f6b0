"""The licence and attribution of a packaged file, from the package's machine-readable Debian copyright file
(/usr/share/doc/<package>/copyright, format 1.0 "DEP-5").

The file is paragraphs separated by blank lines; a paragraph with a `Files:` field lists glob patterns (`*` and `?`
match any characters, `/` included) relative to the upstream source tree, with its `Copyright:` holders and the
`License:` short name on that field's first line. The last paragraph whose pattern matches a file applies. Installed
paths are longer than source paths (usr/share/games/cube2/packages/... for packages/...), so a pattern is tried
against every trailing part of the installed path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from utils.cli import InputError


@dataclass
class Stanza:
    patterns: list[str]
    holders: str
    licence: str


def _fields(paragraph: str) -> dict[str, str]:
    """Field name (lower case) -> value, continuation lines (starting with a space) joined by newlines."""
    fields, name = {}, None
    for line in paragraph.splitlines():
        if line[:1] in (" ", "\t") and name:
            fields[name] += "\n" + line.strip()
        elif ":" in line:
            name, value = line.split(":", 1)
            name = name.strip().lower()
            fields[name] = value.strip()
    return fields


def read_copyright(path: Path) -> list[Stanza]:
    text = Path(path).read_text(errors="replace")
    if not text.startswith("Format:"):
        raise InputError(f"{path}: not a machine-readable Debian copyright file (no 'Format:' line first)")
    stanzas = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields = _fields(paragraph)
        if "files" in fields:
            licence = fields.get("license", "").split("\n", 1)[0].strip()
            holders = " ".join(fields.get("copyright", "").split())
            stanzas.append(Stanza(fields["files"].split(), holders, licence))
    if not stanzas:
        raise InputError(f"{path}: no 'Files:' paragraphs")
    return stanzas


def licence_of(stanzas: list[Stanza], installed: str) -> Stanza | None:
    """The paragraph that applies to an installed path (package-relative, '/'-separated), or None."""
    parts = installed.strip("/").split("/")
    tails = ["/".join(parts[k:]) for k in range(len(parts))]
    found = None
    for stanza in stanzas:
        if any(fnmatchcase(tail, pattern) for pattern in stanza.patterns for tail in tails):
            found = stanza
    return found
