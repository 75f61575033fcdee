"""`tuneforge serve RUN_DIR`: an HTTP server for a run's model (FastAPI + uvicorn, the
`serve` extra).

Concurrent requests are *micro-batched* (``deploy/batcher.py``): a single worker takes whatever
requests are waiting (up to ``max_batch_size`` inputs, waiting at most ``max_wait_ms`` for more)
and runs them through the model as one batch, in a thread so the event loop keeps accepting
connections. Each request gets exactly its own rows back, and one bad request fails alone:
every request is checked and encoded by itself before it joins a batch. Limits are checked
before the model sees anything: the body size before it is read (Content-Length, and a running
count for chunked bodies), then the JSON itself, the number of inputs, text length and
encoding, image size and decodability, each with a 4xx that names the limit or the fix
(docs/serving.md has the table).

Endpoints: ``POST /v1/predict``, ``GET /v1/model``, ``GET /health``, ``GET /metrics``
(Prometheus text format, labelled by route, never by the raw path) and the OpenAPI schema at
``/openapi.json``. ``/docs`` is a plain page pointing at the schema: FastAPI's Swagger UI loads
its scripts from a CDN, which is blank on a machine without internet, and no installed package
ships them.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request is
# imported inside create_app, as fastapi is an optional extra).

import base64
import hmac
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TuneforgeError
from ..modalities import MODALITIES, modality_of
from .batcher import BadInput, Batcher, log
from .openai_chat import lone_surrogate as _lone_surrogate  # one check for both wire formats


@dataclass
class ServeConfig:
    max_batch_size: int = 32  # inputs per model call
    max_wait_ms: float = 5.0  # how long the batcher waits for more requests
    batching: bool = True  # off: every request runs alone (for comparison)
    max_items: int = 64  # inputs per request
    max_text_chars: int = 10_000
    max_body_bytes: int = 8 << 20
    max_image_pixels: int = 40_000_000
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    adapters: dict[str, str] = field(default_factory=dict)  # name -> LoRA run on the same base, chosen per request
    max_tokens: int = 1024  # causal-lm runs: the largest max_tokens a completion request may ask for


def load_api_keys(env: str = "TUNEFORGE_API_KEYS", file: str | None = None) -> list[str]:
    """Keys from a comma-separated environment variable and/or a file with one key per line
    (blank lines and lines starting with ``#`` are skipped).

    A key source that was given but holds no key is an error, never "no authentication": a
    file of comments only (or an emptied one) would otherwise open the server to everyone."""
    value = os.environ.get(env, "")
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if value.strip() and not keys:
        raise TuneforgeError(f"{env} is set but holds no key ({value!r}); give keys as {env}=key1,key2, "
                             f"or unset it to serve without authentication")
    if file:
        path = Path(file)
        if not path.is_file():
            raise TuneforgeError(f"--api-key-file {file} does not exist; write one key per line into it, or leave "
                                 "the option out to serve without authentication")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise TuneforgeError(f"--api-key-file {file} holds no keys (only blank lines and # comments); put one "
                                 "key per line, or leave the option out to serve without authentication")
        keys += found
    return keys


def _key_of(headers) -> tuple[str | None, str]:
    """(the key a request presents, or None; why it presents none). ``X-API-Key: KEY`` or
    ``Authorization: Bearer KEY``, the scheme in any case (RFC 7235 §2.1); a bare key in
    Authorization, without the scheme, is refused with a message saying so."""
    if "x-api-key" in headers:
        return headers["x-api-key"], ""
    auth = headers.get("authorization")
    if auth is None:
        return None, "missing API key"
    scheme, _, credentials = auth.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None, "the Authorization header needs the Bearer scheme"
    return credentials.strip(), ""


def _printable(text: str) -> str:
    """A message that can be sent as UTF-8 JSON even when it quotes a lone surrogate."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", type(None): "null", bool: "a boolean", int: "a number",
             float: "a number"}
    return names.get(type(value), type(value).__name__)


