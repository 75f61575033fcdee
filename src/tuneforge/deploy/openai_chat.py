"""The OpenAI wire format of chat and text completions, in one place: request checks and the
response, chunk, model-list and error shapes. ``tuneforge serve`` answers with it
(``deploy/serve.py``); a job service serving the same runs reuses it as it is.

Only the fields a local causal LM can honour are accepted (OpenAI's API reference, "Create chat
completion"): ``model``, ``messages`` (or ``prompt`` for ``/v1/completions``), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``stop`` (a string or up to 4),
``n`` (1 only), ``seed``, ``stream`` and ``stream_options.include_usage``; ``user`` is ignored, and
the penalties, ``logprobs`` and ``response_format`` pass only at their do-nothing values. Anything
else is a 4xx naming the field, never silently dropped: a client asking for ``n: 3`` or
``logprobs`` must learn it did not get them.

Our own small module rather than the ``openai`` package's types: those describe the client
side, are generated from OpenAPI and change often, and a server needs only these few shapes.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # OpenAI's limit on stop sequences
# fields that are accepted only at the value that changes nothing here
NEUTRAL = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logprobs": (False, None),
           "top_logprobs": (0, None), "logit_bias": (None,), "parallel_tool_calls": (None,), "tools": (None,),
           "tool_choice": (None, "none")}
IGNORED = ("user", "metadata", "store", "service_tier")


class BadRequest(Exception):
    """A request the endpoint refuses: ``status``, the ``param`` at fault, a message naming the fix."""

    def __init__(self, message: str, param: str | None = None, status: int = 422, code: str = "bad_request"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass
class CompletionRequest:
    """A checked request; ``prompt`` is set for ``/v1/completions``, ``messages`` for chat."""

    model: str
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Limits:
    max_tokens: int = 1024       # largest max_tokens a request may ask for
    max_text_chars: int = 10_000  # characters of all messages (or the prompt) together
    max_messages: int = 256


def error_body(err: BadRequest) -> dict:
    """OpenAI's error object (clients read ``error.message``), plus ``detail`` as the server's other
    endpoints answer."""
    kind = "authentication_error" if err.status == 401 else "invalid_request_error"
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code},
            "detail": err.message}


def _kind(value) -> str:
    names = {dict: "an object", list: "an array", type(None): "null", bool: "a boolean", int: "a number",
             float: "a number", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _number(body: dict, key: str, low: float, high: float, *, integer: bool = False, low_open: bool = False):
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'} (got {_kind(value)})", key)
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise BadRequest(f"'{key}' is {value}; it must be {bounds}", key)
    return value


def lone_surrogate(text: str) -> int | None:
    """Where a text holds half of a UTF-16 pair (JSON allows "\\ud800"; no tokenizer takes it)."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        return err.start


def _text(value, where: str, limit: int) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{where}' must be a string (got {_kind(value)})", where)
    at = lone_surrogate(value)
    if at is not None:
        raise BadRequest(f"'{where}' holds a lone UTF-16 surrogate at character {at}, which is not text; send "
                         "valid UTF-8", where, code="bad_text")
    if len(value) > limit:
        raise BadRequest(f"'{where}' has {len(value):,} characters; the limit is {limit:,}", where, 413, "too_long")
    return value


def _content(value, where: str, limit: int) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"'{where}[{i}]' must be a text part {{\"type\": \"text\", \"text\": \"...\"}}; "
                                 "this model reads text only", f"{where}[{i}]")
            parts.append(_text(part.get("text"), f"{where}[{i}].text", limit))
        return "".join(parts)
    return _text(value, where, limit)


