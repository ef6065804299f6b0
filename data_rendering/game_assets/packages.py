"""Debian game-data packages in a local cache: `apt-get download` into <cache>/debs (skipped when a .deb of the
package is there), `dpkg-deb -x` into <cache>/root/<package> (skipped when extracted before; never into /).

Some packages are reserved for evaluation and are never downloaded, extracted or read: RESERVED.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from utils.cli import InputError

RESERVED = ("libirrlicht-doc", "assimp-testmodels", "panda3d")
_DONE = ".extracted"  # written last, so a half-extracted tree is redone


def refuse_reserved(package: str) -> None:
    if any(package == r or package.startswith(r + "-") or package.startswith(r + "_") for r in RESERVED):
        raise InputError(f"{package}: reserved for evaluation ({', '.join(RESERVED)}); never read for training data")


def _require(tool: str, what: str) -> None:
    if shutil.which(tool) is None:
        raise InputError(f"{tool} not found: cannot {what} (on a system without apt, put the package's .deb "
                         f"file into the cache's debs/ folder)")


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    _require(argv[0], what)
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise InputError(f"{' '.join(argv)} failed ({what}): {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout


def fetch(package: str, cache: Path) -> Path:
    """The package's .deb in <cache>/debs, downloaded when none is there."""
    refuse_reserved(package)
    debs = cache / "debs"
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        _require("apt-get", f"download {package}")  # before anything is created in the cache
        debs.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", package], f"download {package}", cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise InputError(f"apt-get download {package} left no {package}_*.deb in {debs}")
    if len(found) > 1:
        raise InputError(f"{debs}: several .deb files of {package} ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def version(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"], f"read the version of {deb.name}").strip()


def extract(package: str, deb: Path, cache: Path) -> Path:
    """<cache>/root/<package>, the package's files as they would be installed (relative to /)."""
    refuse_reserved(package)
    root = cache / "root" / package
    marker = root / _DONE
    if marker.is_file() and marker.read_text().strip() == deb.name:
        return root
    partial = root.with_name(f".{package}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(partial)], f"extract {deb.name}")
    (partial / _DONE).write_text(deb.name + "\n")
    if root.exists():  # an older or interrupted extraction of this cache's own making
        shutil.rmtree(root)
    partial.rename(root)
    return root
