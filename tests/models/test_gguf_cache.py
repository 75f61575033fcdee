"""The cache of converted GGUF models: atomic, locked, checksummed — tested with a fake converter
(the real one is tested on a tiny GGUF in test_gguf_import.py)."""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.models import gguf_cache
from tuneforge.models.gguf_cache import MANIFEST, GgufSource, cached_model_dir


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def source(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return GgufSource.file(f)


class FakeConverter:
    """Writes two files; ``fail_after_first`` raises half-way, as a crash would."""

    def __init__(self, delay: float = 0.0, fail_after_first: BaseException | None = None):
        self.calls, self.delay, self.fail = 0, delay, fail_after_first
        self.lock = threading.Lock()

    def __call__(self, gguf, out, *, log):
        with self.lock:
            self.calls += 1
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"from": gguf.read_bytes()[:4].decode()}))
        if self.fail is not None:
            raise self.fail
        time.sleep(self.delay)
        (out / "model.safetensors").write_bytes(b"w" * 1000)
        return {"read_s": 0.0}


def test_converts_once_then_reads_the_copy(source, cache):
    conv, lines = FakeConverter(), []
    first = cached_model_dir(source, converter=conv, log=lines.append)
    assert first.parent == cache / "models" and first.name.startswith("m-")
    assert (first / "model.safetensors").read_bytes() == b"w" * 1000
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == gguf_cache.sha256_of(source.files)
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert any("first use on this machine" in line and "happens once" in line for line in lines)
    again = cached_model_dir(source, converter=conv, log=lines.append)
    assert again == first and conv.calls == 1
    assert not list((cache / "models").glob(".tmp-*"))  # nothing left over


def test_a_renamed_copy_of_the_same_file_finds_the_conversion(source, tmp_path):
    conv = FakeConverter()
    first = cached_model_dir(source, converter=conv, log=lambda _: None)
    other = tmp_path / "renamed.gguf"
    other.write_bytes(source.files[0].read_bytes())
    assert cached_model_dir(GgufSource.file(other), converter=conv, log=lambda _: None) == first
    assert conv.calls == 1


def test_a_failed_conversion_leaves_nothing_and_the_next_one_works(source, cache):
    with pytest.raises(RuntimeError, match="boom"):
        cached_model_dir(source, converter=FakeConverter(fail_after_first=RuntimeError("boom")), log=lambda _: None)
    models = cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == []  # no entry, even half-made
    assert not list(models.glob(".tmp-*"))
    assert (cached_model_dir(source, converter=FakeConverter(), log=lambda _: None) / "model.safetensors").exists()


def test_a_killed_conversion_s_leftovers_are_never_read_and_are_cleaned(source, cache):
    sha = gguf_cache.sha256_of(source.files)
    stale = cache / "models" / f".tmp-{sha[:16]}-99999"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "config.json").write_text("{}")  # what a SIGKILL mid-conversion leaves
    conv = FakeConverter()
    entry = cached_model_dir(source, converter=conv, log=lambda _: None)
    assert conv.calls == 1 and entry != stale and not stale.exists()


def test_no_space_left_is_a_clear_error(source):
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(TuneforgeError, match="no space left.*TUNEFORGE_CACHE"):
        cached_model_dir(source, converter=FakeConverter(fail_after_first=full), log=lambda _: None)


def test_two_processes_at_once_convert_once(source):
    """Two loaders at the same moment: the lock makes one wait for the other's copy."""
    conv, lines, out, errors = FakeConverter(delay=0.6), [], [], []

    def load():
        try:
            out.append(cached_model_dir(source, converter=conv, log=lines.append))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.15)
    for t in threads:
        t.join(10)
    assert not errors and conv.calls == 1 and len(set(out)) == 1
    assert any("waiting for pid" in line for line in lines)


@pytest.mark.parametrize("damage", ["edit", "truncate", "delete", "manifest"])
def test_a_damaged_copy_is_refused_with_the_fix(source, damage):
    entry = cached_model_dir(source, converter=FakeConverter(), log=lambda _: None)
    weights = entry / "model.safetensors"
    if damage == "edit":
        weights.write_bytes(b"x" * 1000)  # same size, other bytes: only the sha256 tells
    elif damage == "truncate":
        weights.write_bytes(b"w" * 10)
    elif damage == "delete":
        weights.unlink()
    else:
        (entry / MANIFEST).write_text("{not json")
    with pytest.raises(TuneforgeError, match=f"rm -rf '{entry}'.*converted anew") as e:
        cached_model_dir(source, converter=FakeConverter(), log=lambda _: None)
    if damage != "manifest":
        assert "model.safetensors" in str(e.value)


def test_the_source_is_hashed_once_until_it_changes(source, monkeypatch):
    conv, hashed = FakeConverter(), []
    real = gguf_cache.sha256_of
    monkeypatch.setattr(gguf_cache, "sha256_of", lambda files: hashed.append(list(files)) or real(files))
    cached_model_dir(source, converter=conv, log=lambda _: None)
    n = sum(1 for files in hashed if files == list(source.files))
    cached_model_dir(source, converter=conv, log=lambda _: None)
    assert sum(1 for files in hashed if files == list(source.files)) == n == 1  # the index answered
    # an edited file (new size and mtime) hashes again and converts again
    source.files[0].write_bytes(source.files[0].read_bytes() + b"more")
    cached_model_dir(source, converter=conv, log=lambda _: None)
    assert conv.calls == 2


def test_parts_are_concatenated_and_their_size_checked(tmp_path):
    parts = []
    for n, chunk in enumerate((b"GGUF" + b"a" * 50, b"b" * 60)):
        parts.append(tmp_path / f"part{n}.bin")
        parts[-1].write_bytes(chunk)
    seen = []

    def conv(gguf, out, *, log):
        seen.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")
        return {}

    entry = cached_model_dir(GgufSource("parts", tuple(parts), "parts", expected_size=114), converter=conv,
                             log=lambda _: None)
    assert seen == [b"GGUF" + b"a" * 50 + b"b" * 60]
    assert not (entry / "source.gguf").exists()  # the concatenation is not kept
    with pytest.raises(TuneforgeError, match="hold 114 bytes, not the 200.*reinstall"):
        cached_model_dir(GgufSource("parts", tuple(parts), "parts", expected_size=200), converter=conv,
                         log=lambda _: None)
