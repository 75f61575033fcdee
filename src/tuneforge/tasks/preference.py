"""`preference`: learn to prefer the chosen reply over the rejected one (DPO, SimPO).

Each record holds a prompt and two replies (``llm.formats``, ``prompt``/``chosen``/
``rejected``). Both replies are rendered after the prompt by the chat template and
tokenised with loss on the reply tokens only; a batch of B pairs is one padded batch
of 2B rows (chosen rows first), so the pair costs one forward pass. The score of a
reply is its summed token log-probability log pi(y|x), computed with the LM head on
reply positions only (as ``CausalLM.forward`` does).

- DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``,
  with p the policy's and r the reference model's log-probs of the chosen (c) and
  rejected (r) replies. The implicit rewards are ``beta * (p - r)``.
- SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised,
  ``-log sigmoid(beta * (pc/|yc| - pr/|yr|) - gamma)``. ``task.simpo_gamma`` is
  gamma/beta, as in the SimPO authors' code (``gamma_beta_ratio``), so the loss is
  ``-log sigmoid(beta * (pc/|yc| - pr/|yr| - simpo_gamma))``; rewards ``beta * p/|y|``.

The reference model costs no memory and no extra forward per step: its log-probs
are computed once, before the first optimizer step, for every pair of every split
(:meth:`PreferenceTask.prepare_reference`, the same idea as the frozen-prefix
activation cache). With a peft strategy (LoRA, IA3) the reference is the policy
itself with its adapters disabled (``PeftModel.disable_adapter``): the base weights
are shared, never copied. With ``full`` and other in-place strategies the model
still holds its initial weights at that point, so the reference is exactly the
starting policy, again without a second copy. ``task.reference`` names a separate
reference instead (an SFT run, or a model directory/alias): it is loaded for that one
pass (through ``reference_source``, a loader floor 2 hands the task: a saved run is
``run/artifact.py``'s to load), checked to share the policy's tokenizer, used, and freed.
The values are also written to the run directory, keyed by a digest of the reference
weights, the encoded pairs and the precision, so a resumed run reuses them instead of
paying for the pass again.

``forward`` returns (B, 4) ``logits``: the pairs' implicit rewards (chosen, rejected), the
scores of a preference model, then the policy's own summed log-probs of the two replies,
from which the metrics also report the raw preference (``logp_accuracy``: does the policy
give the chosen reply more probability, reference or not) and the NLL per token of the
chosen replies (``chosen_nll``: did the policy's language modelling survive).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, ClassVar, Literal, Optional

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..data.records import Record
from ..errors import TuneforgeError
from ..llm.templates import IGNORE, Rendered
from .causal_lm import CausalLMTask, core_model
from .options import TYPE_DOC, ChatTemplate, Generation, MaxLength, TaskOptions, refuse_encoder_alias, register_task

REFERENCE_FILE = "reference_logps.safetensors"
SIDES = ("chosen", "rejected")


class PreferencePairs(Dataset):
    """Encoded pairs; ``reference`` (N, 2) holds the reference log-probs once computed."""

    def __init__(self, pairs: list[dict], where: list[str]):
        self.pairs, self.where = pairs, where
        self.reference: torch.Tensor | None = None  # (N, 2): chosen, rejected

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        item = {**self.pairs[i], "index": i}
        if self.reference is not None:
            item["reference"] = self.reference[i]
        return item

    @property
    def lengths(self) -> list[int]:
        return [max(len(p["chosen"][0]), len(p["rejected"][0])) for p in self.pairs]

    def digest(self) -> str:
        h = hashlib.sha256()
        for p in self.pairs:
            for side in SIDES:
                ids, labels = p[side]
                h.update(json.dumps([ids, labels]).encode())
        return h.hexdigest()


def sequence_logps(model: nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's target tokens, and their number: (R,), (R,).
    The LM head runs only on the positions that predict a target token."""
    core = core_model(model)
    hidden = core.hidden(input_ids, attention_mask)  # (R, T, H)
    targets = labels[:, 1:]  # (R, T-1): position t predicts token t+1
    keep = targets != IGNORE
    logits = core.lm_head(hidden[:, :-1][keep])  # (N, V)
    token_logps = -F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (N,)
    rows = torch.arange(len(labels), device=labels.device).unsqueeze(1).expand_as(keep)[keep]  # (N,)
    logps = torch.zeros(len(labels), device=token_logps.device).index_add(0, rows, token_logps)  # (R,)
    return logps, keep.sum(1)


