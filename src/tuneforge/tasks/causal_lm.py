"""`causal-lm`: supervised / instruction fine-tuning and continued pre-training of a decoder LLM.

Records (chat, prompt/completion, Alpaca, plain text; ``llm.formats``) are rendered by a
chat template (``llm.templates``) into token ids with labels on the reply tokens only (by
default), optionally packed into full rows (``llm.packing``), and trained with next-token
cross-entropy. The model is :class:`CausalLM`: the pretrained decoder as ``backbone`` and its
vocabulary projection as ``lm_head`` (both the Hugging Face modules themselves), so every
strategy that acts on ``backbone`` works unchanged. ``lm_head`` is not a ``task_head``:
nothing new is learned on top, and LoRA-style strategies leave it frozen.

Speed: the LM head runs only on positions that carry loss. For instruction data most
positions are prompt tokens, and the vocabulary projection (hidden x vocab per position)
is the largest single matmul of a small LLM, so this skips much of the work that a
full-logits implementation does and never builds the (batch, length, vocab) logits.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.batching import EpochBatchSampler
from ..errors import TuneforgeError
from ..llm.model import LM_HEAD_ROWS_MULTIPLE, CausalLM, _wrapped, core_model  # noqa: F401 - re-exported
from ..llm.templates import IGNORE, Template, resolve_template
from .base import LabelMap
from .options import TYPE_DOC, ChatTemplate, Generation, MaxLength, TaskOptions, refuse_encoder_alias, register_task


class CausalLMOptions(TaskOptions):
    """Supervised / instruction fine-tuning and continued pre-training of a decoder LLM on chat, prompt-completion, Alpaca or plain-text data: next-token loss (on the replies by default) through the model's own LM head; no new weights on top."""

    eval_before_default: ClassVar[bool] = True  # the before -> after change is the figure users want
    keeps_lm_head: ClassVar[bool] = True
    type: str = Field("causal-lm", description=TYPE_DOC)
    format: Literal["auto", "chat", "sharegpt", "prompt-completion", "alpaca", "text"] = Field("auto", description="causal-lm data shape: chat {messages: [{role, content}]}, sharegpt {conversations: [{from: human|gpt|system, value}], system?} (LLaMA-Factory), prompt-completion {prompt, completion}, alpaca {instruction, input, output}, text {text} or a .txt file; auto detects it per record.")
    chat_template: ChatTemplate = "auto"
    train_on: Literal["completion", "last-turn", "all"] = Field("completion", description="causal-lm: which tokens carry loss: every assistant reply (completion), only the last one, or the whole text including prompts.")
    packing: bool = Field(True, description="causal-lm: pack several short examples into each row of max_length tokens; each example attends only to itself (position ids restart, block-diagonal attention), so the loss is the same as unpacked, with far less padding.")
    generation: Generation
    max_length: MaxLength = None

    default_metric: ClassVar[str] = "loss"

    def metric_names(self) -> list[str]:
        return ["loss", "perplexity"]

    def check(self, recipe) -> None:
        refuse_encoder_alias(recipe, f"task.type {self.type} needs")

# Longest row by default: the model's own limit, capped (attention cost grows with its square).
DEFAULT_MAX_LENGTH = 1024


class LMExamples(Dataset):
    """Tokenised (and possibly packed) rows; ``records``: the records they came from (generation
    evaluation reads their conversations)."""

    def __init__(self, rows: list[dict], where: list[str], examples: int, records: list | None = None):
        self.rows, self.where, self.examples = rows, where, examples
        self.records = records or []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "index": i}

    @property
    def lengths(self) -> list[int]:
        return [len(r["input_ids"]) for r in self.rows]


class LMMetrics:
    """Validation loss (mean over target tokens) and perplexity, streamed batch by batch."""

    def __init__(self):
        self.loss_sum, self.tokens = 0.0, 0

    def update(self, logits, labels, *, loss_sum, count, index=None) -> None:
        self.loss_sum += float(loss_sum)  # summed over the batch's `count` target tokens
        self.tokens += int(count)

    def compute(self) -> dict:
        loss = self.loss_sum / max(self.tokens, 1)
        return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4), "target_tokens": self.tokens}