DOCS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title} API</title></head>
<body style="font-family: sans-serif; max-width: 46em; margin: 2em auto">
<h1>{title}</h1><p>{description}</p>
<p>The OpenAPI schema of this server is at <a href="{openapi}"><code>{openapi}</code></a>: open it in any
OpenAPI viewer or client generator.</p>
<p>There is no interactive Swagger UI here: it loads its scripts and styles from a CDN, which leaves the
page blank on a machine without internet, and tuneforge downloads nothing at run time.</p>
<ul>
<li><code>POST /v1/predict</code> &mdash; <code>{{"{field}": [...]}}</code>, optionally <code>"adapter": "NAME"</code></li>
<li><code>GET /v1/model</code> &mdash; labels, strategy, metrics, batching</li>
<li><code>GET /health</code>, <code>GET /metrics</code> (Prometheus)</li>
</ul></body></html>
"""


@dataclass
class Guarded:
    """What both kinds of server share: the app with its guard middleware (auth, body size, the
    500 answer, metrics by route), the metrics, ``fail`` (a counted 4xx) and ``read_body``."""

    app: object
    metrics: dict
    registry: object
    fail: object
    read_body: object


def _fastapi():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError:
        raise TuneforgeError("tuneforge serve needs FastAPI, uvicorn and prometheus-client: "
                             "pip install 'tuneforge[serve]'") from None


def guarded_app(cfg: "ServeConfig", *, description: str, lifespan, open_paths=("/health", "/docs", "/openapi.json"),
                extra_metrics=None, error_body=None) -> Guarded:
    """A FastAPI app behind the server's guards, with ``/health`` and ``/metrics``.
    ``error_body(status, reason, detail) -> dict``: the JSON of a refusal (default ``{"detail"}``;
    the OpenAI endpoints add their ``error`` object)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.routing import Match

    registry = CollectorRegistry()
    metrics = {
        # endpoint: the route's path template, or "unmatched" for every unknown path, so that
        # random paths cannot grow the number of series (and the /metrics page) without bound
        "requests": Counter("tuneforge_requests", "Requests by endpoint and status", ["endpoint", "status"],
                            registry=registry),
        "latency": Histogram("tuneforge_request_seconds", "Request latency", ["endpoint"], registry=registry,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)),
        "errors": Counter("tuneforge_errors", "Requests answered with an error, by reason", ["reason"],
                          registry=registry),
    }
    for name, make in (extra_metrics or {}).items():
        metrics[name] = make(registry)
    body_of = error_body or (lambda status, reason, detail: {"detail": detail})
    # docs_url/redoc_url off: both pages load their assets from a CDN (blank offline); /docs says so
    app = FastAPI(title="tuneforge", description=description, lifespan=lifespan, docs_url=None, redoc_url=None)
    keys = [k.encode() for k in cfg.api_keys]

    def fail(status: int, reason: str, detail: str):
        metrics["errors"].labels(reason).inc()
        raise HTTPException(status_code=status, detail=_printable(detail))

    def route_of(scope) -> str:
        for route in app.router.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:  # FULL, or PARTIAL (the path is known, the method is not)
                return route.path
        return "unmatched"

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = route_of(request.scope)

        def answer(status: int, reason: str, detail: str, headers=None):
            metrics["errors"].labels(reason).inc()
            metrics["requests"].labels(endpoint, str(status)).inc()
            return JSONResponse(body_of(status, reason, detail), status_code=status, headers=headers)

        if keys and request.url.path not in open_paths:
            given, why = _key_of(request.headers)
            # constant-time comparison against every key (no early exit that leaks which one matched)
            ok = False
            for k in keys:
                ok |= hmac.compare_digest((given or "").encode(), k)
            if not ok or given is None:
                return answer(401, "auth", f"{why or 'wrong API key'}: send it as 'Authorization: Bearer KEY' "
                                           "or 'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            return answer(413, "too_large", f"request body is {int(length):,} bytes; the limit is "
                                            f"{cfg.max_body_bytes:,} (send fewer or smaller inputs)")
        try:
            response = await call_next(request)
        except Exception as err:  # a bug or a model failure: logged with its traceback, counted, answered
            log.exception("%s %s failed", request.method, request.url.path)
            response = answer(500, "internal", f"internal error ({type(err).__name__}) while answering this "
                                               "request; the server log has the traceback")
            metrics["latency"].labels(endpoint).observe(time.perf_counter() - t0)
            return response
        metrics["requests"].labels(endpoint, str(response.status_code)).inc()
        metrics["latency"].labels(endpoint).observe(time.perf_counter() - t0)
        return response

    async def read_body(request: Request) -> bytes:
        """The body, counted while it streams in: a chunked upload over the limit is cut off."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                fail(413, "too_large", f"request body exceeds {cfg.max_body_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return Guarded(app, metrics, registry, fail, read_body)


def _generative(run_dir: Path) -> bool:
    """Whether a run's model writes text (causal-lm, preference, ...): the task declares it."""
    from ..run.artifact import _model_dir
    from ..tasks import task_class

    meta_path = _model_dir(run_dir) / "tuneforge.json"
    if not meta_path.exists():
        return False  # the predictor says what is missing
    meta = json.loads(meta_path.read_text())
    return bool(task_class(meta["task"]["type"]).generative)


