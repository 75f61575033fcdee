"""Workers: separate processes that claim queued jobs and run each as an ordinary tuneforge run.

    loop:  re-queue jobs whose worker went silent -> claim the oldest queued job -> run it -> repeat

Claiming is one short write transaction: PostgreSQL locks the row with ``FOR UPDATE SKIP
LOCKED`` (two workers never wait on, or take, the same job) and serialises the
``--max-concurrent`` count with a transaction-scoped advisory lock; SQLite's ``BEGIN
IMMEDIATE`` (``db.py``) makes the whole read-then-update exclusive. A job runs in the worker's
main thread through ``run/finetune.py`` into ``<data-dir>/jobs/<id>/run`` — the run directory
with its recipe, manifest, metrics, checkpoints and report, locked by ``run/lock.py`` while
this process trains in it. A second thread heartbeats every ``heartbeat_s``: it stamps the job
and the worker row, copies the progress, and reads cancel / pause requests into the
:class:`~tuneforge.service.events.Control` that the engine callback acts on at the end of the
step. A job whose heartbeat is older than ``stale_after_s`` (its worker was killed, or its host
died) is queued again by whoever looks first (another worker, or the server), and the next
worker continues it exactly from its newest checkpoint (``finetune(resume=run_dir)``).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import func, select, text

from ..errors import TuneforgeError
from .db import File, Job, Worker, job_by_id, new_id, now
from .events import Control, ServiceCallback, add_event


def claim_next(db, worker_id: str, max_concurrent: int | None) -> Job | None:
    with db.write() as s:
        if not db.sqlite:
            s.execute(text("SELECT pg_advisory_xact_lock(16016)"))  # one claim at a time: the count below holds
        if max_concurrent:
            running = s.execute(select(func.count()).select_from(Job).where(Job.status == "running")).scalar_one()
            if running >= max_concurrent:
                return None
        job = s.execute(select(Job).where(Job.status == "queued").order_by(Job.seq).limit(1)
                        .with_for_update(skip_locked=True)).scalar_one_or_none()
        if job is None:
            return None
        job.status, job.worker_id, job.heartbeat_at = "running", worker_id, now()
        job.attempts += 1
        job.started_at = job.started_at or now()
        job.train_started_at, job.train_started_step = None, job.step
        s.flush()
        return job


def reap_stale(db, stale_after_s: float) -> list[str]:
    """Queue again every running job whose worker has not heartbeat for ``stale_after_s``."""
    cutoff = now() - stale_after_s
    with db.write() as s:
        jobs = list(s.execute(select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)
                              .with_for_update(skip_locked=True)).scalars())
        for job in jobs:
            silent = now() - (job.heartbeat_at or now())
            add_event(s, job.id, f"Worker {job.worker_id} stopped responding ({silent:.0f} s without a heartbeat); the "
                                 "job is queued again and continues from its last checkpoint", level="warn")
            job.status, job.worker_id = "queued", None
            if job.control == "cancel":
                job.status, job.finished_at, job.control = "cancelled", now(), None
            elif job.control == "pause":
                job.status, job.control = "paused", None
        return [j.id for j in jobs]


class WorkerProcess:
    def __init__(self, cfg, db, name: str | None = None, parent_pid: int | None = None):
        self.cfg, self.db = cfg, db
        self.id = name or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.parent_pid = parent_pid
        self.stopping = False
        self.control: Control | None = None

    # -- the loop ---------------------------------------------------------------------------
    def run(self, once: bool = False) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # Import the training stack before claiming anything: loading torch and transformers holds
        # the GIL for seconds, which would starve the first job's heartbeat thread.
        import transformers  # noqa: F401

        from ..run import finetune  # noqa: F401
        with self.db.write() as s:
            s.merge(Worker(id=self.id, host=socket.gethostname(), pid=os.getpid(), started_at=now(),
                           heartbeat_at=now(), job_id=None, stopped_at=None))
        try:
            while not self.stopping:
                self._parent_check()
                reap_stale(self.db, self.cfg.stale_after_s)
                job = claim_next(self.db, self.id, self.cfg.max_concurrent)
                if job is None:
                    self._beat_worker(None)
                    if once:
                        return
                    time.sleep(self.cfg.poll_s)
                    continue
                self.run_job(job)
                if once:
                    return
        finally:
            with self.db.write() as s:
                row = s.get(Worker, self.id)
                if row is not None:
                    row.stopped_at, row.job_id = now(), None

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True  # between jobs: leave the loop; during one: finetune's own handler stops the step
        if self.control is not None:
            self.control.request("stopping")

    def _parent_check(self) -> None:
        if self.parent_pid and os.getppid() != self.parent_pid:  # the server that started us is gone
            self.stopping = True
            if self.control is not None:
                self.control.request("stopping")

    def _beat_worker(self, job_id: str | None) -> None:
        with self.db.write() as s:
            row = s.get(Worker, self.id)
            if row is not None:
                row.heartbeat_at, row.job_id = now(), job_id

    # -- one job ----------------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        from ..run.finetune import RunInterrupted, finetune
        from ..run.lock import RunBusy

        control = self.control = Control()
        run_dir = Path(job.run_dir)
        resume, overwrite, note = _how_to_start(run_dir)
        with self.db.write() as s:
            add_event(s, job.id, (f"Fine-tuning job started on {self.id}" if job.attempts == 1 and not resume else
                                  f"Attempt {job.attempts} on {self.id}: {note}"))
        beat = threading.Thread(target=self._heartbeat, args=(job.id, control), daemon=True)
        stop_beat = threading.Event()
        beat.stop = stop_beat
        beat.start()
        outcome, error = "succeeded", None
        try:
            log = (run_dir.parent / "worker.log").open("a", encoding="utf-8")
            from rich.console import Console

            console = Console(file=log, width=120, force_terminal=False, no_color=True)
            try:
                result = finetune(job.recipe, console=console, argv=["tuneforge", "service", "worker", job.id],
                                  overwrite=overwrite, resume=str(run_dir) if resume else None,
                                  callbacks=[ServiceCallback(self.db, job.id, control)])
            finally:
                log.close()
        except RunInterrupted:
            outcome = control.reason or "stopping"
            if outcome == "stopping":  # SIGTERM reached finetune's own handler, not ours: leave after this job
                self.stopping = True
        except RunBusy as err:
            outcome, error = "busy", str(err)
        except TuneforgeError as err:
            outcome, error = "failed", {"code": "training_failed", "message": str(err)[:2000], "param": None}
        except Exception as err:  # noqa: BLE001 - a job's failure is the job's, never the worker's
            outcome, error = "failed", {"code": "internal_error", "message": f"{type(err).__name__}: {str(err)[:2000]}",
                                        "param": None}
        finally:
            stop_beat.set()
            beat.join(timeout=10)
            self.control = None
        if outcome == "succeeded":
            self._succeeded(job, result, control)
        else:
            self._stopped(job, outcome, error, control)
        self._beat_worker(None)

    def _heartbeat(self, job_id: str, control: Control) -> None:
        stop = threading.current_thread().stop
        while not stop.wait(self.cfg.heartbeat_s):
            self._parent_check()
            try:
                with self.db.write() as s:
                    job = job_by_id(s, job_id)
                    if job is None or job.status != "running" or job.worker_id != self.id:
                        control.request("lost")  # re-queued while we were silent: someone else owns it now
                        return
                    job.heartbeat_at = now()
                    job.step, job.total_steps = control.step, control.total_steps
                    if control.train_started and job.train_started_at is None:
                        job.train_started_at, job.train_started_step = control.train_started
                    if job.control in ("cancel", "pause"):
                        control.request(job.control)
                    row = s.get(Worker, self.id)
                    if row is not None:
                        row.heartbeat_at, row.job_id = now(), job_id
            except Exception:  # noqa: BLE001 - a database hiccup: try again next beat (the reaper is lenient)
                continue

    def _succeeded(self, job: Job, result, control: Control) -> None:
        from .jobs import fine_tuned_name
        from .results import results_file

        path, sha, size, rows = results_file(Path(job.run_dir), self.cfg.data_dir)
        with self.db.write() as s:
            row = job_by_id(s, job.id)
            if row.status != "running" or row.worker_id != self.id:
                return
            file_id = new_id("file")
            s.add(File(id=file_id, project_id=row.project_id, filename="step_metrics.csv", purpose="fine-tune-results",
                       bytes=size, sha256=sha, kind="results", rows=rows, created_at=now()))
            row.status, row.finished_at, row.control = "succeeded", now(), None
            row.fine_tuned_model = fine_tuned_name(row.model, row.suffix, row.id)
            row.result_files = [file_id]
            row.trained_tokens = control.tokens or None
            row.step = control.step
            metrics = {k: v for k, v in (result.metrics.get("validation") or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "eval_seconds"}
            add_event(s, row.id, f"New fine-tuned model created: {row.fine_tuned_model}",
                      data={"final_validation": metrics, "run_dir": str(result.path)})
            add_event(s, row.id, "The job has successfully completed")

    def _stopped(self, job: Job, outcome: str, error, control: Control) -> None:
        with self.db.write() as s:
            row = job_by_id(s, job.id)
            if row is None or row.worker_id != self.id or row.status != "running":
                return  # "lost": the job was queued again and belongs to another worker now
            row.step = control.step
            if outcome == "failed":
                row.status, row.finished_at, row.error = "failed", now(), error
                add_event(s, row.id, f"Fine-tuning job failed: {error['message'][:500]}", level="error")
            elif outcome == "cancel":
                row.status, row.finished_at, row.control = "cancelled", now(), None
                add_event(s, row.id, f"Job cancelled at step {control.step}; its checkpoints are kept",
                          data={"seen_at_step": control.seen_step, "stopped_at_step": control.step})
            elif outcome == "pause":
                row.status, row.control = "paused", None
                add_event(s, row.id, f"Job paused at step {control.step} with a checkpoint; resume continues from it",
                          data={"seen_at_step": control.seen_step, "stopped_at_step": control.step})
            else:  # the worker is stopping, or another process holds the run directory: let another try
                row.status = "queued"
                add_event(s, row.id, (f"Worker {self.id} is stopping: job queued again at step {control.step}; it "
                                      "continues from its checkpoint" if outcome != "busy" else
                                      f"The run directory is busy ({error}); queued again"), level="warn")
            row.worker_id = None


def _how_to_start(run_dir: Path) -> tuple[bool, bool | None, str]:
    """(resume?, overwrite, what the event says): continue a run that has a checkpoint, start
    afresh one that never got to its first checkpoint."""
    from ..engine.checkpoint import newest_valid
    from ..run.rundir import RUN_MARKER, read_manifest

    if not (run_dir / RUN_MARKER).exists():
        return False, None, "starting"
    try:
        status = read_manifest(run_dir).get("status")
    except TuneforgeError:
        status = None
    checkpoint = newest_valid(run_dir / "checkpoints", report=lambda message: None)
    if status != "completed" and checkpoint is not None:
        return True, None, f"continuing exactly from checkpoint {checkpoint.name}"
    return False, True, "starting again (the earlier attempt wrote no checkpoint)"


def run_worker(cfg, name: str | None = None, parent_pid: int | None = None, once: bool = False) -> None:
    from .db import Database

    db = Database(cfg.db_url)
    try:
        WorkerProcess(cfg, db, name=name, parent_pid=parent_pid).run(once=once)
    finally:
        db.dispose()
