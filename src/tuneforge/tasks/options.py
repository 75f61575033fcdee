"""The base of every task's options, the task registry, and the rules between a task and
the rest of a recipe.

Each task module defines its options (a ``TaskOptions`` subclass holding exactly the
``task:`` keys it reads) and registers them with its task class::

    @register_task("text-classification", TextClassificationOptions)
    class TextClassification: ...

``task.type`` then selects the options class when a recipe is validated, and an option of
another task is an unknown key. Light on purpose (no torch): the recipe schema imports it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import Field

from ..errors import TuneforgeError
from ..schema import Section, check_registration

DEFAULT_TASK = "text-classification"
# Stands for the registered task names; replaced when the docs are rendered (``recipe.describe_fields``).
TASK_NAMES = "<tasks>"
TYPE_DOC = f"What the model learns to do: {TASK_NAMES} (see the Tasks section)."

# name -> (options class, task class); filled by @register_task as the task modules are imported
registry: dict[str, tuple[type, type]] = {}


class TaskOptions(Section):
    """Base of every task's options. The class attributes and properties below are the facts the
    recipe may ask of a task without building it (nothing compares a task's name)."""

    type: str = Field(DEFAULT_TASK, description=TYPE_DOC)

    # the input modality: which models (aliases) and strategies (StrategyOptions.modalities) fit
    modality: ClassVar[str] = "text"
    # train.metric_for_best when the recipe leaves it unset
    default_metric: ClassVar[str] = "loss"
    # train.eval_before when the recipe leaves it unset: on where the change from the starting
    # weights is the figure to see (causal-lm, preference); a classifier's new head starts at chance
    eval_before_default: ClassVar[bool] = False
    # the model keeps its own language-model head and learns nothing new on top (causal-lm,
    # preference, grpo): no task head, whatever the other options say
    keeps_lm_head: ClassVar[bool] = False

    @property
    def task_has_head(self) -> bool:
        """The model gets a new task head; strategies that need one (``needs_task_head``) are refused otherwise."""
        return not self.keeps_lm_head

    @property
    def no_head_reason(self) -> str:
        """Says, in an error, what the task has instead of a task head."""
        if self.keeps_lm_head:
            return f"a {self.type} run keeps the model's own LM head (nothing new is learned on top)"
        return f"a {self.type} model has none"

    def metric_names(self) -> list[str]:
        """The scalar validation metrics a run of this task reports: valid ``train.metric_for_best`` values."""
        return ["loss"]

    @property
    def metric_kind(self) -> str:
        """Names the metric set in errors: "'x' is not a <kind> validation metric"."""
        return self.type

    @property
    def reference_model(self) -> str | None:
        """A separate model the task reads before training (DPO's ``task.reference``): floor 2
        loads it (a run directory or a model) and hands the task a loader, ``reference_source``;
        tasks cannot load saved runs themselves (that is ``run/artifact.py``'s)."""
        return None

    def check(self, recipe) -> None:
        """The task's own rules across recipe sections; raise ValueError naming the fix."""


def register_task(name: str, options_cls: type):
    """Class decorator: ``@register_task("causal-lm", CausalLMOptions)``. Rejects a name already
    taken, a name that is not lowercase words joined by '-', and options whose ``type`` does not
    default to the name (a dumped recipe must select the same task again)."""

    def wrap(cls):
        if not (isinstance(options_cls, type) and issubclass(options_cls, TaskOptions)):
            raise TypeError(f"task '{name}': the options class must subclass TaskOptions, got {options_cls!r}")
        check_registration("task", name, options_cls, "type", registry, (options_cls, cls))
        registry[name] = (options_cls, cls)
        cls.type = name
        return cls

    return wrap


def unregister_task(name: str) -> None:
    """Remove a registered task (tests that register a throw-away one)."""
    registry.pop(name, None)


# --------------------------------------------------------------------------- fields several tasks declare

class GenerationSection(Section):
    eval_prompts: int = Field(32, ge=0, description="causal-lm: after training (and before it, with train.eval_before), answer up to this many validation prompts (this many of each group with group_by) and report exact match, ROUGE-L and BLEU against the reference replies (samples written to generations.jsonl); 0 turns it off.")
    group_by: Optional[str] = Field(None, description="causal-lm: a key of the JSON/JSONL data records (e.g. source) whose value names each record's group; the generation scores are reported per group as well as overall, with up to eval_prompts prompts of each group (a verifiable skill mixed into general data gets its own exact match). Records without the key are in group 'other'.")
    max_new_tokens: int = Field(64, ge=1, description="Longest reply generated (evaluation, `tuneforge generate` and `chat`).")
    sampled: bool = Field(True, description="Also evaluate one sampled reply per prompt (temperature/top_p) besides the greedy one.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling: sample from the smallest set of tokens holding this probability.")


# One definition each, so the tasks that share a knob share its constraints and its doc.
MaxLength = Annotated[Optional[int], Field(ge=8, description="Maximum tokens per text (longer texts are truncated); default: the model's limit, capped at 512.")]
HeadDropout = Annotated[float, Field(ge=0.0, lt=1.0, description="Dropout before the classification head.")]
ChatTemplate = Annotated[Literal["auto", "tokenizer", "chatml", "llama", "none"], Field(description="How conversations become text: the tokenizer's own template, ChatML, Llama-2 chat, or none (texts concatenated; EOS after each reply). auto: the tokenizer's template for chat data when it has one, else chatml; none for prompt-completion, alpaca and text.")]
Generation = Annotated[GenerationSection, Field(default_factory=GenerationSection, description="Generation settings (evaluation after training, `tuneforge generate`, `tuneforge chat`).")]


# --------------------------------------------------------------------------- rules shared by every task

def refuse_encoder_alias(recipe, needs: str, otherwise: str = "") -> None:
    """Refuse an encoder alias (text or image) where a decoder LM is needed; the LLM aliases
    (``Alias.kind == "causal-lm"``) pass. ``needs`` ends "... but <needs> a decoder language model";
    ``otherwise`` offers another way."""
    from ..models.aliases import ALIASES

    alias = ALIASES.get(recipe.model.name)
    if alias is not None and not alias.is_llm:
        llms = ", ".join(n for n, a in ALIASES.items() if a.is_llm)
        raise ValueError(
            f"model '{recipe.model.name}' is a {alias.modality} encoder, but {needs} a decoder language model: "
            f"set model.name to an LLM alias ({llms}), a local .gguf file or a local Hugging Face directory of a "
            f"Llama, Qwen, GPT-2 (or similar) model{otherwise}")


def check_task_fit(recipe) -> None:
    """Does the task fit the model and the strategy? Read from declared facts only: the task's
    ``modality`` and ``task_has_head``, the strategy's ``needs_task_head`` and ``modalities``."""
    from ..models.aliases import ALIASES
    from ..strategies import strategies_where, strategy_class

    task, strategy = recipe.task, recipe.strategy
    wanted = type(task).modality
    if not task.task_has_head and strategy_class(strategy.name).needs_task_head:
        others = strategies_where(lambda c: not c.needs_task_head and not c.chooses, wanted)
        raise ValueError(f"strategy {strategy.name} trains or schedules a new task head, and {task.no_head_reason} "
                         f"— use {_one_of(others)}")
    alias = ALIASES.get(recipe.model.name)
    if alias is not None and alias.modality != wanted:
        others = [n for n, a in ALIASES.items() if a.modality == wanted]
        article = "an" if wanted[:1] in "aeiou" else "a"
        example = f" (e.g. {', '.join(others)})" if others else ""
        raise ValueError(f"model '{recipe.model.name}' is a {alias.modality} model but task.type is {task.type}; "
                         f"use {article} {wanted} model{example} or change task.type")
    if wanted not in type(strategy).modalities:
        raise ValueError(
            f"strategy {strategy.name} works on {' and '.join(type(strategy).modalities)} models only, but "
            f"task.type is {task.type}; for {wanted} models use {_one_of(strategies_where(lambda c: True, wanted))}")


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# --------------------------------------------------------------------------- saved runs

def task_block_from_saved(block: Any) -> Any:
    """The ``task:`` block of a recipe saved by a run (``config.yaml``, ``tuneforge.json``), in
    today's shape. Runs written before each task owned its options saved every task's fields
    (with defaults); the fields the selected task does not declare are dropped. Only for blocks
    read from a run: in a user's recipe such a key is an error."""
    if not isinstance(block, dict):
        return block
    from . import task_options_class

    try:
        fields = task_options_class(str(block.get("type", DEFAULT_TASK))).model_fields
    except TuneforgeError:
        return block  # an unknown type: validation reports it
    return {k: v for k, v in block.items() if k in fields}