def create_app(run_dir, cfg: ServeConfig | None = None):
    """The server of a run: a classifier's ``/v1/predict``, or for a causal-lm / preference run the
    OpenAI-style ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` (``serve_llm.py``)."""
    _fastapi()
    from contextlib import asynccontextmanager

    from fastapi import Request
    from fastapi.responses import HTMLResponse

    from .predictor import Predictor

    cfg = cfg or ServeConfig()
    run_dir = Path(run_dir)
    if _generative(run_dir):
        from .serve_llm import create_llm_app

        return create_llm_app(run_dir, cfg)
    predictor = Predictor(run_dir)
    modality = predictor.meta["modality"]
    spec = modality_of(modality)  # request field, whether inputs are files (images), ...
    field_name = spec.request_field
    others = {m.request_field: m.name for m in MODALITIES.values() if m.request_field != field_name}
    label_maps = {"default": predictor.labels, **_load_adapters(predictor, run_dir, cfg.adapters)}
    batcher_box = {}

    @asynccontextmanager
    async def lifespan(_app):
        batcher_box["batcher"].start()
        yield
        await batcher_box["batcher"].stop()  # graceful: what is queued is answered before the worker stops

    from prometheus_client import Histogram

    guarded = guarded_app(cfg, description=f"Predictions of the model fine-tuned in {run_dir.name}",
                          lifespan=lifespan, extra_metrics={"batch": lambda registry: Histogram(
                              "tuneforge_batch_size", "Inputs per model call", registry=registry,
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))})
    app, metrics, fail, read_body = guarded.app, guarded.metrics, guarded.fail, guarded.read_body
    batcher = batcher_box["batcher"] = Batcher(predictor, cfg, metrics, fixed_shape=not spec.variable_length)
    app.state.predictor, app.state.batcher = predictor, batcher

    def decode_image(data: bytes, i: int):
        from PIL import Image

        from ..data.images import load_image

        try:
            return load_image(data, max_pixels=cfg.max_image_pixels, where=f"images[{i}]")
        except TuneforgeError as err:  # load_image names the problem; an oversized image is a 413
            too_large = "too large" in str(err)
            fail(413 if too_large else 422, "too_large" if too_large else "bad_image", str(err))
        except Image.DecompressionBombError:
            fail(413, "too_large", f"images[{i}] has more than {cfg.max_image_pixels:,} pixels")

    def check_adapter(adapter):
        if not isinstance(adapter, str):
            fail(422, "bad_request", f"'adapter' must be a string naming one of: {', '.join(label_maps)} "
                                     f"(got {_json_type(adapter)})")
        if adapter not in label_maps:
            fail(422, "bad_request", f"unknown adapter {adapter!r}; this server has: {', '.join(label_maps)}")
        return adapter

    def check_texts(items: list) -> list:
        for i, t in enumerate(items):
            if not isinstance(t, str):
                fail(422, "bad_request", f"inputs[{i}] is not a string")
            if len(t) > cfg.max_text_chars:
                fail(413, "too_long", f"inputs[{i}] has {len(t):,} characters; the limit is {cfg.max_text_chars:,}")
            at = _lone_surrogate(t)
            if at is not None:
                fail(422, "bad_text", f"inputs[{i}] holds a lone UTF-16 surrogate ({t[at]!r} at character {at}), "
                                      "which is not text; send valid UTF-8, with characters outside the BMP as a "
                                      "surrogate pair (\\ud83d\\ude00) or unescaped")
        return items

    @app.post("/v1/predict")
    async def predict(request: Request):
        """Text models: ``{"inputs": ["text", ...]}``. Image models: ``{"images": ["<base64>", ...]}``
        or multipart files under ``images``. Returns ``{"predictions": [{"label", "scores"}, ...]}``."""
        ctype = request.headers.get("content-type", "")
        adapter = request.query_params.get("adapter", "default")  # multipart: ?adapter=NAME
        if spec.files and ctype.startswith("multipart/"):
            form = await request.form(max_files=cfg.max_items + 1)
            files = form.getlist(field_name)
            if not files or any(isinstance(f, str) for f in files):
                fail(422, "bad_request", f"multipart requests carry the inputs as files in the field '{field_name}'")
            if len(files) > cfg.max_items:
                fail(413, "too_many", f"{len(files)} images; at most {cfg.max_items} per request")
            inputs = [decode_image(await f.read(), i) for i, f in enumerate(files)]
            adapter = check_adapter(adapter)
        else:
            raw = await read_body(request)
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                fail(400, "bad_json", "the body is not valid JSON")
            except RecursionError:  # the C decoder's guard against deep nesting ([[[[...]]]])
                fail(400, "bad_json", f"the body nests too deeply to be a request; send {{\"{field_name}\": [...]}}")
            if not isinstance(body, dict) or field_name not in body:
                given = [f for f in others if isinstance(body, dict) and f in body]
                hint = f" ('{given[0]}' is for {others[given[0]]} models)" if given else ""
                fail(422, "bad_request", f"this is a {modality} model: send {{\"{field_name}\": [...]}}{hint}")
            adapter = check_adapter(body.pop("adapter", adapter))
            unknown = sorted(set(body) - {field_name})
            if unknown:
                fail(422, "bad_request", f"unknown field(s) {', '.join(map(repr, unknown))}; only '{field_name}' "
                                         "(and 'adapter') are accepted")
            items = body[field_name]
            if not isinstance(items, list) or not items:
                fail(422, "bad_request", f"'{field_name}' must be a non-empty list")
            if len(items) > cfg.max_items:
                fail(413, "too_many", f"{len(items)} inputs; at most {cfg.max_items} per request")
            if not spec.files:  # texts: strings, each within the length limit, each real text
                inputs = check_texts(items)
            else:  # files (images): base64 in JSON
                inputs = []
                for i, b64 in enumerate(items):
                    try:
                        data = base64.b64decode(b64, validate=True)
                    except (ValueError, TypeError):
                        fail(422, "bad_image", f"images[{i}] is not valid base64")
                    inputs.append(decode_image(data, i))
        try:
            probs = await batcher.submit(inputs, adapter)
        except BadInput as err:
            fail(422, "bad_input", str(err))
        return {"predictions": predictor.format(probs, label_maps[adapter], inputs=inputs)}

    @app.get("/v1/model")
    async def model_info():
        eval_path = run_dir / "eval.json"
        manifest_path = run_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        evaluation = json.loads(eval_path.read_text()) if eval_path.exists() else {}
        return {"labels": predictor.labels.names, "multi_label": predictor.labels.multi_label,
                "modality": modality, "strategy": predictor.meta.get("strategy"), "family": predictor.meta.get("family"),
                "metrics": {s: {k: v for k, v in evaluation.get(s, {}).items() if isinstance(v, (int, float))}
                            for s in ("validation", "test") if s in evaluation},
                "manifest": {k: manifest.get(k) for k in ("status", "created", "device", "precision", "steps")
                             if k in manifest},
                "adapters": {name: labels.names for name, labels in label_maps.items()} if cfg.adapters else None,
                "batching": {"on": cfg.batching, "max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms}}

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(DOCS_PAGE.format(title=app.title, description=app.description, openapi=app.openapi_url,
                                             field=field_name))

    return app


def startup_lines(cfg: ServeConfig, host: str, port: int, generative: bool = False) -> list[str]:
    """What `tuneforge serve` prints before it listens: authentication on or off, batching, the schema."""
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    n = len(cfg.api_keys)
    auth = (f"authentication: on ({n} API key{'s' if n != 1 else ''}; send 'Authorization: Bearer KEY' or "
            "'X-API-Key: KEY')" if n else
            "authentication: off (no API keys; set TUNEFORGE_API_KEYS or --api-key-file to require one)")
    batching = (f"micro-batching: on (up to {cfg.max_batch_size} inputs, waiting up to {cfg.max_wait_ms:g} ms)"
                if cfg.batching else "micro-batching: off (--no-batching)")
    schema = f"OpenAPI schema: {where}/openapi.json (no Swagger UI: it needs a CDN; {where}/docs says so)"
    if generative:
        return [auth, "generation: one reply at a time (requests wait their turn), KV-cached; "
                      f"max_tokens up to {cfg.max_tokens}", schema,
                f"chat: POST {where}/v1/chat/completions (OpenAI-style, stream: true for server-sent events); "
                f"text: POST {where}/v1/completions; models: GET {where}/v1/models"]
    return [auth, batching, schema, f"predict: POST {where}/v1/predict"]


def _load_adapters(predictor, run_dir: Path, adapters: dict[str, str]) -> dict:
    """Load more LoRA runs of the same base into the one model (peft keeps one copy of the
    base weights and a small A/B pair + head per adapter); -> name -> label map."""
    from ..tasks import LabelMap

    if not adapters:
        return {}
    if not _shares_base(predictor.meta):
        raise TuneforgeError(f"--adapter needs a LoRA run to serve first; {run_dir} is a "
                             f"{predictor.meta.get('strategy')} run")
    out = {}
    for name, other in adapters.items():
        if name == "default":
            raise TuneforgeError("the adapter name 'default' is the served run's own; pick another name")
        model_dir = Path(other) / "model" if (Path(other) / "model" / "tuneforge.json").exists() else Path(other)
        meta_path = model_dir / "tuneforge.json"
        if not meta_path.exists():
            raise TuneforgeError(f"--adapter {name}={other}: not a tuneforge run directory")
        meta = json.loads(meta_path.read_text())
        if not _shares_base(meta):
            raise TuneforgeError(f"--adapter {name}={other} is a {meta.get('strategy')} run; only LoRA runs share a base")
        if meta.get("base_model") != predictor.meta.get("base_model"):
            raise TuneforgeError(f"--adapter {name}={other} was trained on base {meta['base_model'].get('name')}, the "
                                 f"served run on {predictor.meta['base_model'].get('name')}; adapters must share a base")
        labels = LabelMap.from_json(json.loads((model_dir / "labels.json").read_text()))
        if len(labels) != len(predictor.labels):
            raise TuneforgeError(f"--adapter {name}={other} has {len(labels)} labels and the served run "
                                 f"{len(predictor.labels)}; serve runs with different label counts separately")
        predictor.model.load_adapter(str(model_dir / "adapter"), adapter_name=name)
        out[name] = labels
    predictor.model.set_adapter("default")
    predictor.model.eval()
    return out


def _shares_base(meta: dict) -> bool:
    """A run whose adapter can sit beside others on one copy of the base (LoRA: peft adapters)."""
    from ..strategies import strategy_class

    return meta.get("layout") == "peft-adapter" and strategy_class(meta["strategy"]).shares_base


def serve(run_dir, *, host: str = "127.0.0.1", port: int = 8000, cfg: ServeConfig | None = None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise TuneforgeError("tuneforge serve needs uvicorn: pip install 'tuneforge[serve]'") from None
    cfg = cfg or ServeConfig()
    app = create_app(run_dir, cfg)
    for line in startup_lines(cfg, host, port, generative=_generative(Path(run_dir))):
        print(line, file=sys.stderr, flush=True)
    # SIGTERM / Ctrl-C: uvicorn stops accepting, lets in-flight requests finish (up to 30 s),
    # then the lifespan drains the batcher.
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30, log_level="info")
