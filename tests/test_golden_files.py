import hashlib

import pytest

from reference import GOLDEN_DIR, REFERENCE_DIR


def test_reference_files_match_their_checksums():
    lines = (GOLDEN_DIR / "SHA256SUMS").read_text().split("\n")
    entries = [line.split() for line in lines if line.strip()]
    assert len(entries) >= 10
    for digest, name in entries:
        data = (GOLDEN_DIR / name.lstrip("*")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name


def test_vendored_copy_equals_the_shared_reference():
    """The fallback copy in tests/data/reference must not drift from ../shared/reference (when both exist)."""
    from reference import _SHARED, _VENDORED

    if REFERENCE_DIR != _SHARED:
        pytest.skip("no ../shared/reference beside this checkout; the checksum test covers the vendored copy")
    for path in sorted(_VENDORED.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (_SHARED / path.relative_to(_VENDORED)).read_bytes(), path
