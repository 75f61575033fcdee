"""Inference on finished jobs: OpenAI's chat and text completions for causal-LM jobs, and the
``tuneforge serve`` predict shape for every other task.

Kept small and separate on purpose: the OpenAI chat shaping here (request fields -> generation
settings, the ``chat.completion`` response with its usage counts) is the one thing this module
knows, so it can be pointed at a shared implementation in ``deploy/`` once one exists without
touching the API. Models load through ``deploy/generator.py`` / ``deploy/predictor.py`` (a run's
saved model via ``run/artifact.py``) and the newest few stay in memory.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .jobs import BadRequest


class ModelCache:
    """The last ``size`` loaded models, by run directory; one lock per model (generation is not re-entrant)."""

    def __init__(self, size: int = 2):
        self.size = size
        self.models: OrderedDict[str, tuple] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, run_dir: Path, generative: bool):
        key = f"{run_dir}:{generative}"
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
        if generative:
            from ..deploy.generator import Generator

            model = Generator(run_dir)
        else:
            from ..deploy.predictor import Predictor

            model = Predictor(run_dir)
        entry = (model, threading.Lock())
        with self.lock:
            self.models[key] = entry
            while len(self.models) > self.size:
                self.models.popitem(last=False)
        return entry


def _settings(body: dict) -> dict:
    if body.get("stream"):
        raise BadRequest("streaming responses are not supported by this server; leave 'stream' unset", "stream")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 64
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise BadRequest("'max_tokens' must be an integer from 1 to 4096", "max_tokens")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise BadRequest("'temperature' is a number from 0 to 2", "temperature")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise BadRequest("'top_p' is a number in (0, 1]", "top_p")
    # temperature 0 is greedy decoding, as OpenAI documents it (near-deterministic)
    return {"greedy": temperature == 0, "max_new_tokens": max_tokens, "temperature": float(temperature) or None,
            "top_p": float(top_p), "seed": int(body.get("seed") or 0)}


def _usage(tokenizer, prompts: list[str], replies: list[str]) -> dict:
    prompt = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    completion = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(tokenizer, reply: str, max_new_tokens: int) -> str:
    return "length" if len(tokenizer(reply, add_special_tokens=False)["input_ids"]) >= max_new_tokens else "stop"


def chat_completion(generator, lock, body: dict, model_name: str) -> dict:
    from .files import ROLES, content_text

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    plain = []
    for i, m in enumerate(messages):
        text = content_text(m.get("content")) if isinstance(m, dict) else None
        if not isinstance(m, dict) or m.get("role") not in ROLES or text is None:
            raise BadRequest(f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: a string}}", f"messages[{i}]")
        plain.append({"role": "system" if m["role"] == "developer" else m["role"], "content": text})
    s = _settings(body)
    with lock:
        prompt = generator.task.template.prompt(plain)
        reply = generator.reply(plain, greedy=s["greedy"], seed=s["seed"], max_new_tokens=s["max_new_tokens"],
                                temperature=s["temperature"], top_p=s["top_p"])
    tok = generator.task.tokenizer
    return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply, "refusal": None},
                         "logprobs": None, "finish_reason": _finish(tok, reply, s["max_new_tokens"])}],
            "usage": _usage(tok, [prompt], [reply])}


def text_completion(generator, lock, body: dict, model_name: str) -> dict:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompt' must be a string or a list of strings", "prompt")
    s = _settings(body)
    with lock:
        replies = generator.complete(prompts, raw=True, greedy=s["greedy"], seed=s["seed"],
                                     max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"])
    tok = generator.task.tokenizer
    return {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": i, "text": r, "logprobs": None, "finish_reason": _finish(tok, r, s["max_new_tokens"])}
                        for i, r in enumerate(replies)],
            "usage": _usage(tok, prompts, replies)}


def predict(predictor, lock, body: dict, max_items: int = 64) -> dict:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs or len(inputs) > max_items or not all(isinstance(x, str) for x in inputs):
        raise BadRequest(f"'inputs' must be a list of 1 to {max_items} strings", "inputs")
    with lock:
        return {"predictions": predictor.predict(inputs)}
