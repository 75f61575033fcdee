"""The converted copies of GGUF files: made once per machine, then read like any model directory.

``cached_model_dir(source)`` returns ``$TUNEFORGE_CACHE/models/<name>-<sha256[:16]>/``, a plain
Hugging Face directory (config.json, model.safetensors, tokenizer, chat template) converted
from the GGUF by ``gguf_import.convert_gguf`` the first time it is asked for. The cache root is
the one the activation caches and the demo data use: ``$TUNEFORGE_CACHE``, else
``~/.cache/tuneforge``.

What can go wrong, and what happens:

* two processes ask at once: the conversion holds an ``fcntl`` lock on
  ``models/.<sha16>.lock``; the second waits (and says so), then reads the first one's copy.
* a crash or kill mid-way: everything is written into ``models/.tmp-<sha16>-<pid>/`` and renamed
  into place only once complete (the manifest written last), so a half-made copy is never
  found; the next conversion of that file removes the leftover.
* the copy is damaged later (a truncated or edited file, a full disk during a copy): every load
  re-hashes the files the manifest lists (sha256; 1.0 s for SmolLM2's 538 MB here) and refuses
  with the directory to delete.
* the source: keyed by the sha256 of its bytes, so a renamed or copied GGUF finds its
  conversion and an edited one does not. Hashing a multi-GB file on every load would cost
  seconds, so ``models/.index/`` remembers the hash per (path, size, mtime); a changed size or
  mtime hashes again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneforgeError

MANIFEST = "tuneforge-gguf.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 22


def cache_root() -> Path:
    """``$TUNEFORGE_CACHE``, else ``~/.cache/tuneforge`` (the rule ``engine/activation_cache`` uses)."""
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge")).expanduser()


def models_dir() -> Path:
    return cache_root() / "models"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF to convert: one file, or parts whose concatenation is the file (``expected_size`` checked)."""

    label: str  # how messages name it: "alias 'smollm2-135m'", or the file's path
    files: tuple[Path, ...]
    name: str  # the readable part of the cache directory's name
    expected_size: int | None = None

    @classmethod
    def file(cls, path: str | Path) -> GgufSource:
        path = Path(path).expanduser().resolve()
        return cls(str(path), (path,), _slug(path.stem))

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")[:60] or "model"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_of(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def source_sha256(source: GgufSource, log: Callable[[str], None] = _say) -> str:
    """The sha256 of the source's bytes, remembered per (path, size, mtime) so a big file hashes once."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in source.files]
    quick = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]
    index = models_dir() / ".index" / f"{quick}.json"
    try:
        known = json.loads(index.read_text())
        if known.get("stats") == [list(s) for s in stats] and re.fullmatch(r"[0-9a-f]{64}", known.get("sha256", "")):
            return known["sha256"]
    except (OSError, ValueError):
        pass
    if source.size > 256 << 20:
        log(f"{source.label}: hashing {source.size / 1e6:.0f} MB once, to key its converted copy")
    digest = sha256_of(source.files)
    try:
        _atomic_json(index, {"stats": stats, "sha256": digest})
    except OSError:
        pass  # a read-only cache still works: it hashes again next time
    return digest


def find_entry(sha: str) -> Path | None:
    """The finished copy converted from bytes with this sha256, if there is one."""
    root = models_dir()
    if not root.is_dir():
        return None
    for entry in sorted(root.glob(f"*-{sha[:16]}")):
        if entry.is_dir() and not entry.name.startswith("."):
            return entry
    return None


def verify_entry(entry: Path, sha: str | None = None) -> dict:
    """Check every file the manifest lists against its recorded size and sha256; return the manifest."""
    fix = (f"delete it (rm -rf '{entry}') and load the model again: it is converted anew from its GGUF "
           "(once, about a minute for a small model)")
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        recorded = manifest["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TuneforgeError(f"the converted model in {entry} has no readable {MANIFEST}, so it was not written by "
                             f"tuneforge or is damaged: {fix}") from None
    if sha is not None and recorded != sha:
        raise TuneforgeError(f"{entry} was converted from a GGUF with sha256 {recorded[:16]}..., not from this one "
                             f"({sha[:16]}...): {fix}")
    for name, want in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != want["size"]:
            raise TuneforgeError(f"the converted model in {entry} is damaged: {name} is "
                                 f"{'missing' if not path.is_file() else 'not the size it was written with'}; {fix}")
        if sha256_of([path]) != want["sha256"]:
            raise TuneforgeError(f"the converted model in {entry} is damaged: the sha256 of {name} differs from the one "
                                 f"recorded when it was written; {fix}")
    return manifest


@contextmanager
def _locked(path: Path, label: str, log: Callable[[str], None]):
    """An exclusive ``fcntl`` lock for the time of one conversion (released by the OS if we die)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            log(f"{label}: waiting for {holder}, which is converting it now ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


Converter = Callable[..., dict]  # (gguf_path, out_dir, *, log) -> report


def cached_model_dir(source: GgufSource, *, converter: Converter | None = None,
                     log: Callable[[str], None] = _say) -> Path:
    """The converted directory of ``source``, converting it first if this machine has none."""
    for f in source.files:
        if not f.is_file():
            raise TuneforgeError(f"{source.label}: {f} does not exist")
    if source.expected_size is not None and source.size != source.expected_size:
        raise TuneforgeError(f"{source.label}: its parts hold {source.size:,} bytes, not the {source.expected_size:,} "
                             "of the complete GGUF; reinstall the packages (the error at load names them)")
    sha = source_sha256(source, log)
    entry = find_entry(sha)
    if entry is not None:
        verify_entry(entry, sha)
        return entry
    root = models_dir()
    with _locked(root / f".{sha[:16]}.lock", source.label, log):
        entry = find_entry(sha)  # another process may have finished it while we waited
        if entry is not None:
            verify_entry(entry, sha)
            return entry
        for stale in root.glob(f".tmp-{sha[:16]}-*"):  # a crashed conversion's leftovers (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        return _convert(source, sha, root, converter, log)


def _convert(source: GgufSource, sha: str, root: Path, converter: Converter | None,
             log: Callable[[str], None]) -> Path:
    if converter is None:
        from .gguf_import import convert_gguf as converter
    final = root / f"{source.name}-{sha[:16]}"
    tmp = root / f".tmp-{sha[:16]}-{os.getpid()}"
    log(f"{source.label}: first use on this machine — converting the GGUF ({source.size / 1e6:.1f} MB) to a plain "
        f"fp32 safetensors copy in {final}. This happens once; later loads read the copy.")
    t0 = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        gguf = source.files[0]
        if len(source.files) > 1:  # parts: the file transformers reads is their concatenation
            gguf = tmp / "source.gguf"
            with open(gguf, "wb") as out:
                for part in source.files:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, _CHUNK)
        report = converter(gguf, tmp / "model", log=log)
        if gguf.parent == tmp:
            gguf.unlink()
        model = tmp / "model"
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of([p])}
                 for p in sorted(model.iterdir()) if p.is_file()}
        log("  [4/4] checksums recorded")
        _atomic_json(model / MANIFEST, {
            "format": MANIFEST_FORMAT,
            "source": {"label": source.label, "files": [str(f) for f in source.files], "size": source.size,
                       "sha256": sha},
            "files": files, "conversion": report, "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _fsync_tree(model)
        os.rename(model, final)  # the one step that makes the copy visible: all of it or nothing
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise TuneforgeError(f"{source.label}: no space left for the converted copy in {root} (about 4 bytes per "
                                 "parameter); free some space or set TUNEFORGE_CACHE to a disk with more") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{source.label}: converted in {time.perf_counter() - t0:.1f} s -> {final}")
    return final


def _fsync_tree(directory: Path) -> None:
    """Flush every file before the rename publishes them, and give them the umask's permissions
    (safetensors writes 0600 files; a cache others on the machine share must be readable to them)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in directory.iterdir():
        os.chmod(p, 0o666 & ~mask)
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "gguf", "torch", "tuneforge"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
