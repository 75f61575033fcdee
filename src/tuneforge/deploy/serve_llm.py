"""`tuneforge serve RUN` for a causal-lm (or preference) run: OpenAI-style chat and text
completions, streamed or not, behind the same guards as the classifier server (API keys, body
limit, 4xx naming the field, ``/metrics`` by route).

- ``POST /v1/chat/completions``: the run's chat template renders ``messages`` up to the
  assistant's turn; ``POST /v1/completions``: ``prompt`` is sent as it is;
- ``GET /v1/models``: the one served model, whose id (the run directory's name) requests name;
- ``stream: true``: server-sent events of ``chat.completion.chunk`` (or ``text_completion``)
  objects, the first carrying the role, the last the ``finish_reason``, then ``data: [DONE]``.

Request and response shapes live in ``openai_chat.py``; generation (KV-cached, the same loop
that evaluated the run) in ``generator.py``. One reply is generated at a time (the model is not
shared between threads); requests wait their turn in arrival order. A streaming client that
disconnects ends its generation at the next token.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations.

import asyncio
import json
import threading
from pathlib import Path

from ..errors import TuneforgeError
from . import openai_chat as oa

DOCS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>tuneforge: {model}</title></head>
<body style="font-family: sans-serif; max-width: 46em; margin: 2em auto">
<h1>{model}</h1><p>{description}</p>
<p>An OpenAI-style API: point any OpenAI client at <code>/v1</code> with model <code>{model}</code>.
The OpenAPI schema is at <a href="/openapi.json"><code>/openapi.json</code></a> (no Swagger UI: it needs a CDN).</p>
<ul>
<li><code>POST /v1/chat/completions</code> &mdash; <code>{{"model": "{model}", "messages": [...]}}</code>, optionally
<code>"stream": true</code></li>
<li><code>POST /v1/completions</code> &mdash; <code>{{"model": "{model}", "prompt": "..."}}</code></li>
<li><code>GET /v1/models</code>, <code>GET /health</code>, <code>GET /metrics</code> (Prometheus)</li>
</ul></body></html>
"""


def _error(status: int, reason: str, detail: str) -> dict:
    return oa.error_body(oa.BadRequest(detail, status=status, code=reason))


