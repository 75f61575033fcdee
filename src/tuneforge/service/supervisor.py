"""What the server process does besides answering requests.

:class:`Supervisor` (a thread in the server): moves each new job from ``validating_files`` to
``queued`` once its data has been read the way the run will read it (``run/build.py``'s
``read_data``: the task's own reader, labels, splits) — or to ``failed`` with
``error.code = invalid_training_file`` naming the problem — and re-queues running jobs whose
worker stopped heartbeating, so a job is rescued even when every worker is busy or gone.

:class:`WorkerPool`: the ``--workers N`` processes of ``tuneforge service start``, each an
ordinary ``tuneforge service worker`` told the server's pid (it stops, checkpointing its job,
if the server dies). A worker that exits is started again. On a machine with GPUs worker i
sees only GPU ``i mod n`` (``CUDA_VISIBLE_DEVICES``), so each trains on its own device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from sqlalchemy import select

from .db import Job, job_by_id, now
from .events import add_event


def validate_job(recipe_data: dict) -> str | None:
    """None if the run can read this job's data, else why not (the run's own message)."""
    from ..errors import TuneforgeError
    from ..recipe import load_recipe
    from ..run.build import read_data
    from ..run.job import Job as RunJob

    try:
        job = RunJob(load_recipe(recipe_data), console=None, log=lambda message: None)
        read_data(job)
    except TuneforgeError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - whatever the reader raised is the user's answer
        return f"{type(err).__name__}: {err}"
    return None


class Supervisor:
    def __init__(self, cfg, db, interval_s: float = 0.25):
        self.cfg, self.db, self.interval_s = cfg, db, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tuneforge-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        from .worker import reap_stale

        last_reap = 0.0
        while not self._stop.is_set():
            try:
                busy = self.validate_one()
                if time.monotonic() - last_reap > self.cfg.heartbeat_s:
                    reap_stale(self.db, self.cfg.stale_after_s)
                    last_reap = time.monotonic()
            except Exception as err:  # noqa: BLE001 - the database restarting: say so, try again on the next tick
                print(f"tuneforge service: supervisor: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                busy = False
            if not busy:
                self._stop.wait(self.interval_s)

    def validate_one(self) -> bool:
        with self.db.read() as s:
            job = s.execute(select(Job).where(Job.status == "validating_files").order_by(Job.seq).limit(1)
                            ).scalar_one_or_none()
        if job is None:
            return False
        problem = validate_job(job.recipe)
        with self.db.write() as s:
            row = job_by_id(s, job.id)
            if row is None or row.status != "validating_files":
                return True  # cancelled meanwhile
            if problem is None:
                row.status = "queued"
                add_event(s, row.id, "Files validated, moving job to queued state")
            else:
                row.status, row.finished_at = "failed", now()
                row.error = {"code": "invalid_training_file", "message": problem[:2000], "param": "training_file"}
                add_event(s, row.id, f"Validation of the training data failed: {problem[:500]}", level="error")
        return True


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


class WorkerPool:
    def __init__(self, cfg, n: int, argv_extra: list[str] | None = None):
        self.cfg, self.n = cfg, n
        self.argv_extra = list(argv_extra or [])
        self.procs: list[subprocess.Popen | None] = [None] * n
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.gpus = _gpu_count() if n else 0

    def _spawn(self, i: int) -> subprocess.Popen:
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % self.gpus)
        cmd = [sys.executable, "-m", "tuneforge", "service", "worker", "--data-dir", str(self.cfg.data_dir),
               "--db", self.cfg.db_url, "--name", f"worker-{i + 1}-{os.getpid()}", "--parent-pid", str(os.getpid()),
               *self.cfg_flags(), *self.argv_extra]
        return subprocess.Popen(cmd, env=env)

    def cfg_flags(self) -> list[str]:
        c = self.cfg
        flags = ["--heartbeat-s", str(c.heartbeat_s), "--stale-after-s", str(c.stale_after_s), "--poll-s",
                 str(c.poll_s)]
        if c.max_concurrent:
            flags += ["--max-concurrent", str(c.max_concurrent)]
        return flags

    def start(self) -> None:
        if not self.n:
            return
        for i in range(self.n):
            self.procs[i] = self._spawn(i)
        self._thread = threading.Thread(target=self._watch, name="tuneforge-workers", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None and not self._stop.is_set():
                    self.procs[i] = self._spawn(i)  # a killed worker's job is re-queued by the reaper

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()  # SIGTERM: the job stops after its step, with a checkpoint, and is queued again
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
