"""SHA-256 of whole files, streamed: the digest users compare with `sha256sum` and hub oids."""

from __future__ import annotations

import hashlib


def sha256_file(path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
