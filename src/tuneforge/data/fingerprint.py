"""Content fingerprints of data files and folders, recorded in each run's manifest.

A run is only reproducible if we can tell later that the data it read is the data we
still have; a sha256 over the bytes (not the mtime) is the honest check.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tuneforge.errors import TuneforgeError

__all__ = ["file_fingerprint"]


def file_fingerprint(path: str | Path) -> dict[str, object]:
    """``{"path", "sha256", "bytes"}`` of a file or directory, for the run manifest.

    A directory hashes the sorted list of "relative/path<TAB>size<TAB>sha256" lines, so a
    renamed, added or edited image changes the fingerprint but the walk order does not.
    """
    path = Path(path)
    if path.is_file():
        digest, size = _sha256(path)
        return {"path": str(path.resolve()), "sha256": digest, "bytes": size}
    if not path.is_dir():
        raise TuneforgeError(f"cannot fingerprint {path}: not found — check the data path in the recipe")
    outer = hashlib.sha256()
    total = n_files = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest, size = _sha256(file)
        outer.update(f"{file.relative_to(path).as_posix()}\t{size}\t{digest}\n".encode())
        total += size
        n_files += 1
    return {"path": str(path.resolve()), "sha256": outer.hexdigest(), "bytes": total, "files": n_files}


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # streamed: data files can be GBs
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size

