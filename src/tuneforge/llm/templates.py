"""Chat templates: conversation -> text, which characters are trained on, and token ids + labels.

A template renders a conversation to one string and records the character spans of
what the model should learn to write (each assistant reply *including* its turn-end
marker and EOS, so a tuned model learns to stop). Tokenising with offsets then
labels exactly the tokens inside those spans; everything else gets ``-100``
(no loss). One path for our built-in templates and for a tokenizer's own Jinja
template (whose assistant spans are found by rendering each conversation prefix
with ``add_generation_prompt=True``: the standard trick, since Jinja templates do
not report spans).

Built-in templates (``task.chat_template``):

- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` (OpenAI ChatML, Qwen, many others);
- ``llama``: Llama-2 chat, ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] reply</s>``;
- ``none``: the texts concatenated as they are (prompt/completion and Alpaca data:
  the prompt already says where the answer starts), EOS after each reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TuneforgeError

IGNORE = -100
BUILTIN = ("chatml", "llama", "none")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # trained character ranges [start, end)


def resolve_template(choice: str, tokenizer, data_format: str) -> str:
    """``auto``: the tokenizer's own template for chat data when it has one, else ChatML;
    raw concatenation (``none``) for prompt/completion, Alpaca and plain text."""
    if choice == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise TuneforgeError("task.chat_template is 'tokenizer' but this tokenizer has no chat_template; "
                                 f"use one of the built-in templates ({', '.join(BUILTIN)}) or auto")
        return "tokenizer"
    if choice != "auto":
        return choice
    if data_format == "chat":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    return "none"


class Template:
    """Renders conversations for one tokenizer and one template choice."""

    def __init__(self, name: str, tokenizer):
        if name not in BUILTIN + ("tokenizer",):
            raise TuneforgeError(f"unknown chat template '{name}'; use auto, tokenizer, {', '.join(BUILTIN)}")
        self.name, self.tok = name, tokenizer
        self.eos = tokenizer.eos_token or ""
        if not self.eos:
            raise TuneforgeError("the tokenizer has no EOS token, so a tuned model could not learn to stop; "
                                 "set tokenizer.eos_token and save the tokenizer with the model")
        bos = getattr(tokenizer, "bos_token", None)
        self.bos = bos if bos and bos != self.eos else ""

    # -- rendering ---------------------------------------------------------------------
    def render(self, messages: list[dict], train_on: str = "completion") -> Rendered:
        """The whole conversation; ``train_on``: completion (every assistant reply), last-turn, all."""
        if self.name == "tokenizer":
            text, spans = self._render_tokenizer(messages)
        else:
            text, spans = self._render_builtin(messages, generation_prompt=False)
        if messages[-1]["role"] == "text":  # plain text: learn all of it
            return Rendered(text, [(0, len(text))])
        if train_on == "all":
            spans = [(0, len(text))]
        elif train_on == "last-turn":
            spans = spans[-1:]
        return Rendered(text, spans)

    def prompt(self, messages: list[dict]) -> str:
        """The text that asks for the next assistant reply (for generation)."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if self.name == "tokenizer":
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._render_builtin(messages, generation_prompt=True)[0]

    def _render_builtin(self, messages: list[dict], generation_prompt: bool) -> tuple[str, list]:
        parts, spans, pos = [], [], 0

        def add(piece: str, trained: bool = False):
            nonlocal pos
            if trained:
                spans.append((pos, pos + len(piece)))
            parts.append(piece)
            pos += len(piece)

        if messages and messages[0]["role"] == "text":
            add(self.bos + messages[0]["content"] + self.eos)
            return "".join(parts), spans
        # What the text opens with may be the BOS already (SmolLM2's BOS is "<|im_start|>", which
        # opens every ChatML turn; a prompt rendered by the model's own template starts with it):
        # a second one in front would be a token the model never saw there.
        opener = {"chatml": "<|im_start|>", "llama": "[INST]"}.get(self.name, messages[0]["content"] if messages else "")
        add("" if self.bos and opener.startswith(self.bos) else self.bos)
        system = None
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if self.name == "chatml":
                if role == "assistant":
                    add("<|im_start|>assistant\n")
                    add(content + "<|im_end|>" + ("" if self.eos == "<|im_end|>" else self.eos), trained=True)
                    add("\n")
                else:
                    add(f"<|im_start|>{role}\n{content}<|im_end|>\n")
            elif self.name == "llama":
                if role == "system":
                    system = content
                elif role == "user":
                    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system is not None else ""
                    system = None
                    add(("" if i <= 1 else self.bos) + f"[INST] {sys_block}{content} [/INST] ")
                else:
                    add(content + self.eos, trained=True)
            else:  # none: raw concatenation
                if role == "assistant":
                    add(content + self.eos, trained=True)
                else:
                    add(content)
        if generation_prompt and self.name == "chatml":
            add("<|im_start|>assistant\n")
        return "".join(parts), spans

    def _render_tokenizer(self, messages: list[dict]) -> tuple[str, list]:
        apply = self.tok.apply_chat_template
        text = apply(messages, tokenize=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = apply(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = apply(messages[: i + 1], tokenize=False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise TuneforgeError("the tokenizer's chat template renders a conversation differently from its "
                                     "prefixes, so the assistant replies cannot be located for loss masking; set "
                                     "task.chat_template to chatml or llama")
            end = len(upto)
            eos_at = text.rfind(self.eos, len(prefix), end) if self.eos else -1
            if eos_at >= 0 and not text[eos_at + len(self.eos):end].strip():
                # what the template writes after the turn's EOS ("<|im_end|>\n" in ChatML-style
                # templates such as SmolLM2's) is the template's separator, not the model's to learn
                end = eos_at + len(self.eos)
            spans.append((len(prefix), end))
        if spans and self.eos not in text[spans[-1][0]:spans[-1][1]]:
            # a template whose turns end without EOS would train a model that never stops
            text = text[: spans[-1][1]] + self.eos + text[spans[-1][1]:]
            spans[-1] = (spans[-1][0], spans[-1][1] + len(self.eos))
        return text, spans

    # -- tokenising --------------------------------------------------------------------
    def encode(self, rendered: Rendered) -> tuple[list[int], list[int]]:
        """-> (input_ids, labels) with ``labels[i] = input_ids[i]`` on trained tokens, else -100.
        Labels are *not* shifted: position i's target is labels[i + 1] (the loss shifts)."""
        enc = self.tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE] * len(ids)
        for i, (start, end) in enumerate(offsets):
            if end > start and any(s <= start < e for s, e in rendered.spans):
                labels[i] = ids[i]
        return ids, labels

    def stop_ids(self) -> list[int]:
        """Token ids that end a reply: EOS, and ChatML's <|im_end|> where it is one token."""
        ids = {self.tok.eos_token_id}
        if self.name in ("chatml", "tokenizer"):
            im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
            if isinstance(im_end, int) and im_end != getattr(self.tok, "unk_token_id", None):
                ids.add(im_end)
        return sorted(i for i in ids if i is not None)
