"""Console reporting shared by the command-line tools (no torch import: the Blender-side runner uses it too)."""
from __future__ import annotations

import sys
from typing import Iterable


def report_failures(failures: Iterable[tuple[str, str]], total: int, what: str = "items") -> int:
    """List the failed items of a batch job on stderr (name: reason) after the job went on past them.
    Returns the exit status: 1 if anything failed, else 0."""
    failures = list(failures)
    if not failures:
        return 0
    print(f"{len(failures)} of {total} {what} failed:", file=sys.stderr)
    for name, why in failures:
        print(f"  {name}: {why}", file=sys.stderr)
    return 1