@contextlib.contextmanager
def reference_model(model: nn.Module):
    """The reference: the policy itself in eval mode, with peft adapters disabled. No copy."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield model
    finally:
        model.train(was_training)


def reference_digest(model: nn.Module) -> str:
    """sha256 of the weights the reference uses: all of them, less a peft model's adapters."""
    prefix = getattr(getattr(model, "base_model", None), "prefix", None) if hasattr(model, "peft_config") else None
    h = hashlib.sha256()
    for key, tensor in sorted(core_model(model).state_dict().items()):
        if prefix and prefix in key:
            continue  # disabled while the reference is computed
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_reference(path: Path, key: str) -> dict | None:
    """The cached reference log-probs when ``path`` holds them for this key, else None."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # noqa: BLE001 - an unreadable cache is recomputed, never trusted
        return None


def check_same_tokenizer(tokenizer, expected, model: nn.Module, where: str) -> None:
    """DPO compares the log-probs of the *same token ids* under two models: a reference with
    another vocabulary scores other tokens, silently. Refuse it, naming what differs."""
    vocab, want = tokenizer.get_vocab(), expected.get_vocab()
    if vocab != want:
        extra, missing = sorted(set(vocab) - set(want))[:3], sorted(set(want) - set(vocab))[:3]
        differ = (f"; e.g. {', '.join(map(repr, extra))} only in the reference" if extra else
                  f"; e.g. {', '.join(map(repr, missing))} only in the policy's" if missing else
                  "; the same tokens under other ids")
        raise TuneforgeError(
            f"{where}: its tokenizer differs from the policy's ({len(vocab):,} vs {len(want):,} tokens{differ}"
            + "), so its log-probs would score other tokens; use a reference trained from the same base model "
            "as model.name (e.g. the SFT run the policy starts from)")
    rows = core_model(model).lm_head.weight.shape[0]
    if rows < len(want):
        raise TuneforgeError(f"{where}: its LM head scores {rows:,} tokens and the tokenizer has {len(want):,}; "
                             "it is not a model of this tokenizer")


def reference_scores(dataset: PreferencePairs) -> dict:
    """What the reference model itself prefers: the fraction of pairs whose chosen reply it gives
    more log-probability, and its NLL per token of the chosen replies. With the reference being the
    starting policy these are the policy's "before" values of ``logp_accuracy`` / ``chosen_nll``
    (its DPO rewards are all 0 there, by construction)."""
    ref = dataset.reference  # (N, 2)
    tokens = sum(sum(x != IGNORE for x in p["chosen"][1][1:]) for p in dataset.pairs)
    return {"logp_accuracy": round(float((ref[:, 0] > ref[:, 1]).float().mean()), 4),
            "chosen_nll": round(float(-ref[:, 0].sum()) / max(tokens, 1), 6)}


class PreferenceMetrics:
    """Loss, reward accuracy (chosen reward > rejected), mean margin and mean rewards; the policy's
    raw preference (summed log-prob of chosen > rejected) and NLL per token of the chosen replies;
    streamed."""

    def __init__(self):
        self.pairs, self.loss_sum, self.correct, self.logp_correct = 0, 0.0, 0, 0
        self.chosen_sum = self.rejected_sum = 0.0
        self.chosen_logp_sum, self.chosen_tokens = 0.0, 0

    def update(self, logits, labels, *, loss_sum, count, index=None) -> None:
        scores = logits.float()  # (B, 4): implicit rewards (chosen, rejected), policy log-probs (chosen, rejected)
        rewards, logps = scores[:, :2], scores[:, 2:]
        self.pairs += int(count)
        self.loss_sum += float(loss_sum)  # summed over the batch's pairs
        self.correct += int((rewards[:, 0] > rewards[:, 1]).sum())
        self.logp_correct += int((logps[:, 0] > logps[:, 1]).sum())
        self.chosen_sum += float(rewards[:, 0].sum())
        self.rejected_sum += float(rewards[:, 1].sum())
        self.chosen_logp_sum += float(logps[:, 0].sum())
        chosen_rows = labels[: len(scores), 1:]  # (B, T-1): the chosen rows come first (collate)
        self.chosen_tokens += int((chosen_rows != IGNORE).sum())

    def compute(self) -> dict:
        n = max(self.pairs, 1)
        chosen, rejected = self.chosen_sum / n, self.rejected_sum / n
        return {"loss": round(self.loss_sum / n, 6), "reward_accuracy": round(self.correct / n, 4),
                "reward_margin": round(chosen - rejected, 6), "chosen_reward": round(chosen, 6),
                "rejected_reward": round(rejected, 6), "logp_accuracy": round(self.logp_correct / n, 4),
                "chosen_nll": round(-self.chosen_logp_sum / max(self.chosen_tokens, 1), 6), "pairs": self.pairs}


class PreferenceOptions(TaskOptions):
    """Learn to prefer the chosen reply over the rejected one (prompt/chosen/rejected records) with DPO or SimPO, on a decoder LLM and its own LM head."""

    eval_before_default: ClassVar[bool] = True  # the before -> after change is the figure users want
    keeps_lm_head: ClassVar[bool] = True
    type: str = Field("preference", description=TYPE_DOC)
    chat_template: ChatTemplate = "auto"
    generation: Generation
    loss: Literal["dpo", "simpo"] = Field("dpo", description="preference: DPO (against the frozen reference model; with LoRA the base with adapters disabled) or SimPO (reference-free, length-normalised).")
    reference: Optional[str] = Field(None, description="preference, DPO: the reference model, when it is not the starting policy: a run directory (its final model, adapters merged, e.g. the SFT run the policy starts from) or a model directory/alias sharing the policy's tokenizer. Loaded once before training for its log-probs, then freed. Unset: the starting policy (LoRA: adapters disabled; full: the step-0 weights).")
    beta: float = Field(0.1, gt=0, description="preference: strength of the preference term (DPO's beta; SimPO uses 2.0-2.5 typically).")
    simpo_gamma: float = Field(0.5, ge=0, description="preference, SimPO: target reward margin (gamma/beta ratio as in the SimPO paper).")
    max_length: MaxLength = None

    default_metric: ClassVar[str] = "loss"

    def metric_names(self) -> list[str]:
        return ["loss", "reward_accuracy", "reward_margin", "logp_accuracy", "chosen_nll"]

    @property
    def reference_model(self) -> str | None:
        return self.reference if self.loss == "dpo" else None

    def check(self, recipe) -> None:
        refuse_encoder_alias(recipe, f"task.type {self.type} needs")
        if self.reference and self.loss != "dpo":
            raise ValueError(f"task.reference is DPO's reference model and task.loss is {self.loss}, which has none; "
                             "remove task.reference or set task.loss: dpo")


@register_task("preference", PreferenceOptions)
class PreferenceTask(CausalLMTask):
    """The causal-lm task's model, tokenizer and templates; pairs, losses and metrics of its own."""

    # task.reference: () -> (reference CausalLM, its tokenizer, what it is); set by floor 2
    # (run/build.py, run/artifact.py) when the options name a reference_model
    reference_source: Callable | None = None

    def __init__(self, recipe):
        super().__init__(recipe)
        self.loss = recipe.task.loss
        self.beta = recipe.task.beta
        self.gamma = recipe.task.simpo_gamma
        self.reference_info: dict = {}
        self._inline_ref: nn.Module | None = None  # `tuneforge eval` with task.reference: loaded once

    # -- data ----------------------------------------------------------------------------
    def read(self, split: str, path: str, *, limit: int | None, skipped: list, log=None) -> list:
        from ..llm.formats import read_lm_records

        data = self.recipe.data
        return read_lm_records(path, limit=limit, on_bad_record=data.on_bad_record, skipped=skipped,
                               encoding=data.encoding, preference=True, log=log)

    def _encode(self, prompt: list[dict], reply: list[dict]) -> tuple[list[int], list[int]]:
        """Prompt + reply -> ids and labels, loss on the reply's assistant turns only (not on
        assistant turns inside a multi-turn prompt)."""
        rendered = self.template.render(prompt + reply, "completion")
        skip = sum(m["role"] == "assistant" for m in prompt)
        return self.template.encode(Rendered(rendered.text, rendered.spans[skip:]))

    def dataset(self, records: list[Record], labels, split: str) -> PreferencePairs:
        if self.template is None:
            # string fields are prompt/completion data (raw concatenation under `auto`), message lists are chat
            self.build_template("chat" if any(r.values.get("chat") for r in records) else "prompt-completion")
        pairs, where, cut, dropped = [], [], 0, 0
        for r in records:
            pair, truncated = {}, False
            for side in SIDES:
                ids, labels_ = self._encode(r.values["prompt"], r.values[side])
                if len(ids) > self.max_length:  # keep the prompt's start: cut the end
                    ids, labels_, truncated = ids[: self.max_length], labels_[: self.max_length], True
                pair[side] = (ids, labels_)
            cut += truncated
            if any(all(x == IGNORE for x in pair[side][1][1:]) for side in SIDES):
                dropped += 1  # a reply cut away entirely: nothing to compare
                continue
            pairs.append(pair)
            where.append(r.where)
        self.truncated[split], self.dropped[split] = cut, dropped
        if not pairs:
            raise TuneforgeError(f"no {split} pair keeps a token of both replies within task.max_length = "
                                 f"{self.max_length} (prompts too long?); raise task.max_length or shorten the prompts")
        return PreferencePairs(pairs, where)

    def collate(self, items: list[dict]) -> dict:
        """B pairs -> 2B padded rows: the chosen replies, then the rejected ones."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = [it[side] for side in SIDES for it in items]
        longest = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)  # (2B, T)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)  # (2B, T)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (2B, T)
        for row, (row_ids, row_labels) in enumerate(rows):
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
            labels[row, : len(row_ids)] = torch.tensor(row_labels)
            mask[row, : len(row_ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "index": torch.tensor([it["index"] for it in items]), "num_examples": len(items)}
        if "reference" in items[0]:
            batch["reference"] = torch.stack([it["reference"] for it in items])  # (B, 2)
        return batch

    # -- the reference model -------------------------------------------------------------
    def before_training(self, model: nn.Module, datasets: dict, device, autocast, run_dir: Path, log) -> None:
        self.prepare_reference(model, datasets, device, autocast, run_dir, log)

    def prepare_reference(self, model: nn.Module, datasets: dict, device, autocast, run_dir: Path, log) -> None:
        """DPO: the reference log-probs of every pair of every split, computed once before the
        first step (or reused from ``run_dir``), stored in the datasets. Must run before any
        trained weights are loaded: for non-peft strategies the model *is* the reference now,
        unless ``task.reference`` names a separate one (loaded here, used, freed)."""
        if self.loss != "dpo":
            return
        t0 = time.perf_counter()
        separate = what = ref = None
        if self.recipe.task.reference:
            separate, what = self._load_reference(device)
        try:
            settings = {"precision": self.recipe.train.precision, "device": device.type, "template": self.template_name,
                        "max_length": self.max_length}
            parts = [reference_digest(separate if separate is not None else model), json.dumps(settings, sort_keys=True)]
            parts += [f"{split}:{dataset.digest()}" for split, dataset in sorted(datasets.items())]
            key = hashlib.sha256("|".join(parts).encode()).hexdigest()
            path = Path(run_dir) / REFERENCE_FILE
            cached = _read_reference(path, key)
            if cached is not None and set(cached) == set(datasets):
                for split, dataset in datasets.items():
                    dataset.reference = cached[split]
                self.reference_info = {"file": REFERENCE_FILE, "reused": True, "model": what or "the starting policy",
                                       "scores": {split: reference_scores(d) for split, d in datasets.items()}}
                log(f"reference log-probs reused from {path}")
                return
            with (contextlib.nullcontext(separate) if separate is not None else reference_model(model)) as ref, \
                    torch.no_grad():
                for split, dataset in datasets.items():
                    dataset.reference = self._reference_logps(ref, dataset, device, autocast)
        finally:
            if separate is not None:  # freed before the policy trains: only its log-probs are kept
                separate = ref = None
                gc.collect()
        from safetensors.torch import save_file

        save_file({s: d.reference for s, d in datasets.items()}, str(path), metadata={"key": key})
        seconds = round(time.perf_counter() - t0, 2)
        how = what or ("the base model with adapters disabled" if hasattr(model, "disable_adapter")
                       else "the initial weights")
        scores = {split: reference_scores(dataset) for split, dataset in datasets.items()}
        self.reference_info = {"file": REFERENCE_FILE, "reused": False, "seconds": seconds, "model": how,
                               "scores": scores}
        log(f"reference log-probs: {sum(len(d) for d in datasets.values())} pairs with {how} in {seconds}s "
            f"(cached in {path.name})" + ("; the reference model is freed" if what else ""))
        if "validation" in scores:  # "before" for the policy when it starts as the reference (DPO's rewards are 0)
            log("reference on the validation pairs: " + ", ".join(f"{k} {v}" for k, v in scores["validation"].items()))

    def _load_reference(self, device) -> tuple[nn.Module, str]:
        """``task.reference`` loaded (by floor 2's ``reference_source``), checked to read the same
        token ids as the policy, on ``device`` in eval mode; -> (model, what it is)."""
        spec = self.recipe.task.reference
        if self.reference_source is None:
            raise TuneforgeError(f"task.reference {spec!r} is set but nothing loads it here; a preference run loads "
                                 "it through tuneforge.run (finetune, or load_model_dir for a saved run)")
        ref, tokenizer, what = self.reference_source()
        check_same_tokenizer(tokenizer, self.tokenizer, ref, f"task.reference {spec!r}")
        ref.to(device).eval()
        return ref, what

    def _reference_logps(self, model, dataset: PreferencePairs, device, autocast) -> torch.Tensor:
        out = torch.empty((len(dataset), 2))  # (N, 2)
        batch_size = self.recipe.train.eval_batch_size
        for batch in self.loader(dataset, batch_size, train=False, seed=0):
            with autocast():
                logps, _ = sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                          batch["labels"].to(device))  # (2B,)
            out[batch["index"]] = logps.float().cpu().view(2, -1).T  # (B, 2)
        return out

    # -- training --------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> dict:
        """-> the loss summed over the B pairs, and the pairs' implicit rewards (B, 2) as ``logits``
        (what the metrics read)."""
        logps, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])  # (2B,)
        chosen, rejected = logps.view(2, -1)  # (B,), (B,)
        if self.loss == "simpo":
            n_chosen, n_rejected = counts.view(2, -1).clamp(min=1)
            rewards = self.beta * torch.stack([chosen / n_chosen, rejected / n_rejected], 1)  # (B, 2)
            loss_sum = -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - self.beta * self.gamma).sum()
        else:
            reference = batch.get("reference")
            if reference is None:
                reference = self._inline_reference(model, batch)
            rewards = self.beta * (torch.stack([chosen, rejected], 1) - reference.to(chosen.dtype))  # (B, 2)
            loss_sum = -F.logsigmoid(rewards[:, 0] - rewards[:, 1]).sum()
        logps = torch.stack([chosen, rejected], 1).detach()  # (B, 2): the policy's own scores
        return {"loss_sum": loss_sum, "count": len(chosen), "logits": torch.cat([rewards.detach(), logps], 1),
                "logps": logps}

    def _inline_reference(self, model, batch) -> torch.Tensor:
        """Evaluating a saved run on new data (`tuneforge eval`): no cache exists for it."""
        if self.recipe.task.reference:  # the separate reference, loaded once for the whole evaluation
            if self._inline_ref is None:
                self._inline_ref, _ = self._load_reference(batch["input_ids"].device)
            with torch.no_grad():
                logps, _ = sequence_logps(self._inline_ref, batch["input_ids"], batch["attention_mask"],
                                          batch["labels"])
            return logps.view(2, -1).T  # (B, 2)
        if not hasattr(model, "disable_adapter"):
            raise TuneforgeError(
                "DPO needs the reference model's log-probs of these pairs and this model has no adapters to "
                "disable (its base weights were trained); evaluate a LoRA/IA3 run, or train with task.loss: simpo")
        with reference_model(model), torch.no_grad():
            logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return logps.view(2, -1).T  # (B, 2)

    def metrics(self, labels=None) -> PreferenceMetrics:
        return PreferenceMetrics()

    def settings(self) -> dict:
        return {"max_length": self.max_length, "chat_template": self.template_name, "loss": self.loss,
                "beta": self.beta, **({"simpo_gamma": self.gamma} if self.loss == "simpo" else {}),
                "reference": dict(self.reference_info), "truncated": dict(self.truncated),
                "dropped_no_target": dict(self.dropped)}

    # -- after training --------------------------------------------------------------------
    def after_training(self, model, splits: dict, run, device, autocast, log) -> dict:
        """Generation on held-out prompts, scored against the chosen replies."""
        from ..llm.generation import evaluate_generation

        gen = self.recipe.task.generation
        records = [Record({"format": "chat", "messages": r.values["prompt"] + r.values["chosen"]}, r.where)
                   for r in splits.get("validation", [])[: gen.eval_prompts]]
        if not records:
            return {}
        return evaluate_generation(model, self, records, run.path / "generations.jsonl", device, autocast, gen,
                                   seed=self.recipe.train.seed, log=log)
