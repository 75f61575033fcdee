"""The service's database: SQLAlchemy 2 models and the engine, SQLite (WAL) or PostgreSQL by URL.

Tables: projects, api_keys, files, jobs, events, checkpoints, workers. Every object the API
hands out has an OpenAI-style id (``file-...``, ``ftjob-...``, ``ftevent-...``,
``ftckpt-...``) and an integer ``seq`` that orders it: cursor pages (``after=ID``) read the
``seq`` of that id and continue below it (newest first, as OpenAI's lists are). Times are
Unix seconds as floats (portable across both databases; the API returns whole seconds).

The schema itself is created and changed only by Alembic migrations (``migrations/``);
``tests/service/test_db.py`` checks that the migrations produce exactly these models.

Concurrency. Workers claim jobs in one short write transaction each. On PostgreSQL that is
``SELECT ... FOR UPDATE SKIP LOCKED`` (``claim_next`` in ``worker.py``). SQLite has no row
locks: a write transaction there starts with ``BEGIN IMMEDIATE`` (:func:`write_session`),
which takes the database's one write lock *before* reading, so two workers can never both
read the same queued row and then both update it. pysqlite's own implicit BEGIN (deferred)
is switched off for that reason (SQLAlchemy's documented recipe, "pysqlite: Serializable
isolation"); reads need no transaction in WAL mode and never wait for the writer.
"""

from __future__ import annotations

import secrets
import time
from contextlib import contextmanager

from sqlalchemy import (JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint,
                        create_engine, event)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..errors import TuneforgeError

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running", "paused")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id"), nullable=True)  # None: an admin key
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16))          # the key's first characters, to recognise it in lists
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class File(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))             # chat | preference | records | table | results
    rows: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("project_id", "idempotency_key", name="uq_jobs_idempotency"),
                      Index("ix_jobs_status_seq", "status", "seq"))
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)  # OpenAI's `metadata`
    method: Mapped[dict] = mapped_column(JSON)                # {"type": ..., "<type>": {"hyperparameters": ...}}
    hyperparameters: Mapped[dict] = mapped_column(JSON)       # resolved: "auto" replaced by the value used
    extension: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the request's `tuneforge` object
    recipe: Mapped[dict] = mapped_column(JSON)                # the whole recipe the run gets
    status: Mapped[str] = mapped_column(String(20))
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    train_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # this attempt's first step
    train_started_step: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    control: Mapped[str | None] = mapped_column(String(16), nullable=True)  # a request: cancel | pause
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_dir: Mapped[str] = mapped_column(Text)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(8))             # info | warn | error
    type: Mapped[str] = mapped_column(String(8))              # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number", name="uq_checkpoints_step"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class Worker(Base):
    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    stopped_at: Mapped[float | None] = mapped_column(Float, nullable=True)


# --------------------------------------------------------------------------- engine and sessions

class Database:
    """One engine per process, two session factories: ``read()`` (no transaction on SQLite) and
    ``write()`` (``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL an ordinary transaction, rows
    locked where a query asks for it)."""

    def __init__(self, url: str):
        self.url = url
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            # check_same_thread: FastAPI runs endpoints in a thread pool; the pool hands a
            # connection to one thread at a time, which is all pysqlite's check protects.
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        elif url.startswith(("postgresql", "postgres")):
            url = url.replace("postgres://", "postgresql://", 1)
            if url.startswith("postgresql://"):
                url = url.replace("postgresql://", "postgresql+psycopg://", 1)  # psycopg 3 (the service extra)
            self.url = url
            self.engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
        else:
            raise TuneforgeError(f"--db {url!r}: use sqlite:///PATH (the default, one host) or "
                                 "postgresql://USER:PASSWORD@HOST:PORT/DB (several hosts, many workers)")
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(tf_immediate=True), expire_on_commit=False)

    @contextmanager
    def read(self):
        with self._read() as session:
            yield session

    @contextmanager
    def write(self):
        """A write transaction, committed on success, rolled back on any error."""
        with self._write() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_connect(dbapi_connection, record) -> None:
    dbapi_connection.isolation_level = None  # no implicit deferred BEGIN: _sqlite_begin says how to begin
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer, nor it for them
    cursor.execute("PRAGMA busy_timeout=30000")  # a writer waits up to 30 s for the write lock
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes (sqlite.org/wal)
    cursor.close()


def _sqlite_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("tf_immediate") else "BEGIN")


def job_by_id(session: Session, job_id: str) -> Job | None:
    """A job by its public id (the primary key is ``seq``, which orders pages)."""
    from sqlalchemy import select

    return session.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()


def sqlite_url(path) -> str:
    return f"sqlite:///{path}"


def page(session: Session, query, model, after: str | None, limit: int):
    """One cursor page, newest first: (rows, has_more). ``after``: the id of the last row of
    the previous page (an unknown id is a 404 raised by the caller's lookup)."""
    from sqlalchemy import select

    if after:
        seq = session.execute(select(model.seq).where(model.id == after)).scalar_one_or_none()
        if seq is None:
            return None, False
        query = query.where(model.seq < seq)
    rows = list(session.execute(query.order_by(model.seq.desc()).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit
