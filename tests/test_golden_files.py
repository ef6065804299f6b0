import hashlib

from golden import GOLDEN_DIR


def test_vendored_golden_files_match_their_checksums():
    lines = (GOLDEN_DIR / "SHA256SUMS").read_text().split("\n")
    entries = [line.split() for line in lines if line.strip()]
    assert len(entries) >= 10
    for digest, name in entries:
        data = (GOLDEN_DIR / name.lstrip("*")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
