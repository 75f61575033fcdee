"""The database layer on SQLite and PostgreSQL: migrations match the models, claims never give one
job to two workers, stale jobs go back to the queue, and a killed server loses nothing."""

from __future__ import annotations

import threading

import pytest

from tuneforge.service.db import Database, Job, new_id, now


def _migrated(url):
    from tuneforge.service.migrate import head, migrate

    db = Database(url)
    assert migrate(db) == head()
    return db


def test_migrations_create_exactly_the_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tuneforge.service.db import Base

    db = _migrated(db_url)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"the models and migrations/ differ; write a migration for: {diff}"
    from tuneforge.service.migrate import migrate

    assert migrate(db) == "0001"  # a second upgrade is a no-op
    if db.sqlite:
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    db.dispose()


def _queue(db, n: int) -> list[str]:
    from tuneforge.service.db import Project

    ids = []
    with db.write() as s:
        s.add(Project(id="p1", name="p1", created_at=now()))
        s.flush()
        for i in range(n):
            ids.append(new_id("ftjob"))
            s.add(Job(id=ids[-1], project_id="p1", model="m", training_file="f", seed=1, method={}, hyperparameters={},
                      recipe={}, status="queued", created_at=now(), run_dir="/nonexistent", result_files=[],
                      step=0, attempts=0, train_started_step=0))
    return ids


def test_concurrent_claims_give_every_job_to_exactly_one_worker(db_url):
    from tuneforge.service.worker import claim_next

    db = _migrated(db_url)
    ids = _queue(db, 30)
    claimed: dict[str, list[str]] = {}
    errors = []

    def worker(name):
        try:
            while (job := claim_next(db, name, None)) is not None:
                claimed.setdefault(name, []).append(job.id)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = [j for jobs in claimed.values() for j in jobs]
    assert sorted(got) == sorted(ids)  # none lost, none twice
    with db.read() as s:
        from sqlalchemy import select

        rows = s.execute(select(Job)).scalars().all()
        assert {r.status for r in rows} == {"running"} and all(r.attempts == 1 for r in rows)
    db.dispose()


def test_max_concurrent_is_respected_and_stale_jobs_are_requeued(db_url):
    from tuneforge.service.db import job_by_id
    from tuneforge.service.worker import claim_next, reap_stale

    db = _migrated(db_url)
    ids = _queue(db, 3)
    first = claim_next(db, "w1", 2)
    second = claim_next(db, "w2", 2)
    assert first and second and claim_next(db, "w3", 2) is None  # two running: the limit
    with db.write() as s:
        job_by_id(s, first.id).heartbeat_at = now() - 60  # w1 went silent a minute ago
    assert reap_stale(db, 10) == [first.id]
    with db.read() as s:
        row = job_by_id(s, first.id)
        assert (row.status, row.worker_id) == ("queued", None)
    again = claim_next(db, "w3", 2)
    assert again.id == first.id and again.attempts == 2
    assert set(ids) >= {first.id, second.id}
    db.dispose()


@pytest.mark.parametrize("shape", ["chat", "preference", "table"])
def test_upload_validation_names_the_line(tmp_path, shape):
    from tuneforge.service.files import BadUpload, validate

    good = {"chat": '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            "preference": '{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": '
                          '[{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", '
                          '"content": "b"}]}',
            "table": "text,label\nnice,pos\nbad,neg"}[shape]
    bad = {"chat": '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
           "preference": '{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": '
                         '[{"role": "user", "content": "a"}], "non_preferred_output": [{"role": "assistant", '
                         '"content": "b"}]}',
           "table": "x,y,z"}[shape]
    name = "data.csv" if shape == "table" else "data.jsonl"
    path = tmp_path / name
    path.write_text(good + "\n" + good.split("\n")[-1] + "\n")
    kind, rows = validate(path, name, 100)
    assert kind == shape and rows == (3 if shape == "table" else 2)
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(BadUpload) as err:
        validate(path, name, 100)
    line = 4 if shape == "table" else 2
    assert err.value.line == line and f"line {line}:" in str(err.value)
