"""The HTTP API, wire-compatible with OpenAI's files, fine-tuning, models and completions endpoints.

Every endpoint takes an API key (``Authorization: Bearer KEY``) and sees only that key's
project: another project's file, job, event, checkpoint or model answers 404, exactly like an
id that does not exist. Errors have OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, so the ``openai`` client raises its usual exceptions. Besides OpenAI's endpoints:
``/v1/fine_tuning/jobs/{id}/report`` (the run's report.html), ``/v1/predict`` (classifiers and
the other non-LLM tasks), ``/v1/admin/keys`` (admin keys only), ``/health`` and the ``/ui``
dashboard.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations.

import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..errors import TuneforgeError
from . import jobs as J
from .auth import create_key, identify, list_keys, revoke_key
from .db import TERMINAL, Checkpoint, Database, Event, File, Job, Project, new_id, now, page
from .events import add_event, checkpoint_object, event_object
from .files import BadUpload, keep, receive, store_path, training_copy, validate


def file_object(f) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None, "expires_at": None}


def create_app(cfg, db: Database | None = None, background: bool = True):
    from fastapi import Depends, FastAPI, File as FileField, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    from .inference import ModelCache, chat_completion, predict, text_completion
    from .supervisor import Supervisor

    db = db or Database(cfg.db_url)
    models = ModelCache(cfg.max_loaded_models)
    supervisor = Supervisor(cfg, db)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if background:
            supervisor.start()
        yield
        supervisor.stop()

    app = FastAPI(title="tuneforge service", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.db, app.state.cfg = db, cfg

    def error(status: int, message: str, param=None, code=None, type_="invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                            status_code=status)

    @app.exception_handler(J.BadRequest)
    async def _bad(request, err: J.BadRequest):
        return error(err.status, str(err), err.param, err.code)

    @app.exception_handler(TuneforgeError)
    async def _tf(request, err: TuneforgeError):
        return error(400, str(err))

    @app.exception_handler(HTTPException)
    async def _http(request, err: HTTPException):
        kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}.get(err.status_code,
                                                                                                       "invalid_request_error")
        return error(err.status_code, str(err.detail), type_=kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}", where or None)

    def not_found(kind: str, ident: str):
        raise J.BadRequest(f"No such {kind}: {ident}", "id", code=None, status=404)

    # -- auth -------------------------------------------------------------------------------
    def key_of(request: Request):
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key")
        row = identify(db, key)
        if row is None:
            raise HTTPException(401, "Incorrect API key provided" if key else
                                "Missing API key: send 'Authorization: Bearer KEY' (`tuneforge service keys create`)")
        return row

    def project(request: Request) -> str:
        row = key_of(request)
        if row.project_id is None:
            raise HTTPException(403, "an admin key manages keys (/v1/admin/keys); use a project's key here")
        return row.project_id

    def admin(request: Request):
        row = key_of(request)
        if not row.admin:
            raise HTTPException(403, "this endpoint needs an admin key (`tuneforge service keys create --admin`)")
        return row

    def org(s, project_id: str) -> str:
        p = s.get(Project, project_id)
        return p.name if p else project_id

    def own(s, model, ident: str, project_id: str, kind: str):
        row = s.execute(select(model).where(model.id == ident, model.project_id == project_id)).scalar_one_or_none()
        if row is None:
            not_found(kind, ident)
        return row

    def limit_of(limit: int) -> int:
        if not 1 <= limit <= 100:
            raise J.BadRequest("'limit' must be from 1 to 100", "limit")
        return limit

    # -- files ------------------------------------------------------------------------------
    @app.post("/v1/files")
    async def upload(file: UploadFile = FileField(...), purpose: str = Form(...), project_id: str = Depends(project)):
        if purpose != "fine-tune":
            raise J.BadRequest(f"purpose {purpose!r}: this server stores training data only (purpose=fine-tune)",
                               "purpose")
        name = Path(file.filename or "upload.jsonl").name[:255]  # the name is shown, never used as a path
        try:
            tmp, sha, size = await receive(file, cfg.data_dir, cfg.max_upload_bytes)
        except BadUpload as err:
            raise J.BadRequest(str(err), "file", code="file_too_large", status=413) from None
        try:
            from starlette.concurrency import run_in_threadpool

            kind, rows = await run_in_threadpool(validate, tmp, name, cfg.max_rows)
        except BadUpload as err:
            tmp.unlink(missing_ok=True)
            raise J.BadRequest(f"{name}: {err}", "file", code="invalid_file") from None
        keep(tmp, cfg.data_dir, sha)
        with db.write() as s:
            row = File(id=new_id("file"), project_id=project_id, filename=name, purpose=purpose, bytes=size, sha256=sha,
                       kind=kind, rows=rows, created_at=now())
            s.add(row)
        return file_object(row)

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, after: str | None = None, limit: int = 100,
                   project_id: str = Depends(project)):
        with db.read() as s:
            query = select(File).where(File.project_id == project_id)
            if purpose:
                query = query.where(File.purpose == purpose)
            rows, more = page(s, query, File, after, limit_of(limit))
            if rows is None:
                not_found("file", after)
            return {"object": "list", "data": [file_object(f) for f in rows], "has_more": more,
                    "first_id": rows[0].id if rows else None, "last_id": rows[-1].id if rows else None}

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, project_id: str = Depends(project)):
        with db.read() as s:
            return file_object(own(s, File, file_id, project_id, "file"))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, project_id: str = Depends(project)):
        with db.read() as s:
            row = own(s, File, file_id, project_id, "file")
        return FileResponse(store_path(cfg.data_dir, row.sha256), filename=row.filename,
                            media_type="text/csv" if row.kind == "results" else "application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, project_id: str = Depends(project)):
        with db.write() as s:
            row = own(s, File, file_id, project_id, "file")
            s.delete(row)
            s.flush()
            shared = s.execute(select(File.id).where(File.sha256 == row.sha256).limit(1)).first()
        if shared is None:  # jobs read their own copies (jobs/<id>/data): the stored bytes can go
            store_path(cfg.data_dir, row.sha256).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs -------------------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request, project_id: str = Depends(project)):
        raw = await request.body()
        if len(raw) > 1 << 20:
            raise J.BadRequest("the request body is over 1 MiB", None, status=413)
        try:
            import json

            body = json.loads(raw or b"{}")
        except ValueError as err:
            raise J.BadRequest(f"the body is not JSON ({err})") from None
        if not isinstance(body, dict):
            raise J.BadRequest("the body must be a JSON object")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_create, body, request.headers.get("idempotency-key"), project_id)

    def _existing(s, project_id, key, digest):
        row = s.execute(select(Job).where(Job.project_id == project_id, Job.idempotency_key == key)).scalar_one_or_none()
        if row is not None and row.request_hash != digest:
            raise J.BadRequest(f"Idempotency-Key {key!r} was used for a different request; use a new key for a new job",
                               "Idempotency-Key", code="idempotency_key_reused", status=409)
        return row

    def _create(body: dict, idem: str | None, project_id: str) -> dict:
        digest = J.request_hash(body)
        if idem:
            with db.read() as s:
                row = _existing(s, project_id, idem, digest)
                if row is not None:
                    return J.job_object(row, org(s, project_id))
        J.check_fields(body)
        kind, hyper = J.method_of(body)
        model = body["model"]
        if model not in cfg.models:
            if J.job_of_model(model):
                raise J.BadRequest("fine-tuning a fine-tuned model again is not supported yet; use its base model",
                                   "model", code="model_not_available")
            raise J.BadRequest(f"model {model!r} is not offered by this server; models: {', '.join(sorted(cfg.models))}"
                               " (GET /v1/models; an admin adds one with --model NAME=PATH)", "model",
                               code="model_not_available")
        ext_recipe, overrides = J.extension_of(body)
        job_id = new_id("ftjob")
        job_dir = cfg.job_dir(job_id)
        data_dir = job_dir / "data"
        with db.read() as s:
            files = {}
            for key in ("training_file", "validation_file"):
                if body.get(key):
                    f = s.execute(select(File).where(File.id == body[key], File.project_id == project_id)).scalar_one_or_none()
                    if f is None or f.purpose != "fine-tune":
                        raise J.BadRequest(f"{key} {body[key]!r}: no such fine-tune file in this project", key,
                                           status=404 if f is None else 400)
                    files[key] = f

            def resolve_file(ident, where):
                f = s.execute(select(File).where(File.id == ident, File.project_id == project_id)).scalar_one_or_none()
                if f is None:
                    raise J.BadRequest(f"tuneforge: {where} {ident!r}: no such file in this project", f"tuneforge.{where}")
                return training_copy(store_path(cfg.data_dir, f.sha256), f.kind, data_dir / where.replace(".", "-"),
                                     f.filename)

            def resolve_job(ident):
                j = s.execute(select(Job).where(Job.id == ident, Job.project_id == project_id)).scalar_one_or_none()
                if j is None or j.status != "succeeded":
                    raise J.BadRequest(f"tuneforge: retain.head_from {ident!r}: no succeeded job of this project",
                                       "tuneforge.retain.head_from")
                return j.run_dir

            try:
                ext_flat = J.check_safe(J._flatten(ext_recipe), resolve_file, resolve_job)
                overrides = J.check_safe(overrides, resolve_file, resolve_job)
                ext_recipe = {}
                for key, value in ext_flat.items():
                    J._set(ext_recipe, key, value)
                task = ext_recipe.get("task", {}).get("type") or overrides.get("task.type") or (
                    "preference" if kind == "dpo" else "causal-lm")
                want = {"causal-lm": ("chat",), "preference": ("preference",)}.get(task, ("records", "table"))
                for key, f in files.items():
                    if f.kind not in want:
                        raise J.BadRequest(
                            f"{key} {f.id} ({f.filename}) holds {f.kind} examples, but a {kind} job"
                            f"{'' if task in J.LLM_TASKS else f' of task {task}'} trains on "
                            f"{' or '.join(want)} data" + (" (OpenAI's preference format for dpo)" if task == "preference"
                                                           else ""), key, code="invalid_training_file")
                paths = {k: training_copy(store_path(cfg.data_dir, f.sha256), f.kind, data_dir / k.split("_")[0],
                                          f.filename) for k, f in files.items()}
                seed = body.get("seed") if body.get("seed") is not None else J.new_seed()
                recipe, resolved = J.build_recipe(
                    kind=kind, hyper=hyper, model_name=cfg.models[model], train_path=paths["training_file"],
                    val_path=paths.get("validation_file"), rows=files["training_file"].rows, seed=seed,
                    run_dir=job_dir / "run", ext_recipe=ext_recipe, overrides=overrides,
                    checkpoint_every=cfg.checkpoint_every)
                J.validate_recipe(recipe)
            except BaseException:
                shutil.rmtree(job_dir, ignore_errors=True)  # a refused job leaves nothing behind
                raise
        try:
            with db.write() as s:
                if idem:
                    row = _existing(s, project_id, idem, digest)
                    if row is not None:
                        shutil.rmtree(job_dir, ignore_errors=True)
                        return J.job_object(row, org(s, project_id))
                row = Job(id=job_id, project_id=project_id, model=model, training_file=body["training_file"],
                          validation_file=body.get("validation_file"), suffix=body.get("suffix"), seed=seed,
                          meta=body.get("metadata"), method={"type": kind, kind: {"hyperparameters": hyper}},
                          hyperparameters=resolved, extension=body.get("tuneforge"), recipe=recipe,
                          status="validating_files", created_at=now(), run_dir=str(job_dir / "run"), result_files=[],
                          idempotency_key=idem, request_hash=digest, step=0, attempts=0, train_started_step=0)
                s.add(row)
                s.flush()  # the job row before its first event (the event's foreign key)
                add_event(s, job_id, f"Validating training file: {body['training_file']}")
                s.flush()
                return J.job_object(row, org(s, project_id))
        except IntegrityError:  # the same Idempotency-Key created a job a moment ago, in another request
            shutil.rmtree(job_dir, ignore_errors=True)
            with db.read() as s:
                row = _existing(s, project_id, idem, digest) if idem else None
                if row is None:
                    raise
                return J.job_object(row, org(s, project_id))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20, project_id: str = Depends(project)):
        with db.read() as s:
            rows, more = page(s, select(Job).where(Job.project_id == project_id), Job, after, limit_of(limit))
            if rows is None:
                not_found("fine-tuning job", after)
            name = org(s, project_id)
            return {"object": "list", "data": [J.job_object(j, name) for j in rows], "has_more": more}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, project_id: str = Depends(project)):
        with db.read() as s:
            return J.job_object(own(s, Job, job_id, project_id, "fine-tuning job"), org(s, project_id))

    def _control(job_id: str, project_id: str, action: str) -> dict:
        with db.write() as s:
            job = own(s, Job, job_id, project_id, "fine-tuning job")
            if action == "cancel":
                if job.status in TERMINAL:
                    raise J.BadRequest(f"job {job_id} is {job.status}; only a job that has not finished can be cancelled",
                                       code="invalid_state")
                if job.status == "running":
                    job.control = "cancel"
                    add_event(s, job.id, "Cancellation requested: the job stops after its current step")
                else:
                    job.status, job.finished_at, job.control = "cancelled", now(), None
                    add_event(s, job.id, "Job cancelled")
            elif action == "pause":
                if job.status not in ("running", "queued", "validating_files"):
                    raise J.BadRequest(f"job {job_id} is {job.status}; only a running or queued job can be paused",
                                       code="invalid_state")
                if job.status == "running":
                    job.control = "pause"
                    add_event(s, job.id, "Pause requested: the job stops after its current step, with a checkpoint")
                elif job.status == "queued":
                    job.status = "paused"
                    add_event(s, job.id, "Job paused before it started")
                else:
                    raise J.BadRequest(f"job {job_id} is still validating its files; pause it once it is queued",
                                       code="invalid_state")
            else:
                if job.status != "paused":
                    raise J.BadRequest(f"job {job_id} is {job.status}; only a paused job can be resumed",
                                       code="invalid_state")
                job.status = "queued"
                add_event(s, job.id, "Job resumed: queued, it continues from its last checkpoint")
            s.flush()
            return J.job_object(job, org(s, project_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel(job_id: str, project_id: str = Depends(project)):
        return _control(job_id, project_id, "cancel")

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause(job_id: str, project_id: str = Depends(project)):
        return _control(job_id, project_id, "pause")

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume(job_id: str, project_id: str = Depends(project)):
        return _control(job_id, project_id, "resume")

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def events(job_id: str, after: str | None = None, limit: int = 20, project_id: str = Depends(project)):
        with db.read() as s:
            own(s, Job, job_id, project_id, "fine-tuning job")
            rows, more = page(s, select(Event).where(Event.job_id == job_id), Event, after, limit_of(limit))
            if rows is None:
                not_found("event", after)
            return {"object": "list", "data": [event_object(e) for e in rows], "has_more": more}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def checkpoints(job_id: str, after: str | None = None, limit: int = 10, project_id: str = Depends(project)):
        with db.read() as s:
            job = own(s, Job, job_id, project_id, "fine-tuning job")
            rows, more = page(s, select(Checkpoint).where(Checkpoint.job_id == job_id), Checkpoint, after,
                              limit_of(limit))
            if rows is None:
                not_found("checkpoint", after)
            return {"object": "list", "data": [checkpoint_object(c, job) for c in rows], "has_more": more,
                    "first_id": rows[0].id if rows else None, "last_id": rows[-1].id if rows else None}

    @app.get("/v1/fine_tuning/jobs/{job_id}/report")
    def report(job_id: str, project_id: str = Depends(project)):
        with db.read() as s:
            job = own(s, Job, job_id, project_id, "fine-tuning job")
        path = Path(job.run_dir) / "report.html"
        if not path.is_file():
            raise J.BadRequest(f"job {job_id} has no report yet (it is written when the run ends)", status=404)
        return HTMLResponse(path.read_text(encoding="utf-8"))

    # -- models and inference ---------------------------------------------------------------
    def model_object(name: str, created: float, owner: str) -> dict:
        return {"id": name, "object": "model", "created": int(created), "owned_by": owner}

    @app.get("/v1/models")
    def list_models(project_id: str = Depends(project)):
        with db.read() as s:
            jobs = s.execute(select(Job).where(Job.project_id == project_id, Job.status == "succeeded")
                             .order_by(Job.seq.desc())).scalars().all()
            name = org(s, project_id)
        base = [model_object(m, 0, "tuneforge") for m in sorted(cfg.models)]
        return {"object": "list", "data": base + [model_object(j.fine_tuned_model, j.finished_at, name) for j in jobs]}

    def finished_job(name: str, project_id: str) -> Job:
        job_id = J.job_of_model(name or "")
        with db.read() as s:
            job = s.execute(select(Job).where(Job.id == job_id, Job.project_id == project_id)).scalar_one_or_none() \
                if job_id else None
        if job is None or job.status != "succeeded" or job.fine_tuned_model != name:
            raise J.BadRequest(f"The model '{name}' does not exist or you do not have access to it.", "model",
                               code="model_not_found", status=404)
        return job

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str, project_id: str = Depends(project)):
        if model_id in cfg.models:
            return model_object(model_id, 0, "tuneforge")
        job = finished_job(model_id, project_id)
        with db.read() as s:
            return model_object(model_id, job.finished_at, org(s, project_id))

    def _loaded(body: dict, project_id: str, generative: bool):
        job = finished_job(body.get("model"), project_id)
        llm = (job.recipe.get("task") or {}).get("type") in J.LLM_TASKS
        if llm != generative:
            raise J.BadRequest(f"{job.fine_tuned_model} is a {'language' if llm else 'prediction'} model: use "
                               + ("/v1/chat/completions" if llm else "/v1/predict"), "model")
        return models.get(Path(job.run_dir), generative)

    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise J.BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise J.BadRequest("the body must be a JSON object")
        return body

    async def _answer(request: Request, project_id: str, generative: bool, reply):
        """A finished job's model answers the request's JSON body off the event loop:
        ``reply(model, lock, body)`` with the job's generator (LLMs) or predictor (other tasks)."""
        from starlette.concurrency import run_in_threadpool

        body = await _json(request)

        def run():
            model, lock = _loaded(body, project_id, generative)
            return reply(model, lock, body)
        return await run_in_threadpool(run)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, project_id: str = Depends(project)):
        return await _answer(request, project_id, True, lambda g, lock, body: chat_completion(g, lock, body, body["model"]))

    @app.post("/v1/completions")
    async def completions(request: Request, project_id: str = Depends(project)):
        return await _answer(request, project_id, True, lambda g, lock, body: text_completion(g, lock, body, body["model"]))

    @app.post("/v1/predict")
    async def predict_route(request: Request, project_id: str = Depends(project)):
        return await _answer(request, project_id, False,
                             lambda p, lock, body: {"model": body["model"], **predict(p, lock, body)})

    # -- admin ------------------------------------------------------------------------------
    @app.post("/v1/admin/keys")
    async def admin_create(request: Request, _=Depends(admin)):
        body = await _json(request)
        key, row = create_key(db, body.get("project"), body.get("name", ""), admin=bool(body.get("admin")))
        return {"id": row.id, "key": key, "project": body.get("project"), "admin": row.admin}

    @app.get("/v1/admin/keys")
    def admin_list(_=Depends(admin)):
        return {"object": "list", "data": list_keys(db)}

    @app.delete("/v1/admin/keys/{key_id}")
    def admin_revoke(key_id: str, _=Depends(admin)):
        revoke_key(db, key_id)
        return {"id": key_id, "revoked": True}

    # -- health and dashboard ---------------------------------------------------------------
    @app.get("/health")
    def health():
        with db.read() as s:
            s.execute(select(Project.id).limit(1)).all()
        return {"status": "ok"}

    from .ui import mount_ui

    mount_ui(app)
    return app


def serve(cfg, host: str = "127.0.0.1", port: int = 8000, workers: int = 0) -> None:
    """Migrate, start ``workers`` worker processes, and serve until stopped (``tuneforge service start``)."""
    import uvicorn

    from .migrate import migrate
    from .supervisor import WorkerPool

    db = Database(cfg.db_url)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(db)
    pool = WorkerPool(cfg, workers)
    pool.start()
    try:
        uvicorn.run(create_app(cfg, db), host=host, port=port, log_level="warning")
    finally:
        pool.stop()
        db.dispose()

