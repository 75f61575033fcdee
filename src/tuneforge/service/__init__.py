"""The job service: OpenAI's fine-tuning API over tuneforge runs (``docs/service.md``).

    api.py         FastAPI app: files, jobs, events, checkpoints, models, completions, predict, admin keys
    db.py          SQLAlchemy 2 models; SQLite (WAL, BEGIN IMMEDIATE) or PostgreSQL by URL
    migrate.py     Alembic migrations (migrations/), run by `tuneforge service migrate` and `start`
    files.py       uploads: size limit, line-by-line validation, content-addressed storage
    jobs.py        a job request -> the run's recipe (OpenAI hyperparameters, the `tuneforge` extension)
    worker.py      worker processes: claim, heartbeat, run through run/finetune, re-queue the stale
    events.py      the engine callback: metrics -> events, checkpoints -> rows, cancel/pause -> stop
    supervisor.py  the server's own thread (validation, reaping) and its pool of worker processes
    inference.py   chat/text completions and predict on finished jobs
    ui.py          the /ui dashboard
    cli.py         `tuneforge service ...`

A job is an ordinary run directory (``<data-dir>/jobs/<id>/run``) made by ``run/finetune.py``;
nothing here trains or saves a model by itself.
"""
