"""`grpo`: online RL with verifiable rewards, Group Relative Policy Optimization (Shao et al. 2024,
DeepSeekMath §4.1).

Every training micro-batch of B prompts is one rollout and one update (``forward``):

1. sample a group of G = ``task.group_size`` completions per prompt (temperature / top-p, KV
   cache: ``llm.generation.generate_ids``, the B*G rows in one batch, the model in eval mode);
2. score each completion with the weighted rewards (``llm.rewards``): r, (B, G);
3. group-normalised advantages A = (r - mean_g r) / (std_g r + eps), the same A for every token
   of a completion (``task.scale_rewards: false`` keeps r - mean only, as Dr. GRPO argues: Liu
   et al. 2025, the std division over-weights groups that are almost all right or all wrong);
4. the loss on completion tokens: ``-ratio * A + beta * KL``, with the per-token KL to the
   reference by the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (Schulman 2020;
   DeepSeekMath eq. 4), summed over tokens and averaged over all completion tokens of the step
   (``loss_aggregation: token``, DAPO's choice) or per completion first (``sequence``, the
   paper's 1/|o_i|).

One optimizer update per rollout: the policy that sampled is the one being updated, so the PPO
ratio pi/pi_old is exactly 1 (``exp(logp - logp.detach())``: value 1, gradient grad logp) and
clipping it would change nothing. Several updates per rollout (where clipping matters) are not
offered: the engine's loop takes one step per batch, and on a CPU the rollout is most of a step.

The reference (only with ``beta > 0``): with a peft strategy (LoRA, IA3) the policy with its
adapters disabled (no copy, no memory); with any other strategy a frozen copy of the starting
weights made before the first step (the model's size again in memory: 0.5 GB for SmolLM2-135M in
fp32); or ``task.reference``: a Hugging Face model directory or a run whose model is saved whole.

Evaluation (under inference mode, ``forward`` without gradients): one greedy completion per
held-out prompt (``eval_sampling: sampled``: one sampled with a seed fixed per prompt), its
rewards (mean and per reward: ``reward_exact_match`` is the fraction correct), the KL to the
reference and the completion length. ``baseline_eval`` measures the same before the first step.

What the engine's counters mean here: ``examples`` are completions (B*G per micro-batch),
``tokens`` the prompt tokens of the batch (its attention mask; counted before the completions
exist); the completions' tokens, the rollout time and the update time are this task's own
figures, in the ``rollout`` lines of metrics.jsonl, the log, the manifest (``task_settings``)
and eval.json (``generation``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.batching import EpochBatchSampler
from ..data.records import Record
from ..errors import TuneforgeError
from ..llm.model import CausalLM, core_model
from ..llm.policy import eval_mode, group_advantages, k3_kl, sequences, token_logps, token_loss
from ..llm.rewards import TYPES, build_rewards, check_function_spec, reward_names
from ..schema import Section
from .causal_lm import CausalLMTask
from .grpo_log import GrpoMetrics, RolloutLog, RolloutStats
from .options import TYPE_DOC, ChatTemplate, MaxLength, TaskOptions, refuse_encoder_alias, register_task

BEFORE_FILE = "grpo_before.json"


# --------------------------------------------------------------------------- options

class RewardSpec(Section):
    type: Literal[TYPES] = Field("exact_match", description="grpo reward: exact_match (the answer extracted by pattern equals the record's field; numbers by value), regex (1 if pattern occurs), format (1 if the whole completion matches pattern), length_penalty (0 down to -1 beyond free_tokens), function (your own module:function from task.reward_paths).")
    weight: float = Field(1.0, description="grpo reward: its weight in the completion's reward (the weighted sum of all rewards); negative weights penalise.")
    name: Optional[str] = Field(None, description="grpo reward: the name of its metrics (reward_<name>); default the type, or the function's name.")
    pattern: Optional[str] = Field(None, description="grpo reward: Python regex. exact_match: its last match in the completion is the answer (group 1 when it has one; unset: the whole completion); regex: searched; format: matched against the whole stripped completion.")
    field: str = Field("answer", description="grpo reward exact_match: the record field holding the reference answer.")
    function: Optional[str] = Field(None, description="grpo reward function: 'module:function', where module.py is a file listed in task.reward_paths; called as function(completion: str, record: dict) -> float. This runs your code.")
    free_tokens: int = Field(0, ge=0, description="grpo reward length_penalty: completions up to this many tokens cost nothing; beyond, the penalty grows linearly to -1 at task.max_new_tokens.")

    @model_validator(mode="after")
    def _needs(self) -> "RewardSpec":
        if self.type in ("regex", "format") and not self.pattern:
            raise ValueError(f"reward type {self.type} needs a pattern (a Python regex), e.g. pattern: 'Answer: \\d+'")
        if self.type == "function" and not self.function:
            raise ValueError("reward type function needs function: 'module:function' (module.py listed in "
                             "task.reward_paths)")
        if self.type != "function" and self.function:
            raise ValueError(f"function is for rewards of type function, not {self.type}")
        return self


class GrpoOptions(TaskOptions):
    """Online RL with verifiable rewards (GRPO): sample a group of completions per prompt, score them with rewards (exact match, regex, format, length, your own functions), and raise the reward of the better ones in each group, with a KL penalty to the reference model."""

    # task.baseline_eval measures the starting weights (rewards, cached for resume); the generic step-0
    # evaluation (train.eval_before) would generate the same held-out answers again
    eval_before_default: ClassVar[bool] = False
    keeps_lm_head: ClassVar[bool] = True
    type: str = Field("grpo", description=TYPE_DOC)
    chat_template: ChatTemplate = "auto"
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(type="exact_match")], min_length=1, description="grpo: the rewards, each {type, weight, ...}; a completion's reward is their weighted sum.")
    reward_paths: list[str] = Field(default_factory=list, description="grpo: Python files that rewards of type function may come from (relative to the recipe's folder). Only these files are ever imported for rewards, and importing them executes them.")
    group_size: int = Field(4, ge=2, description="grpo: completions sampled per prompt (G); advantages compare the completions of one prompt.")
    max_new_tokens: int = Field(64, ge=1, description="grpo: longest completion sampled (training and evaluation).")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the training completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="grpo: nucleus sampling of the training completions (1: the whole distribution).")
    beta: float = Field(0.04, ge=0, description="grpo: weight of the KL penalty to the reference model (DeepSeekMath used 0.04); 0 needs no reference and skips its forward pass.")
    scale_rewards: bool = Field(True, description="grpo: divide each group's centred rewards by their standard deviation (GRPO); false keeps r - mean only (Dr. GRPO).")
    loss_aggregation: Literal["token", "sequence"] = Field("token", description="grpo: average the loss over all completion tokens of the step (token, as DAPO) or over each completion's tokens first, then over completions (sequence, the GRPO paper).")
    reference: Optional[str] = Field(None, description="grpo: the reference model for the KL penalty: a Hugging Face model directory, or a run whose model is saved whole (full fine-tuning, or output.merge: true); default the starting weights (peft: the base with adapters disabled).")
    eval_sampling: Literal["greedy", "sampled"] = Field("greedy", description="grpo: held-out completions for evaluation: greedy, or sampled (temperature/top_p) with a seed fixed per prompt, so evaluations compare.")
    baseline_eval: bool = Field(True, description="grpo: evaluate the held-out rewards with the starting weights before the first step (the 'before' figures).")
    eval_samples: int = Field(16, ge=0, description="grpo: after training, write this many held-out prompts with their completions and rewards to generations.jsonl.")
    max_length: MaxLength = None

    default_metric: ClassVar[str] = "reward"

    @field_validator("reward_paths")
    @classmethod
    def _resolve(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        base = (info.context or {}).get("recipe_dir")
        return [str((Path(base) / p) if base and not Path(p).is_absolute() else Path(p).absolute()) for p in paths]

    def metric_names(self) -> list[str]:
        return ["reward"] + [f"reward_{n}" for n in reward_names(self.rewards)] + [
            "kl", "completion_tokens", "stopped"]

    def check(self, recipe) -> None:
        refuse_encoder_alias(recipe, f"task.type {self.type} needs")
        for i, spec in enumerate(self.rewards):
            if spec.type == "function":
                try:
                    # names only: the files are read when the data is (train, validate, eval), not to generate
                    check_function_spec(spec.function, self.reward_paths, f"task.rewards[{i}]", must_exist=False)
                except TuneforgeError as err:
                    raise ValueError(str(err)) from None
            if spec.type == "length_penalty" and spec.free_tokens >= self.max_new_tokens:
                raise ValueError(f"task.rewards[{i}]: free_tokens {spec.free_tokens} leaves no completion to "
                                 f"penalise (task.max_new_tokens is {self.max_new_tokens}); lower free_tokens")
        if self.reference and not Path(self.reference).exists():
            raise ValueError(f"task.reference '{self.reference}' does not exist (relative paths start at the "
                             "current directory)")


# --------------------------------------------------------------------------- data

class Prompts(Dataset):
    """Tokenised prompts, and the records their rewards read."""

    def __init__(self, rows: list[dict], where: list[str], fields: list[dict]):
        self.rows, self.where, self.fields = rows, where, fields

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "index": i}

    @property
    def lengths(self) -> list[int]:
        return [len(r["prompt_ids"]) for r in self.rows]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([r["prompt_ids"] for r in self.rows]).encode()).hexdigest()


def read_prompts(path: str, *, limit: int | None, on_bad_record: str, skipped: list, encoding: str,
                 fields_needed: dict[str, str]) -> list[Record]:
    """JSONL/JSON rows with ``prompt`` (a string: one user turn) or ``messages`` (the conversation
    so far; a last assistant turn is dropped), and every field a reward reads. ``values``:
    ``messages`` and ``fields`` (the whole row, what reward functions get)."""
    from ..llm.formats import _json_rows, _Bad, check_messages

    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise TuneforgeError(f"{path}: grpo data must be .jsonl (one JSON object per line) or .json (an array of "
                             f"objects) with a 'prompt' string or 'messages' list per record; got '{path.suffix}'")
    out = []
    for where, obj in _json_rows(path, encoding):
        if limit and len(out) >= limit:
            break
        try:
            if isinstance(obj, _Bad):
                raise TuneforgeError(f"{where}: {obj.why}")
            if not isinstance(obj, dict):
                raise TuneforgeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if isinstance(obj.get("messages"), list):
                messages = check_messages(obj["messages"], where)
                if messages[-1]["role"] == "assistant":
                    messages = messages[:-1]
                if not messages or messages[-1]["role"] != "user":
                    raise TuneforgeError(f"{where}: the conversation must end with a user message (the prompt)")
            elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
                messages = [{"role": "user", "content": obj["prompt"]}]
            else:
                raise TuneforgeError(f"{where}: a grpo record needs 'prompt' (a non-empty string) or 'messages' "
                                     f"(a list of {{role, content}}); keys: {', '.join(list(obj)[:8]) or 'none'}")
            for field, reward in fields_needed.items():
                if field not in obj:
                    raise TuneforgeError(f"{where}: reward {reward} compares with the field '{field}', which this "
                                         f"record lacks (keys: {', '.join(list(obj)[:8])}); add it, or set the "
                                         "reward's field")
        except TuneforgeError as err:
            if on_bad_record == "skip":
                skipped.append(str(err))
                continue
            raise TuneforgeError(f"{err} (or set data.on_bad_record: skip to leave such records out)") from None
        out.append(Record({"messages": messages, "fields": obj}, where))
    return out


# --------------------------------------------------------------------------- the task

@register_task("grpo", GrpoOptions)
class GrpoTask(CausalLMTask):
    """The causal-lm task's model, tokenizer and templates; prompts, rollouts, rewards and the
    GRPO loss of its own."""

    def __init__(self, recipe):
        super().__init__(recipe)
        self.opts = recipe.task
        self.reward_names = reward_names(self.opts.rewards)
        self._rewards = None  # built (user files executed) when data is read, not when a saved run loads
        self.stats = RolloutStats(self.reward_names)
        self.reference: nn.Module | None = None
        self.reference_kind = "none"
        self.before: dict | None = None
        self.last_eval: dict | None = None

    @property
    def rewards(self):
        if self._rewards is None:
            self._rewards = build_rewards(self.opts.rewards, self.opts.reward_paths, self.opts.max_new_tokens)
        return self._rewards

    # -- data ----------------------------------------------------------------------------
    def read(self, split: str, path: str, *, limit: int | None, skipped: list, log=None) -> list:
        data = self.recipe.data
        needed = {r.field: r.origin for r in self.rewards if r.field}
        return read_prompts(path, limit=limit, on_bad_record=data.on_bad_record, skipped=skipped,
                            encoding=data.encoding, fields_needed=needed)

    def dataset(self, records: list, labels, split: str) -> Prompts:
        if self.template is None:
            self.build_template("chat")  # a prompt string is a user turn: the chat template (auto) applies
        rows, where, fields, dropped = [], [], [], 0
        for r in records:
            text = self.template.prompt(r.values["messages"])
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_length:  # a cut prompt asks another question: leave it out
                dropped += 1
                continue
            rows.append({"prompt_ids": ids})
            where.append(r.where)
            fields.append(r.values["fields"])
        self.truncated[split], self.dropped[split] = 0, dropped
        if not rows:
            raise TuneforgeError(f"every {split} prompt is longer than task.max_length = {self.max_length} tokens; "
                                 "raise task.max_length or shorten the prompts")
        return Prompts(rows, where, fields)

    def collate(self, items: list[dict], dataset: Prompts | None = None, train: bool = False) -> dict:
        """B prompts: left-padded ids and mask (what the engine counts as tokens), the prompts' ids
        and records; ``num_examples`` is what a training step learns from: B*G completions."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(len(it["prompt_ids"]) for it in items)
        ids = torch.full((len(items), longest), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(items), longest), dtype=torch.long)  # (B, T)
        for row, it in enumerate(items):
            n = len(it["prompt_ids"])
            ids[row, longest - n:] = torch.tensor(it["prompt_ids"])
            mask[row, longest - n:] = 1
        index = torch.tensor([it["index"] for it in items])
        return {"input_ids": ids, "attention_mask": mask, "index": index, "labels": index,
                "prompt_ids": [it["prompt_ids"] for it in items],
                "fields": [dataset.fields[i] for i in index.tolist()] if dataset is not None else [{}] * len(items),
                "where": [dataset.where[i] for i in index.tolist()] if dataset is not None else [""] * len(items),
                "num_examples": len(items) * (self.opts.group_size if train else 1)}

    def loader(self, dataset: Prompts, batch_size: int, *, train: bool, seed: int) -> DataLoader:
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, lengths=dataset.lengths,
                                    group_by_length=self.recipe.train.group_by_length)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=0,
                          collate_fn=lambda items: self.collate(items, dataset, train),
                          generator=torch.Generator().manual_seed(seed))

    # -- rollouts and rewards --------------------------------------------------------------
    def _sample(self, model, prompts: list[list[int]], *, greedy: bool, generator) -> tuple[list, list[str]]:
        from ..llm.generation import generate_ids, strip_reply

        core = core_model(model)
        stop = set(self.template.stop_ids()) | {self.tokenizer.eos_token_id}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(core.parameters()).device
        with eval_mode(model):
            ids = generate_ids(core, prompts, max_new_tokens=self.opts.max_new_tokens, stop_ids=stop, greedy=greedy,
                               temperature=self.opts.temperature, top_p=self.opts.top_p, generator=generator,
                               device=device, pad_id=pad)
        texts = [strip_reply(self.tokenizer.decode(c[:-1] if c and c[-1] in stop else c, skip_special_tokens=True),
                             self.tokenizer) for c in ids]
        return ids, texts

    def score(self, texts: list[str], ids: list[list[int]], fields: list[dict], wheres: list[str]) -> torch.Tensor:
        """(R, len(rewards)) unweighted rewards of each completion."""
        tokens = [len(c) for c in ids]
        return torch.tensor([r.score(texts, tokens, fields, wheres) for r in self.rewards],
                            dtype=torch.float32).T.reshape(len(texts), len(self.rewards))

    def _reference_logps(self, model, ids, mask, labels) -> torch.Tensor:
        with torch.no_grad(), eval_mode(model):
            if self.reference_kind == "adapters disabled":
                with model.disable_adapter():
                    return token_logps(core_model(model), ids, mask, labels)[0]
            return token_logps(self.reference, ids, mask, labels)[0]

    # -- training and evaluation -------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict) -> dict:
        """Training (gradients on): one rollout of B*G completions and the GRPO loss summed over
        completion tokens (``count``: their number; ``sequence``: the completions). Evaluation
        (inference mode): one completion per prompt, scored (``logits``: what GrpoMetrics reads)."""
        if not torch.is_grad_enabled():
            return self._evaluate(model, batch)
        o, G = self.opts, self.opts.group_size
        t0 = time.perf_counter()
        # The sampling seed is drawn from torch's global generator, which every resumable
        # checkpoint saves: a resumed run samples the same completions as an uninterrupted one.
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        prompts = [p for p in batch["prompt_ids"] for _ in range(G)]  # (B*G) prompts, groups adjacent
        ids, texts = self._sample(model, prompts, greedy=False, generator=generator)
        fields = [f for f in batch["fields"] for _ in range(G)]
        wheres = [w for w in batch["where"] for _ in range(G)]
        each = self.score(texts, ids, fields, wheres)  # (B*G, R)
        total = each @ torch.tensor([r.weight for r in self.rewards])  # (B*G,)
        grouped = total.view(-1, G)  # (B, G)
        advantages = group_advantages(grouped, o.scale_rewards).view(-1)  # (B*G,)
        rollout_s = time.perf_counter() - t0

        device = batch["input_ids"].device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        seq_ids, seq_mask, seq_labels = sequences(prompts, ids, pad, device)  # (B*G, T)
        logp, rows = token_logps(core_model(model), seq_ids, seq_mask, seq_labels)  # (N,), (N,)
        ref, reference_s = None, 0.0
        if o.beta > 0:
            t1 = time.perf_counter()
            ref = self._reference_logps(model, seq_ids, seq_mask, seq_labels)  # (N,)
            reference_s = time.perf_counter() - t1
        loss, kl = token_loss(logp, advantages.to(logp.device)[rows], ref, o.beta)  # (N,), (N,)
        if o.loss_aggregation == "sequence":
            lengths = torch.bincount(rows, minlength=len(ids)).clamp(min=1)  # (B*G,)
            loss_sum = (torch.zeros(len(ids), device=loss.device).index_add(0, rows, loss) / lengths).sum()
            count = len(ids)
        else:
            loss_sum, count = loss.sum(), torch.tensor(len(logp), device=loss.device)
        stop = set(self.template.stop_ids()) | {self.tokenizer.eos_token_id}
        self.stats.add(total, each, int((grouped.std(1) == 0).sum()), len(grouped), [len(c) for c in ids],
                       sum(bool(c) and c[-1] in stop for c in ids), float(kl.detach().sum()) if kl is not None else None,
                       len(logp), rollout_s, reference_s)
        return {"loss_sum": loss_sum, "count": count, "logits": None}

    def _evaluate(self, model, batch: dict) -> dict:
        o = self.opts
        generator = None
        if o.eval_sampling == "sampled":  # a seed per batch's first prompt: the same draws at every evaluation
            generator = torch.Generator().manual_seed(self.recipe.train.seed * 1_000_003 + int(batch["index"][0]))
        ids, texts = self._sample(model, batch["prompt_ids"], greedy=o.eval_sampling == "greedy",
                                  generator=generator or torch.Generator().manual_seed(0))
        each = self.score(texts, ids, batch["fields"], batch["where"])  # (B, R)
        total = each @ torch.tensor([r.weight for r in self.rewards])  # (B,)
        kl = torch.full((len(ids),), float("nan"))
        if self.reference_kind != "none":
            device = batch["input_ids"].device
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            seq = sequences(batch["prompt_ids"], ids, pad, device)
            logp, rows = token_logps(core_model(model), *seq)
            per_token = k3_kl(logp, self._reference_logps(model, *seq)).float().cpu()
            rows = rows.cpu()
            kl = torch.zeros(len(ids)).index_add(0, rows, per_token) / torch.bincount(rows, minlength=len(ids))
        stop = set(self.template.stop_ids()) | {self.tokenizer.eos_token_id}
        stopped = torch.tensor([float(bool(c) and c[-1] in stop) for c in ids])
        logits = torch.cat([torch.stack([total, kl, torch.tensor([float(len(c)) for c in ids]), stopped], 1), each], 1)
        return {"loss_sum": torch.zeros(()), "count": len(ids), "logits": logits, "texts": texts}

    def metrics(self, labels=None) -> GrpoMetrics:
        return GrpoMetrics(self.reward_names, on_compute=self._remember)

    def _remember(self, result: dict) -> None:
        self.last_eval = result

    def callbacks(self, plan, log) -> list:
        return [RolloutLog(self, log)]

    # -- before and after training -----------------------------------------------------------
    def before_training(self, model, datasets: dict, device, autocast, run_dir, log) -> None:
        """The reference model (when beta > 0) and the baseline evaluation, with the starting weights."""
        self._build_reference(model, device, log)
        if self.opts.baseline_eval and "validation" in datasets:
            self.before = self._baseline(model, datasets["validation"], device, autocast, Path(run_dir), log)

    def _build_reference(self, model, device, log) -> None:
        from peft import PeftModel

        if self.opts.beta == 0:
            self.reference_kind = "none"
            log("grpo: beta 0, no reference model (no KL penalty, no KL figures)")
            return
        if self.opts.reference:
            self.reference = self._load_reference(Path(self.opts.reference)).to(device)
            self.reference_kind = f"loaded from {self.opts.reference}"
        elif isinstance(model, PeftModel):
            self.reference_kind = "adapters disabled"
        else:
            core = core_model(model)
            backbone, head = copy.deepcopy((core.backbone, core.lm_head))  # one copy: tied weights stay tied
            self.reference = CausalLM(backbone, head)
            self.reference_kind = "a frozen copy of the starting weights"
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
            size = sum(p.numel() * p.element_size() for p in {id(p): p for p in self.reference.parameters()}.values())
            log(f"grpo: reference model: {self.reference_kind} ({size / 2**20:.0f} MB more memory)")
        else:
            log("grpo: reference model: the policy with its adapters disabled (no copy)")

    def _load_reference(self, path: Path) -> CausalLM:
        from ..models import load_model

        directory = path
        meta_path = next((p for p in (path / "model" / "tuneforge.json", path / "tuneforge.json") if p.exists()), None)
        if meta_path is not None:
            meta = json.loads(meta_path.read_text())
            if meta.get("layout") != "hf-causal-lm":
                raise TuneforgeError(
                    f"task.reference {path}: that run's model is saved as {meta.get('layout')} (only what it trained, "
                    "on top of its base); a reference must be a whole model — train that run with output.merge: true, "
                    "or use a full fine-tuning run, or a Hugging Face model directory")
            directory = meta_path.parent / "backbone"
        loaded = load_model(str(directory), source="hf", causal_lm=True)
        reference = CausalLM(loaded.backbone, loaded.lm_head)
        if loaded.tokenizer is None or loaded.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise TuneforgeError(f"task.reference {path} has another tokenizer than model.name; the KL compares "
                                 "token log-probs, so both must share one vocabulary")
        return reference

    def _baseline(self, model, dataset: Prompts, device, autocast, run_dir: Path, log) -> dict:
        """The held-out figures of the starting weights; cached in the run (a resumed run reuses them)."""
        from ..engine.trainer import evaluate_loader

        key = hashlib.sha256(json.dumps([self.recipe.model.model_dump(mode="json"), self.opts.model_dump(mode="json"),
                                         self.recipe.train.precision, dataset.digest()]).encode()).hexdigest()
        path = run_dir / BEFORE_FILE
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                log(f"grpo: baseline evaluation reused from {path.name}")
                return saved["metrics"]
        except (OSError, ValueError):
            pass
        loader = self.loader(dataset, self.recipe.train.eval_batch_size, train=False, seed=self.recipe.train.seed)
        result = evaluate_loader(model, self, loader, self.metrics(), device, autocast)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "metrics": result}))
        tmp.replace(path)  # atomic: a crash leaves the old file or none
        log("grpo: before training, validation: " + _figures(result))
        return result

    def after_training(self, model, splits: dict, run, device, autocast, log) -> dict:
        """Held-out samples (generations.jsonl), before/after rewards and the rollout/update timings."""
        out = {"before_training": self.before, "after_training": self.last_eval, "timings": self.stats.summary(),
               "reference": self.reference_kind}
        if self.before and self.last_eval:
            log(f"grpo: validation reward {self.before['reward']:.4f} before training -> "
                f"{self.last_eval['reward']:.4f} after ("
                + ", ".join(f"{k} {self.before[k]:.3f} -> {self.last_eval[k]:.3f}" for k in self.last_eval
                            if k.startswith("reward_") and k in self.before) + ")")
        t = self.stats.summary()
        log(f"grpo: time in rollouts {t['rollout_s']:.1f}s, reference {t['reference_s']:.1f}s, updates "
            f"{t['update_s']:.1f}s ({t['completions']} completions, {t['completion_tokens']} tokens sampled)")
        records = splits.get("validation", [])[: self.opts.eval_samples]
        if records:
            dataset = self.dataset(records, None, "samples")
            path = run.path / "generations.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for batch in self.loader(dataset, self.recipe.train.eval_batch_size, train=False, seed=0):
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    with torch.inference_mode(), autocast():
                        result = self._evaluate(model, batch)
                    for i, text in enumerate(result["texts"]):
                        row = result["logits"][i].tolist()
                        f.write(json.dumps({"where": batch["where"][i], "prompt": self.tokenizer.decode(
                            batch["prompt_ids"][i]), "completion": text, "reward": row[0],
                            **{f"reward_{n}": v for n, v in zip(self.reward_names, row[4:])}}) + "\n")
            out["samples"] = {"file": path.name, "prompts": len(dataset)}
            self.truncated.pop("samples", None)
            self.dropped.pop("samples", None)
        return out

    def settings(self) -> dict:
        return {"max_length": self.max_length, "chat_template": self.template_name,
                "rewards": self.reward_names, "reference": self.reference_kind, "before_training": self.before,
                "rollout": self.stats.summary(), "dropped_too_long": dict(self.dropped)}


def _figures(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                     if k != "eval_seconds")


