"""`tuneforge serve RUN_DIR`: an HTTP server for a run's model (FastAPI + uvicorn, the
`serve` extra).

Concurrent requests are *micro-batched*: a single worker takes whatever requests are
waiting (up to ``max_batch_size`` inputs, waiting at most ``max_wait_ms`` for more) and
runs them through the model as one batch, in a thread so the event loop keeps accepting
connections. Each request gets exactly its own rows back. Limits are checked before the
model sees anything: the body size before it is read (Content-Length, and a running count
for chunked bodies), then the number of inputs, text length, image size and decodability,
each with a 4xx that names the limit.

Endpoints: ``POST /v1/predict``, ``GET /v1/model``, ``GET /health``, ``GET /metrics``
(Prometheus text format) and the OpenAPI docs at ``/docs``.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request is
# imported inside create_app, as fastapi is an optional extra).

import asyncio
import base64
import hmac
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TuneforgeError
from ..modalities import MODALITIES, modality_of


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


def load_api_keys(env: str = "TUNEFORGE_API_KEYS", file: str | None = None) -> list[str]:
    """Keys from a comma-separated environment variable and/or a file with one key per line."""
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    if file:
        keys += [line.strip() for line in Path(file).read_text().splitlines() if line.strip() and not line.startswith("#")]
    return keys


class _Batcher:
    """Collects (inputs, future) requests and answers them from shared model calls."""

    def __init__(self, predictor, cfg: ServeConfig, metrics):
        self.predictor, self.cfg, self.metrics = predictor, cfg, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.lock = asyncio.Lock()  # batching off: one model call at a time, one request each
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if self.cfg.batching:
            self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            await self.queue.join()  # in-flight requests finish first
            self.task.cancel()

    async def submit(self, inputs: list, adapter: str = "default") -> torch.Tensor:
        if not self.cfg.batching:
            async with self.lock:
                self.metrics["batch"].observe(len(inputs))
                return await asyncio.to_thread(self._infer, inputs, adapter)
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, future, adapter))
        return await future

    def _infer(self, inputs: list, adapter: str = "default") -> torch.Tensor:
        p = self.predictor
        if self.cfg.adapters:
            p.model.set_adapter(adapter)  # only this worker thread runs the model: switching is safe
        with torch.inference_mode():
            batch = p.task.encode_inputs(inputs)
            logits = p.model(**{k: v.to(p.device) for k, v in batch.items()})
            return p.task.probabilities(logits).cpu()

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            group, size = [first], len(first[0])
            deadline = time.perf_counter() + self.cfg.max_wait_ms / 1000
            while size < self.cfg.max_batch_size:
                timeout = deadline - time.perf_counter()
                try:
                    item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                # a full batch, or another adapter: answer what we have; this one starts the next batch
                if size + len(item[0]) > self.cfg.max_batch_size or item[2] != group[0][2]:
                    await self._answer(group)
                    group, size = [item], len(item[0])
                    deadline = time.perf_counter() + self.cfg.max_wait_ms / 1000
                    continue
                group.append(item)
                size += len(item[0])
            await self._answer(group)

    async def _answer(self, group: list) -> None:
        inputs = [x for request, _, _ in group for x in request]
        self.metrics["batch"].observe(len(inputs))
        try:
            probs = await asyncio.to_thread(self._infer, inputs, group[0][2])
            start = 0
            for request, future, _ in group:
                if not future.done():
                    future.set_result(probs[start:start + len(request)])
                start += len(request)
        except Exception as err:  # every waiting request learns of it
            for _, future, _ in group:
                if not future.done():
                    future.set_exception(err)
        finally:
            for _ in group:
                self.queue.task_done()


def create_app(run_dir, cfg: ServeConfig | None = None):
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.responses import JSONResponse, PlainTextResponse
        from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    except ImportError:
        raise TuneforgeError("tuneforge serve needs FastAPI, uvicorn and prometheus-client: "
                             "pip install 'tuneforge[serve]'") from None
    from contextlib import asynccontextmanager

    from .predictor import Predictor

    cfg = cfg or ServeConfig()
    run_dir = Path(run_dir)
    predictor = Predictor(run_dir)
    modality = predictor.meta["modality"]
    spec = modality_of(modality)  # request field, whether inputs are files (images), ...
    field_name = spec.request_field
    others = {m.request_field: m.name for m in MODALITIES.values() if m.request_field != field_name}
    label_maps = {"default": predictor.labels, **_load_adapters(predictor, run_dir, cfg.adapters)}
    registry = CollectorRegistry()
    metrics = {
        "requests": Counter("tuneforge_requests", "Requests by endpoint and status", ["endpoint", "status"],
                            registry=registry),
        "latency": Histogram("tuneforge_request_seconds", "Request latency", ["endpoint"], registry=registry,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
        "batch": Histogram("tuneforge_batch_size", "Inputs per model call", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        "errors": Counter("tuneforge_errors", "Requests answered with an error, by reason", ["reason"],
                          registry=registry),
    }
    batcher = _Batcher(predictor, cfg, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()  # graceful: what is queued is answered before the worker stops

    app = FastAPI(title="tuneforge", description=f"Predictions of the model fine-tuned in {run_dir.name}",
                  lifespan=lifespan)
    keys = [k.encode() for k in cfg.api_keys]

    def fail(status: int, reason: str, detail: str):
        metrics["errors"].labels(reason).inc()
        raise HTTPException(status_code=status, detail=detail)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        if keys and path not in ("/health", "/docs", "/openapi.json"):
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            # constant-time comparison against every key (no early exit that leaks which one matched)
            ok = False
            for k in keys:
                ok |= hmac.compare_digest(given.encode(), k)
            if not ok:
                metrics["errors"].labels("auth").inc()
                metrics["requests"].labels(path, "401").inc()
                return JSONResponse({"detail": "missing or wrong API key (send it as 'Authorization: Bearer KEY' "
                                               "or 'X-API-Key: KEY')"}, status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            metrics["errors"].labels("too_large").inc()
            metrics["requests"].labels(path, "413").inc()
            return JSONResponse({"detail": f"request body is {int(length):,} bytes; the limit is "
                                           f"{cfg.max_body_bytes:,} (send fewer or smaller inputs)"}, status_code=413)
        response = await call_next(request)
        metrics["requests"].labels(path, str(response.status_code)).inc()
        metrics["latency"].labels(path).observe(time.perf_counter() - t0)
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

    @app.post("/v1/predict")
    async def predict(request: Request):
        """Text models: ``{"inputs": ["text", ...]}``. Image models: ``{"images": ["<base64>", ...]}``
        or multipart files under ``images``. Returns ``{"predictions": [{"label", "scores"}, ...]}``."""
        ctype = request.headers.get("content-type", "")
        adapter = request.query_params.get("adapter", "default")  # multipart: ?adapter=NAME
        if spec.files and ctype.startswith("multipart/"):
            form = await request.form(max_files=cfg.max_items + 1)
            files = form.getlist(field_name)
            if not files:
                fail(422, "bad_request", f"multipart requests carry the inputs as files in the field '{field_name}'")
            if len(files) > cfg.max_items:
                fail(413, "too_many", f"{len(files)} images; at most {cfg.max_items} per request")
            inputs = [decode_image(await f.read(), i) for i, f in enumerate(files)]
            if adapter not in label_maps:
                fail(422, "bad_request", f"unknown adapter {adapter!r}; this server has: {', '.join(label_maps)}")
        else:
            try:
                body = json.loads(await read_body(request) or b"null")
            except ValueError:
                fail(400, "bad_json", "the body is not valid JSON")
            if not isinstance(body, dict) or field_name not in body:
                given = [f for f in others if isinstance(body, dict) and f in body]
                hint = f" ('{given[0]}' is for {others[given[0]]} models)" if given else ""
                fail(422, "bad_request", f"this is a {modality} model: send {{\"{field_name}\": [...]}}{hint}")
            adapter = body.pop("adapter", adapter) if isinstance(body, dict) else adapter
            if adapter not in label_maps:
                fail(422, "bad_request", f"unknown adapter {adapter!r}; this server has: {', '.join(label_maps)}")
            unknown = sorted(set(body) - {field_name})
            if unknown:
                fail(422, "bad_request", f"unknown field(s) {', '.join(unknown)}; only '{field_name}' is accepted")
            items = body[field_name]
            if not isinstance(items, list) or not items:
                fail(422, "bad_request", f"'{field_name}' must be a non-empty list")
            if len(items) > cfg.max_items:
                fail(413, "too_many", f"{len(items)} inputs; at most {cfg.max_items} per request")
            if not spec.files:  # texts: strings, each within the length limit
                for i, t in enumerate(items):
                    if not isinstance(t, str):
                        fail(422, "bad_request", f"inputs[{i}] is not a string")
                    if len(t) > cfg.max_text_chars:
                        fail(413, "too_long", f"inputs[{i}] has {len(t):,} characters; the limit is "
                                              f"{cfg.max_text_chars:,}")
                inputs = items
            else:  # files (images): base64 in JSON
                inputs = []
                for i, b64 in enumerate(items):
                    try:
                        data = base64.b64decode(b64, validate=True)
                    except (ValueError, TypeError):
                        fail(422, "bad_image", f"images[{i}] is not valid base64")
                    inputs.append(decode_image(data, i))
        probs = await batcher.submit(inputs, adapter)
        return {"predictions": predictor.format(probs, label_maps[adapter])}

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

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return app


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
    app = create_app(run_dir, cfg)
    # SIGTERM / Ctrl-C: uvicorn stops accepting, lets in-flight requests finish (up to 30 s),
    # then the lifespan drains the batcher.
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30, log_level="info")
