"""Fixtures of the service tests: every test module that uses ``service`` runs once on SQLite and
once on a real PostgreSQL server (a throw-away cluster started here with Debian's binaries).

``service`` is one server process with two worker processes per database, shared by every test
(starting one costs seconds); each test makes its own jobs. Keys of two projects,
``alpha`` and ``beta``, and an admin key are made before the server starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from svc import PostgresCluster, Server


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    from tuneforge.llm.tiny import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("svc_lm") / "tiny-lm")


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory):
    if not PostgresCluster.available():
        pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql (.ci/run installs it); the service "
                    "tests run on SQLite and on PostgreSQL")
    cluster = PostgresCluster(Path("/tmp") / f"tf-pg-{tmp_path_factory.getbasetemp().name}")
    cluster.start()
    yield cluster
    cluster.stop()


_DB_COUNT = [0]


def new_db_url(request, tmp: Path, kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'service.db'}"
    _DB_COUNT[0] += 1
    return request.getfixturevalue("pg_cluster").new_database(f"t{_DB_COUNT[0]}")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    return new_db_url(request, tmp_path, request.param)


@dataclass
class Service:
    server: Server
    keys: dict = field(default_factory=dict)  # alpha, beta, admin
    tmp: Path = Path(".")
    kind: str = "sqlite"

    def client(self, project: str = "alpha"):
        from openai import OpenAI

        return OpenAI(base_url=self.server.url + "/v1", api_key=self.keys[project], max_retries=0, timeout=120)


def make_keys(data_dir: Path, db_url: str) -> dict:
    from tuneforge.service.auth import create_key
    from tuneforge.service.db import Database
    from tuneforge.service.migrate import migrate

    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(db_url)
    migrate(db)
    keys = {p: create_key(db, p)[0] for p in ("alpha", "beta")}
    keys["admin"] = create_key(db, None, "root", admin=True)[0]
    db.dispose()
    return keys


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def service(request, tmp_path_factory, tiny_lm, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp(f"service_{request.param}")
    (tmp / "data").mkdir()
    url = new_db_url(request, tmp / "data", request.param)
    keys = make_keys(tmp / "data", url)
    server = Server(tmp / "data", url, {"tiny-lm": str(tiny_lm), "tiny-bert": str(tiny_bert_dir)}).start()
    yield Service(server=server, keys=keys, tmp=tmp, kind=request.param)
    server.stop()


# The training-heavy fault tests run on SQLite in the default suite and on PostgreSQL under
# `make test-slow`: each costs a server start and several tiny jobs (minutes on a busy 2-core
# machine), and what differs between the databases — claiming, re-queueing, pages, isolation —
# is covered on PostgreSQL by test_db.py, test_api.py and the acceptance and cancel tests.
HEAVY_ON_POSTGRES = ("test_dpo_job", "test_text_classification_through_the_extension",
                     "test_pause_and_resume_continue_the_run",
                     "test_killed_worker_resumes_elsewhere_with_the_same_final_metrics",
                     "test_server_killed_and_restarted_keeps_every_job", "test_dashboard_creates_a_job_and_shows_its_report")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.originalname in HEAVY_ON_POSTGRES and "postgres" in (params.get("service"), params.get("db_url")):
            item.add_marker(pytest.mark.slow)