@register_task("causal-lm", CausalLMOptions)
class CausalLMTask:
    # declared capabilities (see tasks.base.Task)
    modality = CausalLMOptions.modality
    generative = True
    needs_lm_head = True
    has_task_head = False  # the LM head is the model's own
    cacheable = False  # every layer's input changes as the model trains: nothing to cache

    def __init__(self, recipe):
        self.recipe = recipe
        self.tokenizer = None
        self.template: Template | None = None
        self.max_length = recipe.task.max_length
        self.model_max_length: int | None = None
        self.truncated: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.packed: dict[str, dict] = {}
        self.template_name: str | None = None

    # -- data ----------------------------------------------------------------------------
    def read(self, split: str, path: str, *, limit: int | None, skipped: list, log=None) -> list:
        from ..llm.formats import read_lm_records

        data = self.recipe.data
        records = read_lm_records(path, fmt=self.recipe.task.format, text_key=data.text_column, limit=limit,
                                  on_bad_record=data.on_bad_record, skipped=skipped, encoding=data.encoding, log=log)
        key = self.recipe.task.generation.group_by
        if key:
            _tag_groups(records, path, key, data.encoding)
        return records

    def record_labels(self, record) -> list:
        return []

    def label_map(self, train_records: list) -> LabelMap:
        return LabelMap(names=[])

    def attach(self, loaded, log=None) -> None:
        if loaded.tokenizer is None:
            raise TuneforgeError(f"model '{loaded.info.source}' has no tokenizer; save it next to the weights")
        if loaded.lm_head is None:
            raise TuneforgeError("the model was loaded without its LM head; load it with causal_lm=True")
        self.tokenizer = loaded.tokenizer
        config = loaded.backbone.config
        limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, k, None), int)), DEFAULT_MAX_LENGTH)
        self.model_max_length = limit
        if self.max_length and self.max_length > limit and log is not None:
            log(f"[yellow]task.max_length {self.max_length} capped at {limit}[/]: this model's positions")
        self.max_length = min(self.max_length or min(limit, DEFAULT_MAX_LENGTH), limit)

    def build_template(self, data_format: str) -> Template:
        return self.build_template_named(resolve_template(self.recipe.task.chat_template, self.tokenizer, data_format))

    def build_template_named(self, name: str) -> Template:
        self.template_name = name
        self.template = Template(name, self.tokenizer)
        return self.template

    def build_model(self, loaded, labels) -> nn.Module:
        return CausalLM(loaded.backbone, loaded.lm_head, loaded.lm)

    def encode_records(self, records: list, split: str) -> tuple[list, list[str]]:
        """Records -> (ids, labels) examples, truncated to max_length; examples left with no
        target token (a prompt longer than max_length) are dropped and counted."""
        if self.template is None:
            formats = {r.values["format"] for r in records}
            self.build_template("chat" if "chat" in formats else next(iter(formats), "text"))
        train_on = self.recipe.task.train_on
        examples, where, cut, dropped = [], [], 0, 0
        for r in records:
            ids, labels = self.template.encode(self.template.render(r.values["messages"], train_on))
            if len(ids) > self.max_length:
                ids, labels, cut = ids[: self.max_length], labels[: self.max_length], cut + 1
            if all(x == IGNORE for x in labels[1:]):
                dropped += 1
                continue
            examples.append((ids, labels))
            where.append(r.where)
        self.truncated[split], self.dropped[split] = cut, dropped
        if not examples:
            raise TuneforgeError(f"no {split} example has a token to learn within task.max_length = "
                                 f"{self.max_length} (prompts too long?); raise task.max_length or shorten the prompts")
        return examples, where

    def dataset(self, records: list, labels, split: str) -> LMExamples:
        from ..llm.packing import pack

        examples, where = self.encode_records(records, split)
        if self.recipe.task.packing and self.can_pack():
            rows = pack(examples, self.max_length)
            tokens = sum(len(e[0]) for e in examples)
            self.packed[split] = {"examples": len(examples), "rows": len(rows),
                                  "fill": round(tokens / (len(rows) * self.max_length), 4)}
            row_where = [", ".join(where[m] for m in r["members"][:3]) + (" ..." if len(r["members"]) > 3 else "")
                         for r in rows]
            return LMExamples(rows, row_where, len(examples), records)
        rows = [{"input_ids": ids, "labels": lab} for ids, lab in examples]
        return LMExamples(rows, where, len(examples), records)

    def can_pack(self) -> bool:
        """A strategy that puts virtual tokens in front of each row (prompt and prefix tuning):
        rows cannot hold several examples."""
        from ..strategies import strategy_class

        return not strategy_class(self.recipe.strategy.name).adds_virtual_tokens

    def collate(self, items: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(len(it["input_ids"]) for it in items)
        B = len(items)
        ids = torch.full((B, longest), pad, dtype=torch.long)  # (B, T)
        labels = torch.full((B, longest), IGNORE, dtype=torch.long)  # (B, T)
        mask = torch.zeros((B, longest), dtype=torch.long)  # (B, T)
        packed = "position_ids" in items[0]
        positions = torch.zeros((B, longest), dtype=torch.long) if packed else None  # (B, T)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = torch.tensor(it["input_ids"])
            labels[row, :n] = torch.tensor(it["labels"])
            mask[row, :n] = 1
            if packed:
                positions[row, :n] = torch.tensor(it["position_ids"])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "index": torch.tensor([it["index"] for it in items]),
                 "num_examples": sum(len(it.get("members", [0])) for it in items)}
        if packed:
            batch["position_ids"] = positions
        return batch

    def loader(self, dataset: LMExamples, batch_size: int, *, train: bool, seed: int) -> DataLoader:
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, lengths=dataset.lengths,
                                    group_by_length=self.recipe.train.group_by_length)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=0,
                          generator=torch.Generator().manual_seed(seed))

    # -- training --------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> dict:
        loss_sum, n = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch.get("position_ids"), labels=batch["labels"])
        return {"loss_sum": loss_sum, "count": n, "logits": None}  # n: target tokens, a device scalar (no sync)

    def metrics(self, labels=None) -> LMMetrics:
        return LMMetrics()

    def settings(self) -> dict:
        return {"max_length": self.max_length, "chat_template": self.template_name, "format": self.recipe.task.format,
                "train_on": self.recipe.task.train_on, "packing": dict(self.packed),
                "truncated": dict(self.truncated), "dropped_no_target": dict(self.dropped)}

    def before_training(self, model, datasets: dict, device, autocast, run_dir, log) -> None:
        """With ``train.eval_before``: the generation evaluation of the starting weights
        (``generation-before.json`` and ``generations-before.jsonl`` in the run), which
        :meth:`after_training` sets beside its own. A resumed run has them already and keeps
        them (the model here still holds the starting weights either way: a checkpoint is
        restored after this)."""
        from pathlib import Path

        from ..llm.generation import evaluate_generation

        gen = self.recipe.task.generation
        scores = Path(run_dir) / BEFORE_SCORES
        if not self.recipe.train.eval_before or scores.exists() or "validation" not in datasets:
            return
        records = self.generation_records(datasets["validation"].records)
        if not records:
            return
        result = evaluate_generation(model, self, records, Path(run_dir) / BEFORE_SAMPLES, device, autocast, gen,
                                     seed=self.recipe.train.seed, log=log, when="before training")
        tmp = scores.with_name(f".{scores.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(scores)  # atomic: a resumed run trusts what it finds

    def generation_records(self, records: list) -> list:
        """The held-out prompts that generation is scored on: the first ``eval_prompts`` conversations
        (text records have no reply to compare), or that many of each group with ``group_by``."""
        limit = self.recipe.task.generation.eval_prompts
        records = [r for r in records if r.values["format"] != "text"]
        if not self.recipe.task.generation.group_by:
            return records[:limit]
        taken: dict = {}
        out = []
        for r in records:
            group = r.values.get("group")
            if taken.get(group, 0) < limit:
                taken[group] = taken.get(group, 0) + 1
                out.append(r)
        return out

    def callbacks(self, plan, log) -> list:
        """Engine callbacks of the task's own: none (grpo adds its rollout figures)."""
        return []

    def restore(self, settings: dict) -> None:
        """Take back what :meth:`settings` recorded (a saved run being loaded)."""
        if "max_length" in settings:
            self.max_length = settings["max_length"]
        if settings.get("chat_template"):
            self.build_template_named(settings["chat_template"])

    # -- after training --------------------------------------------------------------------
    def after_training(self, model, splits: dict, run, device, autocast, log) -> dict:
        """Generation-based evaluation on held-out prompts; samples written into the run."""
        from ..llm.generation import evaluate_generation

        gen = self.recipe.task.generation
        records = self.generation_records(splits.get("validation", [])) if gen.eval_prompts else []
        if not records:
            return {}
        samples = run.path / "generations.jsonl"
        result = evaluate_generation(model, self, records, samples, device, autocast, gen,
                                     seed=self.recipe.train.seed, log=log, when="after training")
        before = run.path / BEFORE_SCORES
        if before.is_file():  # train.eval_before: the starting weights' scores and replies beside these
            result["before"] = {k: v for k, v in json.loads(before.read_text()).items() if k != "before"}
            _merge_before(samples, run.path / BEFORE_SAMPLES)
        return result


BEFORE_SCORES, BEFORE_SAMPLES = "generation-before.json", "generations-before.jsonl"


def _merge_before(samples, before_samples) -> None:
    """generations.jsonl rows gain ``greedy_before`` / ``sampled_before`` (matched by record)."""
    if not before_samples.is_file():
        return
    earlier = {}
    for line in before_samples.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        earlier[row["where"]] = row
    rows = []
    for line in samples.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        was = earlier.get(row["where"], {})
        for key in ("greedy", "sampled"):
            if key in was:
                row[f"{key}_before"] = was[key]
        rows.append(json.dumps(row))
    tmp = samples.with_name(f".{samples.name}.tmp")
    tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    tmp.replace(samples)


def _tag_groups(records: list, path: str, key: str, encoding: str) -> None:
    """``task.generation.group_by``: each record's value of ``key`` as ``values["group"]``. The
    conversation readers keep only the conversation, so the file's rows are read once more
    here, through the same row reader (the same ``where`` for the same row)."""
    from pathlib import Path

    from ..llm.formats import _json_rows

    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        raise TuneforgeError(f"task.generation.group_by '{key}' reads a key of JSON records, but {path} is not "
                             ".json or .jsonl; remove group_by or convert the file")
    value = {where: obj.get(key) for where, obj in _json_rows(Path(path), encoding) if isinstance(obj, dict)}
    for r in records:
        group = value.get(r.where)
        r.values["group"] = str(group) if group is not None else "other"