def _common(body, model_id: str, limits: Limits, own: set[str]) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object (got {_kind(body)})")
    allowed = own | {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "seed",
                     "stream", "stream_options", *NEUTRAL, *IGNORED}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; this endpoint takes "
                         f"{', '.join(sorted(allowed - set(IGNORED)))}", unknown[0])
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in neutral:
            raise BadRequest(f"'{key}' is not supported by this server (only {neutral[0]!r}); leave it out", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(f"'model' must be the served model's id, {model_id!r} (GET /v1/models lists it)", "model")
    if model != model_id:
        raise BadRequest(f"model {model!r} is not served here; this server has {model_id!r} (GET /v1/models)",
                         "model", 404, "model_not_found")
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise BadRequest(f"'n' is {n!r}; this server answers one choice per request (n: 1)", "n")
    given = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise BadRequest("'max_tokens' and 'max_completion_tokens' differ; send one of them", "max_completion_tokens")
    max_tokens = _number(body, given[0], 1, limits.max_tokens, integer=True) if given else None
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest(f"'stream' must be true or false (got {_kind(stream)})", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise BadRequest("'stream_options' may hold only include_usage", "stream_options")
    return dict(model=model, max_tokens=max_tokens, temperature=_number(body, "temperature", 0, 2),
                top_p=_number(body, "top_p", 0, 1, low_open=True), stop=stops,
                seed=_number(body, "seed", -(2**63), 2**63 - 1, integer=True), stream=bool(stream),
                include_usage=bool(options.get("include_usage")))


def parse_chat(body, model_id: str, limits: Limits) -> CompletionRequest:
    """``POST /v1/chat/completions`` body -> a checked request; BadRequest names the field."""
    common = _common(body, model_id, limits, {"messages"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"{len(messages)} messages; at most {limits.max_messages}", "messages", 413, "too_many")
    out, chars = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"'{where}' must be an object {{\"role\", \"content\"}} (got {_kind(m)})", where)
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"'{where}.role' is {role!r}; use one of {', '.join(ROLES)}", f"{where}.role")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise BadRequest(f"'{where}' has field(s) {', '.join(map(repr, extra))} this model cannot use "
                             "(tool calls and images are not supported)", f"{where}.{extra[0]}")
        content = _content(m.get("content"), f"{where}.content", limits.max_text_chars)
        chars += len(content)
        out.append({"role": ROLES[role], "content": content})
    if chars > limits.max_text_chars:
        raise BadRequest(f"the messages hold {chars:,} characters; the limit is {limits.max_text_chars:,}",
                         "messages", 413, "too_long")
    if out[-1]["role"] == "assistant":
        raise BadRequest("the last message is the assistant's; end with a user message for the model to answer",
                         f"messages[{len(out) - 1}].role")
    return CompletionRequest(messages=out, **common)


def parse_completion(body, model_id: str, limits: Limits) -> CompletionRequest:
    """``POST /v1/completions`` body (a raw ``prompt``, no chat template) -> a checked request."""
    common = _common(body, model_id, limits, {"prompt", "echo", "suffix", "best_of"})
    for key, neutral in (("echo", (False, None)), ("suffix", (None,)), ("best_of", (1, None))):
        if key in body and body[key] not in neutral:
            raise BadRequest(f"'{key}' is not supported by this server; leave it out", key)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        raise BadRequest("'prompt' must be one string here (one completion per request)", "prompt")
    if prompt is None or prompt == "":
        raise BadRequest("'prompt' must be a non-empty string", "prompt")
    return CompletionRequest(prompt=_text(prompt, "prompt", limits.max_text_chars), **common)


# --------------------------------------------------------------------------- responses

def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, created: int, model: str, text: str, finish: str, tokens: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": tokens}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None,
               tokens: dict | None = None) -> dict:
    """One server-sent event of a streamed chat completion; the usage chunk has no choices."""
    choices = [] if tokens is not None and not delta and finish is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if tokens is not None:
        out["usage"] = tokens
    return out


def completion_response(rid: str, created: int, model: str, text: str, finish: str, tokens: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": tokens}


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None = None,
                     tokens: dict | None = None) -> dict:
    choices = [] if tokens is not None and not text and finish is None else [
        {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if tokens is not None:
        out["usage"] = tokens
    return out


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "tuneforge"}]}


def sse(obj: dict) -> str:
    """A server-sent event (``text/event-stream``): ``data: <json>`` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
