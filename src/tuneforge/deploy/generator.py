"""A finished causal-lm (or preference) run, ready to answer prompts: ``Generator(run_dir)``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TuneforgeError
from ..llm.generation import generate, strip_reply
from ..run.artifact import load_model_dir


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
        out = generate(self.model, self.task.tokenizer, texts, greedy=greedy, seed=seed,
                       max_new_tokens=max_new_tokens or s.get("max_new_tokens", 64),
                       temperature=temperature or s.get("temperature", 0.7), top_p=top_p or s.get("top_p", 0.9),
                       stop_ids=self.task.template.stop_ids(), device=self.device)
        return [strip_reply(t, self.task.tokenizer) for t in out]