def create_llm_app(run_dir: Path, cfg):
    from contextlib import asynccontextmanager

    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from prometheus_client import Counter

    from .generator import Generator
    from .serve import guarded_app

    if cfg.adapters:
        raise TuneforgeError("--adapter serves several classifier LoRA runs on one base; a causal-lm run is served "
                             "alone (start one server per run)")
    generator = Generator(run_dir)
    model_id = run_dir.resolve().name
    created = int(Path(run_dir).stat().st_mtime)
    limits = oa.Limits(max_tokens=cfg.max_tokens, max_text_chars=cfg.max_text_chars)

    @asynccontextmanager
    async def lifespan(_app):
        yield

    guarded = guarded_app(cfg, description=f"Chat and text completions of the model fine-tuned in {run_dir.name}",
                          lifespan=lifespan, error_body=_error,
                          extra_metrics={"tokens": lambda registry: Counter(
                              "tuneforge_tokens", "Tokens read (prompt) and written (completion)", ["kind"],
                              registry=registry)})
    app, metrics, read_body = guarded.app, guarded.metrics, guarded.read_body
    app.state.generator = generator

    def refuse(err: oa.BadRequest) -> JSONResponse:
        metrics["errors"].labels(err.code).inc()
        return JSONResponse(oa.error_body(err), status_code=err.status)

    async def request_of(request: Request, parse) -> oa.CompletionRequest:
        raw = await read_body(request)
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            raise oa.BadRequest("the body is not valid JSON", status=400, code="bad_json") from None
        except RecursionError:  # the C decoder's guard against deep nesting
            raise oa.BadRequest("the body nests too deeply to be a request", status=400, code="bad_json") from None
        req = parse(body, model_id, limits)
        if req.max_tokens is None:
            req.max_tokens = min(generator.settings.get("max_new_tokens", 64), limits.max_tokens)
        return req

    def check_fits(prompt: str, req: oa.CompletionRequest) -> int:
        n = generator.count_tokens(prompt)
        room = generator.context_length - n
        if room < 1:
            raise oa.BadRequest(f"the prompt is {n:,} tokens; this model reads at most {generator.context_length:,} "
                                "(send a shorter conversation)", "messages" if req.messages else "prompt", 400,
                                "context_length_exceeded")
        if req.max_tokens > room:
            raise oa.BadRequest(f"the prompt ({n:,} tokens) and max_tokens ({req.max_tokens:,}) exceed this model's "
                                f"{generator.context_length:,} positions; ask for at most {room:,}", "max_tokens",
                                400, "context_length_exceeded")
        return n

    def run_generation(prompt: str, req: oa.CompletionRequest, on_text=None, cancelled=None):
        out = generator.stream(prompt, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                               seed=req.seed, stop=req.stop, on_text=on_text, cancelled=cancelled)
        metrics["tokens"].labels("prompt").inc(out.prompt_tokens)
        metrics["tokens"].labels("completion").inc(out.completion_tokens)
        return out

    async def answer(request: Request, kind: str):
        try:
            req = await request_of(request, oa.parse_chat if kind == "chat" else oa.parse_completion)
            prompt = generator.prompt_text(req.messages) if kind == "chat" else req.prompt
            check_fits(prompt, req)
        except oa.BadRequest as err:
            return refuse(err)
        rid, created_at = oa.new_id(kind), oa.now()
        if not req.stream:
            out = await asyncio.to_thread(run_generation, prompt, req)
            tokens = oa.usage(out.prompt_tokens, out.completion_tokens)
            shape = oa.chat_response if kind == "chat" else oa.completion_response
            return shape(rid, created_at, model_id, out.text, out.finish_reason, tokens)
        return StreamingResponse(stream(prompt, req, kind, rid, created_at, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream(prompt, req, kind, rid, created_at, request):
        """Text pieces from the generating thread, as server-sent events while they are made."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("text", piece))

        def work():
            try:
                out = run_generation(prompt, req, on_text, cancelled)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", out))
            except BaseException as err:  # noqa: BLE001 - the stream says so, the log has the traceback
                from .batcher import log

                log.exception("generation for %s failed", rid)
                loop.call_soon_threadsafe(queue.put_nowait, ("failed", err))

        chunk = (lambda delta, finish=None, tokens=None: oa.chat_chunk(rid, created_at, model_id, delta, finish, tokens)) \
            if kind == "chat" else \
            (lambda delta, finish=None, tokens=None: oa.completion_chunk(
                rid, created_at, model_id, delta.get("content", ""), finish, tokens))
        worker = loop.run_in_executor(None, work)
        try:
            if kind == "chat":
                yield oa.sse(chunk({"role": "assistant", "content": ""}))
            while True:
                what, value = await queue.get()
                if what == "text":
                    yield oa.sse(chunk({"content": value}))
                elif what == "done":
                    yield oa.sse(chunk({}, value.finish_reason))
                    if req.include_usage:
                        yield oa.sse(chunk({}, None, oa.usage(value.prompt_tokens, value.completion_tokens)))
                    break
                else:  # the status line has gone out already: the stream ends with an error event
                    metrics["errors"].labels("internal").inc()
                    yield oa.sse(_error(500, "internal", f"generation failed ({type(value).__name__}); the server "
                                                         "log has the traceback"))
                    break
            yield oa.DONE
        finally:
            cancelled.set()  # a client gone mid-stream: the generation stops at its next token
            await worker

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI chat completions: ``{"model", "messages": [{"role", "content"}], "max_tokens", "temperature",
        "top_p", "stop", "seed", "stream"}`` -> a ``chat.completion`` (or its chunks as server-sent events)."""
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        """OpenAI text completions: ``{"model", "prompt", ...}``; the prompt is sent as given (no chat template)."""
        return await answer(request, "text")

    @app.get("/v1/models")
    async def models():
        return oa.models_list(model_id, created)

    @app.get("/v1/model")
    async def model_info():
        eval_path = run_dir / "eval.json"
        evaluation = json.loads(eval_path.read_text()) if eval_path.exists() else {}
        return {"id": model_id, "task": generator.meta["task"]["type"], "strategy": generator.meta.get("strategy"),
                "family": generator.meta.get("family"), "chat_template": generator.task.template_name,
                "context_length": generator.context_length, "max_tokens": limits.max_tokens,
                "generation": generator.settings,
                "metrics": {s: {k: v for k, v in evaluation.get(s, {}).items() if isinstance(v, (int, float))}
                            for s in ("validation", "test") if s in evaluation}}

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(DOCS_PAGE.format(model=model_id, description=app.description))

    return app
