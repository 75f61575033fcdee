"""`task.classifier: label-words`: a causal LM classifies a text by scoring each label's words.

Each input becomes ``text + task.label_prompt``, and the score of label c is the log-probability
the LM itself gives to c's words right after it::

    score(c) = log P(w_1 .. w_k | text, prompt) = sum_j log P(w_j | text, prompt, w_<j)

The prediction is the label whose words the LM finds most likely: decoding constrained to the
label set, so the answer is always one of the labels, never a free-form string. The (B, C)
scores are the logits of the usual classification loss and metrics: softmax over them is the
LM's probability renormalised over the labels, and cross-entropy on them trains the LM to put
the right label's words first. Untrained, the model is a zero-shot classifier whose scores are
the LM's own.

The module is the pretrained decoder as ``backbone`` and its vocabulary projection as
``lm_head`` (the Hugging Face modules themselves, as for ``causal-lm``), so every strategy acts
on ``backbone`` as usual. Nothing new is learned on top: there is no ``task_head``.

Cost: the last label token is only read, never fed, so when every label is a single token one
forward pass scores all labels (the next-token log-probs at the last real position; the LM head
runs on one position per text). Longer labels are teacher-forced: the batch is repeated once per
label with that label's first k-1 tokens appended, and the LM head runs only on label positions.
Pick label words that are single tokens of the model's tokenizer (``task.label_words``) for speed.

Token boundaries follow lm-evaluation-harness's context/continuation split: the tokens of a piece
are the difference between encoding ``context + piece`` and ``context`` (encoding a piece on its
own can differ, e.g. SentencePiece adds a word-start marker at the start of every string).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TuneforgeError

# A neutral text before the prompt when tokenising the prompt on its own (see continuation()).
_CONTEXT = "Some text."


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def continuation(tokenizer, context: str, text: str) -> list[int]:
    """Token ids of ``text`` as the tokenizer splits it right after ``context``."""
    before, both = _encode(tokenizer, context), _encode(tokenizer, context + text)
    if both[:len(before)] == before and len(both) > len(before):
        return both[len(before):]
    return _encode(tokenizer, text)  # the context merged into the text: fall back to its own tokens


def leading_special(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's BOS; none for GPT-2).
    Tokens it appends after a text (an EOS) are left out: the prompt and the label follow."""
    full, bare = tokenizer("a")["input_ids"], _encode(tokenizer, "a")
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i]
    return []


def check_decoder(loaded) -> None:
    """Refuse models that cannot score words left to right, naming the fix."""
    fix = ("task.classifier: label-words scores label words with a decoder language model's own head: set "
           "model.name to a local Hugging Face directory of a Llama, Qwen, GPT-2 (or similar) model, or use "
           "task.classifier: head for this model")
    if loaded.lm_head is None or loaded.lm is None:
        raise TuneforgeError(f"model '{loaded.info.source}' was loaded without a language-model head; {fix}")
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = loaded.lm.config
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise TuneforgeError(f"model '{loaded.info.source}' is a {config.model_type} encoder (it attends in both "
                             f"directions, so it is no left-to-right language model); {fix}")


class LabelWords:
    """How texts and labels become tokens: ``[specials] text prompt | label``."""

    def __init__(self, tokenizer, prompt: str):
        self.tokenizer, self.prompt = tokenizer, prompt
        self.head = leading_special(tokenizer)
        self.prompt_ids = continuation(tokenizer, _CONTEXT, prompt) if prompt else []

    @property
    def overhead(self) -> int:
        """Tokens every input carries besides its text."""
        return len(self.head) + len(self.prompt_ids)

    def wrap(self, text_ids: list[int]) -> list[int]:
        return self.head + list(text_ids) + self.prompt_ids

    def fit(self, ids: list[int], max_length: int) -> list[int]:
        """Cut the text of a wrapped input to ``max_length`` tokens, keeping the prompt at the end
        (the label is read right after it)."""
        return ids[:max_length - len(self.prompt_ids)] + self.prompt_ids

    def word(self, name: str, words: dict[str, str]) -> str:
        text = words.get(str(name), str(name))
        # "Label:" + " good": the word starts a new word after the prompt, as in natural text
        return text if not self.prompt or self.prompt[-1].isspace() else " " + text

    def label_ids(self, names: list[str], words: dict[str, str]) -> list[list[int]]:
        unknown = sorted(set(words) - {str(n) for n in names})
        if unknown:
            raise TuneforgeError(f"task.label_words names label(s) {', '.join(map(repr, unknown))} that the training "
                                 f"data does not have (its labels: {', '.join(map(str, names))}); fix the keys")
        context = _CONTEXT + self.prompt
        ids = [continuation(self.tokenizer, context, self.word(n, words)) for n in names]
        empty = [str(n) for n, t in zip(names, ids) if not t]
        if empty:
            raise TuneforgeError(f"label(s) {', '.join(empty)} have no words to score; give them words in "
                                 "task.label_words")
        seen: dict[tuple, str] = {}
        for n, t in zip(names, ids):
            other = seen.setdefault(tuple(t), str(n))
            if other != str(n):
                raise TuneforgeError(f"labels '{other}' and '{n}' become the same tokens {list(t)}, so the LM cannot "
                                     "tell them apart; give one of them other words in task.label_words")
        return ids


