"""A finished causal-lm (or preference) run, ready to answer prompts: ``Generator(run_dir)``."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import TuneforgeError
from ..llm.generation import generate, strip_reply
from ..run.artifact import load_model_dir

# Turn-end markers some tokenizers do not treat as special tokens: they end a streamed reply too
# (``strip_reply`` cuts them from a whole one).
END_MARKERS = ("<|im_end|>",)


@dataclass
class Completion:
    """One generated reply: its text, why it ended (``stop``: a stop token or string; ``length``:
    ``max_tokens`` reached) and the token counts (the end-of-turn token included when generated)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Generator:
    """A saved causal-lm run, ready to answer: ``Generator(run_dir).reply([{"role": "user", ...}])``."""

    def __init__(self, path, device: str = "cpu"):
        self.model, self.task, _, self.meta = load_model_dir(Path(path))
        if not self.task.generative:
            raise TuneforgeError(f"{path} is a {self.meta['task']['type']} run; generate and chat need a causal-lm "
                                 "or preference run (use `tuneforge predict` for classifiers)")
        if self.task.template is None:
            self.task.build_template("chat")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.settings = self.meta["task"].get("generation", {})
        self.lock = threading.Lock()  # one generation at a time touches the model (and its tokenizer)
        self._counter, self._counter_lock = None, threading.Lock()

    @property
    def context_length(self) -> int:
        """The model's positions: prompt and reply together must fit."""
        return self.task.model_max_length

    def complete(self, prompts: list[str], *, raw: bool = False, greedy: bool = True, seed: int = 0,
                 max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 system: str | None = None) -> list[str]:
        """Replies to user messages (``raw``: the prompts are sent exactly as given, no template)."""
        texts = prompts if raw else [self.task.template.prompt(
            ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}])
            for p in prompts]
        return self._generate(texts, greedy, seed, max_new_tokens, temperature, top_p)

    def reply(self, messages: list[dict], *, greedy: bool = True, seed: int = 0, **kw) -> str:
        """The next assistant turn of a conversation."""
        return self._generate([self.task.template.prompt(messages)], greedy, seed, kw.get("max_new_tokens"),
                              kw.get("temperature"), kw.get("top_p"))[0]

    def _generate(self, texts, greedy, seed, max_new_tokens, temperature, top_p) -> list[str]:
        s = self.settings
        with self.lock:
            out = generate(self.model, self.task.tokenizer, texts, greedy=greedy, seed=seed,
                           max_new_tokens=max_new_tokens or s.get("max_new_tokens", 64),
                           temperature=temperature or s.get("temperature", 0.7), top_p=top_p or s.get("top_p", 0.9),
                           stop_ids=self.task.template.stop_ids(), device=self.device)
        return [strip_reply(t, self.task.tokenizer) for t in out]

    # -- one reply, token by token (the server's chat and text completions) -----------------
    def prompt_text(self, messages: list[dict]) -> str:
        """A conversation rendered by the run's chat template, up to the assistant's turn."""
        return self.task.template.prompt(messages)

    def count_tokens(self, text: str) -> int:
        """Tokens of a text, with a copy of the tokenizer: a request handler counts while a
        generation decodes, and one fast tokenizer used from two threads at once may refuse
        ("Already borrowed")."""
        if self._counter is None:
            import copy

            self._counter = copy.deepcopy(self.task.tokenizer)
        with self._counter_lock:
            return len(self._counter(text, add_special_tokens=False)["input_ids"])

    def stream(self, prompt: str, *, max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None, stop: list[str] = (),
               on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None) -> Completion:
        """Generate one reply to ``prompt`` (already templated, or raw text), calling ``on_text``
        with each new piece of text as soon as it is final: text that could still become a stop
        string, and a multi-byte character still missing bytes, are held back until they are
        decided. ``temperature`` 0 is greedy; unset ones take the run's ``task.generation``.
        ``cancelled`` set (a client gone) ends the reply at the next token."""
        s, tokenizer = self.settings, self.task.tokenizer
        max_tokens = max_tokens or s.get("max_new_tokens", 64)
        temperature = s.get("temperature", 0.7) if temperature is None else temperature
        top_p = s.get("top_p", 0.9) if top_p is None else top_p
        stop_ids = set(self.task.template.stop_ids()) | {tokenizer.eos_token_id}
        ends = [m for m in (*END_MARKERS, tokenizer.eos_token or "") if m]
        text = _StopText(tokenizer, list(stop), ends, on_text or (lambda piece: None))
        generated = [0]

        def on_token(_row: int, token: int) -> bool:
            generated[0] += 1
            if token in stop_ids:
                text.finish = "stop"
                return True
            return text.feed(token) or (cancelled is not None and cancelled.is_set())

        with self.lock:
            prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            generate(self.model, tokenizer, [prompt], greedy=temperature == 0, temperature=temperature or 1.0,
                     top_p=top_p, seed=secrets.randbits(63) if seed is None else seed % 2**63,
                     max_new_tokens=max_tokens, stop_ids=sorted(stop_ids), device=self.device, on_token=on_token)
        text.close()
        finish = text.finish or ("length" if generated[0] >= max_tokens else "stop")
        return Completion(text.final, finish, prompt_tokens, generated[0])


class _StopText:
    """The reply's text as tokens arrive, cut at the first stop string; what is final is passed on."""

    def __init__(self, tokenizer, stops: list[str], ends: list[str], on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.stops = stops  # the request's: cut, and the reply ends
        self.markers = stops + ends  # the turn-end markers end it the same way
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters passed on
        self.finish: str | None = None

    def feed(self, token: int) -> bool:
        """-> True when the reply ends here (a stop string completed)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return False  # a character whose remaining bytes come with the next token
        self.text = text
        cuts = [i for i in (text.find(m, max(0, self.sent - len(m))) for m in self.markers) if i >= 0]
        if cuts:
            self.text = text[:min(cuts)]
            self.finish = "stop"
            self._send(len(self.text))
            return True
        hold = max((k for m in self.markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)
        self._send(len(text) - hold)
        return False

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.on_text(self.text[self.sent:upto])
            self.sent = upto

    def close(self) -> None:
        """The reply ended without completing a stop string: what was held back is text too (bytes
        of an unfinished character decode as U+FFFD, as in a reply decoded whole)."""
        if self.finish is None and self.ids:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        self._send(len(self.text))

    @property
    def final(self) -> str:
        return self.text
