"""Helpers for the service tests: a throw-away PostgreSQL cluster, a server started as a real
process (with its worker processes), and the tiny training files the jobs use."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PG_BIN = Path(os.environ.get("TUNEFORGE_PG_BIN", "/usr/lib/postgresql/15/bin"))
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- PostgreSQL

def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root (CI runs as root here): run its tools as the postgres user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


class PostgresCluster:
    """initdb + pg_ctl start on a free port in ``root``; ``stop()`` removes it all."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "pgdata"
        self.port = free_port()

    @staticmethod
    def available() -> bool:
        return (PG_BIN / "initdb").exists() and (os.geteuid() != 0 or _has_user("postgres"))

    def start(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            uid = pwd.getpwnam("postgres").pw_uid
            os.chown(self.root, uid, -1)
            os.chmod(self.root, 0o755)
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                                     "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                                     str(self.root / "pg.log"), "-w", "start"]), check=True, capture_output=True)
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self, name: str) -> str:
        subprocess.run(_as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                     "postgres", name]), check=True, capture_output=True)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# --------------------------------------------------------------------------- the server

class Server:
    """``tuneforge service start`` as a child process (its workers are its own children)."""

    def __init__(self, data_dir: Path, db_url: str, models: dict[str, str], workers: int = 2, port: int | None = None,
                 extra: list[str] | None = None):
        self.data_dir, self.db_url, self.models, self.workers = Path(data_dir), db_url, models, workers
        self.port = port or free_port()
        self.extra = list(extra or [])
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tuneforge", "service", "start", "--data-dir", str(self.data_dir), "--db",
               self.db_url, "--workers", str(self.workers), "--port", str(self.port), "--heartbeat-s", "0.3",
               "--stale-after-s", "5", "--poll-s", "0.2", *self.extra]
        for name, target in self.models.items():
            cmd += ["--model", f"{name}={target}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not answer in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server alone (its workers notice and stop by themselves)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # nothing of ours left behind: workers of a killed server too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for(predicate, timeout: float = 240, every: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_terminal(client, job_id: str, timeout: float = 300):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in
                    ("succeeded", "failed", "cancelled") and j, timeout=timeout, what=f"job {job_id} to finish")


# --------------------------------------------------------------------------- training files

def chat_file(tiny_lm: Path, path: Path, n: int = 48) -> Path:
    rows = [json.loads(line) for line in (tiny_lm / "sft-train.jsonl").read_text().splitlines()][:n]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["completion"]}]}) + "\n"
                            for r in rows))
    return path


def preference_file(tiny_lm: Path, path: Path, n: int = 32) -> Path:
    rows = [json.loads(line) for line in (tiny_lm / "dpo-train.jsonl").read_text().splitlines()][:n]
    path.write_text("".join(json.dumps({"input": {"messages": [{"role": "user", "content": r["prompt"]}]},
                                        "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
                                        "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}]}) + "\n"
                            for r in rows))
    return path


def events_of(client, job_id: str) -> list:
    return list(client.fine_tuning.jobs.list_events(job_id, limit=100))