class LabelWordsClassifier(nn.Module):
    """A decoder and its LM head scoring C label token sequences: ``forward`` -> (B, C) log-probs.

    Inputs are padded on the right, as tuneforge's batches are (the last real position is found
    from the mask either way, but left padding changes a decoder's position ids)."""

    def __init__(self, backbone: nn.Module, lm_head: nn.Module, label_ids: list[list[int]],
                 lm: nn.Module | None = None, pad_id: int = 0):
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head
        self.__dict__["lm"] = lm  # the HF *ForCausalLM around the same modules (saving), not a submodule
        longest = max(len(t) for t in label_ids)
        table = torch.full((len(label_ids), longest), pad_id, dtype=torch.long)  # (C, L)
        for c, t in enumerate(label_ids):
            table[c, :len(t)] = torch.tensor(t)
        # not persistent: derived from the tokenizer and the labels, never part of saved weights
        self.register_buffer("label_tokens", table, persistent=False)  # (C, L)
        self.register_buffer("label_lengths", torch.tensor([len(t) for t in label_ids]), persistent=False)  # (C,)
        self.pad_id = pad_id
        self.label_ids = [list(t) for t in label_ids]

    @property
    def extra_positions(self) -> int:
        """Label tokens fed after the text (the last one is only read)."""
        return self.label_tokens.shape[1] - 1

    def hidden(self, input_ids, attention_mask) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if hasattr(self.backbone, "config"):  # not a strategy's wrapper (prompt tuning) taking only ids and mask
            kwargs["use_cache"] = False
        return self.backbone(**kwargs).last_hidden_state  # (B, T, H)

    def features(self, input_ids=None, attention_mask=None, **_) -> torch.Tensor:
        """The last real token's hidden state (B, H): what retain.data's drift measure compares."""
        hidden = self.hidden(input_ids, attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), _last(attention_mask)]

    def forward(self, input_ids=None, attention_mask=None, **_) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.extra_positions == 0:  # every label one token: one pass, one position per text
            h = self.features(input_ids, attention_mask)  # (B, H)
            logp = F.log_softmax(self.lm_head(h).float(), -1)  # (B, V)
            return logp[:, self.label_tokens[:, 0]]  # (B, C)
        return self._teacher_forced(input_ids, attention_mask)

    def _teacher_forced(self, input_ids, attention_mask) -> torch.Tensor:
        B, T = input_ids.shape
        C, L = self.label_tokens.shape
        dev = input_ids.device
        ids = input_ids.repeat_interleave(C, 0)  # (BC, T): row b*C + c scores label c for text b
        mask = attention_mask.repeat_interleave(C, 0)  # (BC, T)
        tokens = self.label_tokens.repeat(B, 1)  # (BC, L)
        valid = torch.arange(L, device=dev)[None] < self.label_lengths.repeat(B)[:, None]  # (BC, L)
        # token j of the label is predicted at position last + j; tokens 0..L-2 are fed after the text
        read = _last(mask)[:, None] + torch.arange(L, device=dev)[None]  # (BC, L)
        ids = torch.cat([ids, ids.new_full((B * C, L - 1), self.pad_id)], 1)  # (BC, T+L-1)
        mask = torch.cat([mask, mask.new_zeros((B * C, L - 1))], 1)  # (BC, T+L-1)
        feed = read[:, :-1] + 1  # (BC, L-1)
        fed = valid[:, :-1] & valid[:, 1:]  # a token is fed only when a next label token is read after it
        ids.scatter_(1, feed, torch.where(fed, tokens[:, :-1], ids.gather(1, feed)))
        mask.scatter_(1, feed, torch.where(fed, torch.ones_like(feed), mask.gather(1, feed)))
        hidden = self.hidden(ids, mask)  # (BC, T+L-1, H)
        h = hidden.gather(1, read[..., None].expand(-1, -1, hidden.shape[-1]))[valid]  # (N, H): label positions
        logp = F.log_softmax(self.lm_head(h).float(), -1)  # (N, V)
        token_logp = logp.gather(1, tokens[valid][:, None]).squeeze(1)  # (N,)
        rows = torch.arange(B * C, device=dev)[:, None].expand(-1, L)[valid]  # (N,)
        scores = token_logp.new_zeros(B * C).index_add_(0, rows, token_logp)  # (BC,)
        return scores.view(B, C)


def _last(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (B,), padding on either side."""
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    return (mask * positions).argmax(1)


def build(loaded, words: LabelWords, names: list[str], mapping: dict[str, str]) -> LabelWordsClassifier:
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return LabelWordsClassifier(loaded.backbone, loaded.lm_head, words.label_ids(names, mapping), loaded.lm, pad)
