"""``tuneforge service start | worker | keys create|list|revoke | migrate``.

Imported when the command line is parsed, so it imports nothing heavy at module level: FastAPI,
SQLAlchemy and torch load inside the command that needs them (the ``service`` extra)."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import TuneforgeError


def _needs_extra():
    try:
        import alembic  # noqa: F401
        import fastapi  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as err:
        raise TuneforgeError(f"tuneforge service needs the service extra ({err.name} is missing): "
                             "pip install 'tuneforge[service]'") from None


def _config(args):
    from .config import ServiceConfig, parse_models

    return ServiceConfig(
        data_dir=args.data_dir, db=args.db or os.environ.get("TUNEFORGE_SERVICE_DB"),
        models=parse_models(getattr(args, "model", None)),
        max_upload_bytes=int(getattr(args, "max_upload_mb", 256) * (1 << 20)),
        max_concurrent=getattr(args, "max_concurrent", None), heartbeat_s=getattr(args, "heartbeat_s", 1.0),
        stale_after_s=getattr(args, "stale_after_s", 15.0), poll_s=getattr(args, "poll_s", 0.5),
        checkpoint_every=getattr(args, "checkpoint_every", 10))


def cmd_start(args) -> int:
    _needs_extra()
    from .api import serve

    cfg = _config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}; every request needs a project's API key", flush=True)
    print(f"tuneforge service on http://{args.host}:{args.port} (database {cfg.db_url.split('@')[-1]}, data "
          f"{cfg.data_dir}, {args.workers} worker(s)); dashboard: /ui", flush=True)
    serve(cfg, host=args.host, port=args.port, workers=args.workers)
    return 0


def cmd_worker(args) -> int:
    _needs_extra()
    from .worker import run_worker

    run_worker(_config(args), name=args.name, parent_pid=args.parent_pid, once=args.once)
    return 0


def _db(args):
    from .db import Database
    from .migrate import migrate

    cfg = _config(args)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.db_url)
    migrate(db)
    return db


def cmd_migrate(args) -> int:
    _needs_extra()
    from .db import Database
    from .migrate import migrate

    cfg = _config(args)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.db_url)
    print(f"database at revision {migrate(db)}")
    return 0


def cmd_keys(args) -> int:
    _needs_extra()
    from .auth import create_key, list_keys, revoke_key

    db = _db(args)
    if args.keys_command == "create":
        key, row = create_key(db, args.project, args.name or "", admin=args.admin)
        print(json.dumps({"id": row.id, "project": args.project, "admin": row.admin, "key": key}))
        print("keep the key now: only its hash is stored", file=__import__("sys").stderr)
    elif args.keys_command == "list":
        for row in list_keys(db):
            print(json.dumps(row))
    else:
        revoke_key(db, args.id)
        print(f"revoked {args.id}")
    return 0


def add_parser(sub) -> None:
    sv = sub.add_parser("service", help="a fine-tuning service speaking OpenAI's fine-tuning API (service extra)",
                        description="A self-hosted fine-tuning service: OpenAI-compatible files, jobs, events, "
                                    "checkpoints and completions, a database, workers and a dashboard (docs/service.md).")
    ss = sv.add_subparsers(dest="service_command", required=True)

    def common(p):
        p.add_argument("--data-dir", default="tuneforge-service",
                       help="files, job run directories and the SQLite database (default ./tuneforge-service)")
        p.add_argument("--db", help="database URL: sqlite:///PATH (default <data-dir>/service.db) or "
                                    "postgresql://USER:PASSWORD@HOST:PORT/DB; also $TUNEFORGE_SERVICE_DB")

    def timing(p):
        p.add_argument("--max-concurrent", type=int, help="jobs running at once over all workers (default: one per "
                                                          "worker)")
        p.add_argument("--heartbeat-s", type=float, default=1.0, help="worker heartbeat interval; cancel and pause "
                                                                      "are read at this pace")
        p.add_argument("--stale-after-s", type=float, default=15.0,
                       help="a running job whose worker is silent this long is queued again (and resumed)")
        p.add_argument("--poll-s", type=float, default=0.5, help="how often an idle worker looks for a job")

    st = ss.add_parser("start", help="serve the API (and /ui) with --workers worker processes")
    common(st)
    timing(st)
    st.add_argument("--workers", type=int, default=1, help="worker processes to start (0: run them elsewhere with "
                                                           "`tuneforge service worker`)")
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--model", action="append", metavar="NAME=MODEL",
                    help="offer a base model: NAME as clients ask for it, MODEL as a recipe's model.name takes it "
                         "(an alias or a local Hugging Face directory); repeatable. The built-in aliases are offered "
                         "always")
    st.add_argument("--max-upload-mb", type=float, default=256, help="largest uploaded file")
    st.add_argument("--checkpoint-every", type=int, default=10,
                    help="train.save_every of jobs: the steps a killed worker can lose at most")
    st.set_defaults(fn=cmd_start)

    wk = ss.add_parser("worker", help="a worker process: claims queued jobs from the database and runs them")
    common(wk)
    timing(wk)
    wk.add_argument("--name", help="worker id shown in jobs and events (default worker-HOST-PID)")
    wk.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    wk.add_argument("--once", action="store_true", help="run at most one job, then exit")
    wk.set_defaults(fn=cmd_worker)

    mg = ss.add_parser("migrate", help="create or upgrade the database schema (Alembic)")
    common(mg)
    mg.set_defaults(fn=cmd_migrate)

    ks = ss.add_parser("keys", help="API keys: create, list, revoke (stored hashed; a key sees one project)")
    kk = ks.add_subparsers(dest="keys_command", required=True)
    kc = kk.add_parser("create", help="a new key for --project (printed once), or --admin")
    kc.add_argument("--project", help="the project the key belongs to (created if new)")
    kc.add_argument("--name", help="a label for the key")
    kc.add_argument("--admin", action="store_true", help="a key that manages keys over HTTP (/v1/admin/keys)")
    kl = kk.add_parser("list", help="every key: id, project, prefix, revoked")
    kr = kk.add_parser("revoke", help="revoke a key by id")
    kr.add_argument("id")
    for p in (kc, kl, kr):
        common(p)
    ks.set_defaults(fn=cmd_keys)
