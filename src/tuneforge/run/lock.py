"""One process per run directory: an exclusive ``fcntl`` lock on ``<run>/.lock`` held for the
life of the process that trains in it, with that process's pid, host and command written in
the file (who holds it, for the error message) and stale-lock detection (a holder that died
released its POSIX lock with it; the next process takes the lock over)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import TuneforgeError

LOCK = ".lock"


class RunBusy(TuneforgeError):
    """Another process holds the run directory's lock."""


def _key(path) -> str:
    return os.path.realpath(path)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError, OverflowError):
        return True  # it exists but is not ours, or it cannot be checked: assume it runs
    return True


def _record(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict) -> str:
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("since"):
        text += f" since {holder['since']}"
    return text + (f": {holder['command']}" if holder.get("command") else "")


def _try_lock(fd: int) -> OSError | None:
    """Lock ``fd``, or the error (with ``.holder``: what the holder wrote). Tried for up to half
    a second: another process may hold it only for a moment (a look by :func:`lock_holder`), and
    one that has just taken it writes its record right after."""
    for attempt in range(50):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN) or attempt == 49:
                err.holder = _record(fd)
                return err
            time.sleep(0.01)
    return None  # not reached


class RunLock:
    """The exclusive lock of one run directory, held by the process that trains in it until it ends.

    ``<run>/.lock`` is locked with ``fcntl.lockf`` (a POSIX record lock) and holds the holder's
    pid, host, start time and command. POSIX locks belong to a process: the kernel drops them
    when it dies, however it dies (SIGKILL included), so a lock file a dead process left behind
    is stale by construction and the next run simply takes it over (``stale`` keeps what it
    said); and forked children (data-loader workers) do not inherit them, so a dead trainer's
    orphaned workers cannot keep its run locked (``flock`` locks would be inherited). The price:
    locks of one process never exclude each other, and closing *any* descriptor of the file
    drops the lock — so the process keeps a registry of the directories it holds, refuses a
    second holder itself, and never opens a lock file it holds a second time.
    """

    _held: dict[str, RunLock] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = self.path / LOCK
        self.fd: int | None = None
        self.created = False   # the directory was made for the lock: removed again if nothing else lands in it
        self.record: dict = {}
        self.stale: dict = {}  # what the lock file of a dead holder said

    def acquire(self, purpose: str = "train") -> RunLock:
        key = _key(self.path)
        with RunLock._guard:
            mine = RunLock._held.get(key)
            if mine is not None:
                raise RunBusy(f"{self.path} is in use by another run of this process ({describe_holder(mine.record)}); "
                              "a run directory takes one run at a time — choose another output.dir")
            if self.path.exists() and not self.path.is_dir():
                raise TuneforgeError(f"output directory '{self.path}' is a file; set output.dir to a directory")
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                err = _try_lock(fd)
                if err is not None:
                    os.close(fd)
                    self._remove_if_made()
                    if err.errno not in (errno.EACCES, errno.EAGAIN):
                        raise TuneforgeError(f"cannot lock {self.file} ({err.strerror}); this filesystem does not "
                                             "support file locks — put output.dir on a local disk") from None
                    raise RunBusy(self._busy(err.holder, purpose)) from None
                try:  # a holder releasing it may have unlinked the file between our open and our lock
                    same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            self.stale = _record(fd)
            self.record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                           "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.record).encode(), 0)
            self.fd = fd
            RunLock._held[key] = self
        return self

    def _busy(self, holder: dict, purpose: str) -> str:
        who = describe_holder(holder) if holder else "a process starting right now"
        gone = bool(holder) and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
        note = (f"; that pid no longer runs on this host, so a process in another container holds it — if none "
                f"uses {self.path}, delete {self.file}" if gone else "")
        fix = (f"wait for it to end (or stop it), then `tuneforge train --resume {self.path}`" if purpose == "resume"
               else "wait for it to end (or stop it), or choose another output.dir")
        return f"{self.path} is in use by another tuneforge process ({who}){note}; {fix}"

    def release(self) -> None:
        with RunLock._guard:
            if self.fd is None:
                return
            try:  # unlinked while still held: whoever opened it meanwhile sees another inode and retries
                if os.stat(self.file).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.file)
            except OSError:
                pass
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None
                RunLock._held.pop(_key(self.path), None)
                self._remove_if_made()

    def _remove_if_made(self) -> None:
        if self.created:
            self.created = False
            try:
                self.path.rmdir()  # only when empty: a refused or failed start leaves nothing behind
            except OSError:
                pass


def lock_holder(path) -> dict | None:
    """What the process holding ``path``'s lock wrote, or None when no process holds it."""
    path = Path(path)
    with RunLock._guard:
        mine = RunLock._held.get(_key(path))
        if mine is not None:
            return mine.record
        try:
            fd = os.open(path / LOCK, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError:  # not writable (a read-only copy): judge by the pid
            try:
                holder = json.loads((path / LOCK).read_text())
            except (OSError, ValueError):
                return None
            here = holder.get("host") == socket.gethostname()
            return holder if not here or _alive(holder.get("pid")) else None
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return _record(fd) or {"pid": "?", "host": "?"}
            fcntl.lockf(fd, fcntl.LOCK_UN)  # it was free
            return None
        finally:
            os.close(fd)


