"""The recipe: one typed, documented schema that is everything a run needs.

``defaults <- YAML <- --set overrides -> Recipe``. Unknown keys are errors that
suggest the nearest valid key (checked before pydantic so the message can say
``strategy.rnak`` -> ``strategy.rank``); wrong types and impossible
combinations are errors that say what to change. The resolved recipe is dumped
into every run directory, so a run can be repeated from its own folder.

Strategy options are owned by each strategy module (one method, one module,
one registration): ``strategy.name`` selects a registered options model and the
rest of the ``strategy:`` block is validated against it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TuneforgeError, suggest


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field("minilm-l6", description="Alias (see `tuneforge models`), local Hugging Face directory, cached hub name, or timm architecture.")
    source: Literal["auto", "alias", "hf", "timm"] = Field("auto", description="Where `name` comes from; `auto` tries alias, local directory, timm, then the local HF cache.")
    weights: Optional[str] = Field(None, description="Local weights file (.safetensors, or .pth loaded with weights_only=True) for timm architectures.")
    key_map: Optional[str] = Field(None, description="Key-mapping hook for `weights`: a registered name (e.g. efficientnet_pytorch) or 'package.module:function'.")
    trust_remote_code: bool = Field(False, description="Allow a Hugging Face model directory to run its own Python code. Off unless you trust the source.")
    load_in_4bit: bool = Field(False, description="QLoRA: load the Hugging Face model's linear weights in 4-bit NF4 (bitsandbytes; CUDA only, extra 'qlora') and train LoRA adapters on top in bf16. Needs strategy lora.")


class GenerationSection(_Section):
    eval_prompts: int = Field(32, ge=0, description="causal-lm: after training, answer up to this many validation prompts and report exact match, ROUGE-L and BLEU against the reference replies (samples written to generations.jsonl); 0 turns it off.")
    max_new_tokens: int = Field(64, ge=1, description="Longest reply generated (evaluation, `tuneforge generate` and `chat`).")
    sampled: bool = Field(True, description="Also evaluate one sampled reply per prompt (temperature/top_p) besides the greedy one.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling: sample from the smallest set of tokens holding this probability.")


class TaskSection(_Section):
    type: Literal["text-classification", "image-classification", "causal-lm", "preference"] = Field("text-classification", description="What the model learns to do: classify texts or images, continue text / follow instructions (causal-lm, a decoder LLM), or prefer chosen over rejected replies (preference: DPO/SimPO).")
    format: Literal["auto", "chat", "prompt-completion", "alpaca", "text"] = Field("auto", description="causal-lm data shape: chat {messages: [{role, content}]}, prompt-completion {prompt, completion}, alpaca {instruction, input, output}, text {text} or a .txt file; auto detects it per record.")
    chat_template: Literal["auto", "tokenizer", "chatml", "llama", "none"] = Field("auto", description="How conversations become text: the tokenizer's own template, ChatML, Llama-2 chat, or none (texts concatenated; EOS after each reply). auto: the tokenizer's template for chat data when it has one, else chatml; none for prompt-completion, alpaca and text.")
    train_on: Literal["completion", "last-turn", "all"] = Field("completion", description="causal-lm: which tokens carry loss: every assistant reply (completion), only the last one, or the whole text including prompts.")
    packing: bool = Field(True, description="causal-lm: pack several short examples into each row of max_length tokens; each example attends only to itself (position ids restart, block-diagonal attention), so the loss is the same as unpacked, with far less padding.")
    generation: GenerationSection = Field(default_factory=GenerationSection, description="Generation settings (evaluation after training, `tuneforge generate`, `tuneforge chat`).")
    loss: Literal["dpo", "simpo"] = Field("dpo", description="preference: DPO (against the frozen reference model; with LoRA the base with adapters disabled) or SimPO (reference-free, length-normalised).")
    beta: float = Field(0.1, gt=0, description="preference: strength of the preference term (DPO's beta; SimPO uses 2.0-2.5 typically).")
    simpo_gamma: float = Field(0.5, ge=0, description="preference, SimPO: target reward margin (gamma/beta ratio as in the SimPO paper).")
    classifier: Literal["head", "label-words"] = Field("head", description="text-classification with a causal LM: a new linear head on pooled features (head), or score each label's words with the LM itself (label-words: constrained decoding of the label names; no new weights).")
    label_prompt: str = Field("\nLabel:", description="classifier: label-words: text placed after each input before the label word is scored.")
    label_words: dict[str, str] = Field(default_factory=dict, description="classifier: label-words: the words scored for each label, e.g. {pos: positive, neg: negative}; a label not listed is scored by its own name. Words that are one token of the model's tokenizer score in one forward pass; longer ones cost a pass per label.")
    multi_label: bool = Field(False, description="Each example may carry several labels (sigmoid + binary cross-entropy).")
    label_separator: str = Field(",", description="Separator between labels inside one cell for multi-label CSV/TSV data.")
    max_length: Optional[int] = Field(None, ge=8, description="Maximum tokens per text (longer texts are truncated); default: the model's limit, capped at 512.")
    truncation: Literal["truncate", "error"] = Field("truncate", description="Texts longer than max_length: cut them (and report how many), or stop with an error naming each row.")
    pooling: Literal["mean", "cls", "last"] = Field("mean", description="How token features become one vector for the text head: mean over real tokens, the first ([CLS]) token, or the last real token (use last for decoder LLMs such as Llama, Qwen, GPT-2: only the last token has seen the whole text).")
    image_size: Optional[int] = Field(None, ge=16, description="Square input size for images; default: the backbone's pretrained input size.")
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before the classification head.")

    @field_validator("label_words", mode="before")
    @classmethod
    def _words_as_text(cls, value: Any) -> Any:
        # YAML reads `{0: negative, 1: positive}` with integer keys: labels are compared as text
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else value


class SplitColumns(_Section):
    text_column: Optional[str] = Field(None, description="Text column for this split (overrides data.text_column).")
    label_column: Optional[str] = Field(None, description="Label column for this split (overrides data.label_column).")
    image_column: Optional[str] = Field(None, description="Image-path column for this split (overrides data.image_column).")


class DataSection(_Section):
    train: Optional[str] = Field(None, description="Training data: CSV/TSV/JSONL/Parquet file, or an image folder (one sub-folder per class).")
    validation: Optional[str] = Field(None, description="Validation data; if absent, a stratified `validation_split` of train is held out.")
    test: Optional[str] = Field(None, description="Test data, evaluated once with the best model at the end.")
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = Field("auto", description="File format; `auto` uses the extension.")
    encoding: str = Field("utf-8", description="Text encoding of CSV/TSV/JSONL files.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the label (string or integer; a list or separated string for multi-label).")
    image_column: str = Field("image", description="Column holding image paths in an image manifest (relative to the manifest).")
    id_column: Optional[str] = Field(None, description="Optional column of unique example ids: duplicates are errors, and ids label predictions and error reports.")
    columns: dict[Literal["train", "validation", "test"], SplitColumns] = Field(default_factory=dict, description="Per-split column overrides, e.g. {validation: {text_column: content}}.")
    validation_split: float = Field(0.1, gt=0.0, lt=0.9, description="Fraction of train held out for validation when data.validation is not given.")
    max_train_rows: Optional[int] = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_rows: Optional[int] = Field(None, ge=1, description="Use only the first N validation/test rows.")
    augment: bool = Field(True, description="Train-time image augmentation (random resized crop, horizontal flip).")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip when augmenting (0 for digits, text in images, ...).")
    crop_scale: tuple[float, float] = Field((0.6, 1.0), description="Area range of the random resized crop when augmenting.")
    on_bad_record: Literal["error", "skip"] = Field("error", description="A malformed row, empty field or unreadable image: stop with an error, or skip it and report.")
    allow_overlap: bool = Field(True, description="Rows whose input (text, image, conversation) occurs in two of train/validation/test are counted and warned about; false makes that an error.")
    max_image_pixels: int = Field(100_000_000, ge=1, description="Largest image (width x height) accepted; bigger files are refused as possible decompression bombs.")
    num_workers: Optional[int] = Field(None, ge=0, description="Data-loader worker processes; default 0 for text (pre-tokenised); for images 1 when training on a GPU, 0 on CPU, where the training threads already use every core and a worker slows them (PERFORMANCE.md).")

    def column(self, split: str, role: str) -> str:
        override = self.columns.get(split)  # type: ignore[call-overload]
        value = getattr(override, f"{role}_column", None) if override else None
        return value or getattr(self, f"{role}_column")


NAME_DOC = ("How the pretrained model is adapted: full, linear-probe, partial, gradual-unfreeze, lora, bitfit, adapters, "
            "ia3, prompt-tuning, prefix-tuning, or auto (see the Strategies section).")


class StrategyOptions(_Section):
    """Base of every strategy's options; each strategy module registers a subclass."""

    name: str = Field("full", description=NAME_DOC)
    # the input modalities the strategy applies to (checked against task.type)
    modalities: ClassVar[tuple[str, ...]] = ("text", "image")


class EarlyStopping(_Section):
    patience: Optional[int] = Field(None, ge=1, description="Stop after this many evaluations without improvement; null disables early stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change of the monitored metric that counts as an improvement.")


class TrainSection(_Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(32, ge=1, description="Examples per micro-batch.")
    eval_batch_size: Optional[int] = Field(None, ge=1, description="Examples per evaluation batch; default 2x batch_size.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate of the backbone (low: the weights are already good).")
    head_lr: Optional[float] = Field(None, gt=0, description="Learning rate of the new head (it starts from random, so it may take a higher rate); default: lr.")
    layer_decay: Optional[float] = Field(None, gt=0, le=1, description="Layer-wise learning-rate decay (BEiT/timm), any strategy: backbone layer group i of n trains at lr * layer_decay^(n-i), so lower layers move less; e.g. 0.75.")
    lr_range: Optional[tuple[float, float]] = Field(None, description="Discriminative learning rates (fastai's slice(lo, hi)), any strategy: [lo, hi] spread geometrically from the lowest backbone layer group to the top one (replaces lr for the backbone); the head takes head_lr, default hi.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (not applied to biases and norms).")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate decay after warmup.")
    warmup: float = Field(0.06, ge=0, description="Warmup: a fraction of total steps if < 1, else a number of steps.")
    on_nonfinite: Literal["error", "skip"] = Field("error", description="A NaN/inf loss or gradient: stop (keeping the last good checkpoint) or skip that batch and count it.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the global gradient norm; null disables clipping.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto = bf16 autocast where the CPU/GPU runs it natively, else fp32; on CPU, fp32 for models with depthwise convolutions (EfficientNet, MobileNet, ConvNeXt), whose bf16 training steps measured 1.1-2.2x slower than fp32 there (PERFORMANCE.md).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    seed: int = Field(42, description="Seeds Python, NumPy and torch (data order, splits, init, dropout).")
    deterministic: bool = Field(False, description="Use deterministic algorithms (slower; bit-exact repeat runs).")
    eval_every: Optional[int] = Field(None, ge=1, description="Evaluate every N optimizer steps; default once per epoch.")
    log_every: int = Field(10, ge=1, description="Write a training-loss line to metrics.jsonl every N optimizer steps.")
    metric_for_best: Optional[str] = Field(None, description="Validation metric that picks the best checkpoint and drives early stopping: loss, accuracy, subset_accuracy (multi-label), precision/recall/f1 _macro/_micro/_weighted, roc_auc, ece; perplexity (causal-lm); reward_accuracy, reward_margin (preference). Loss, ece and perplexity are minimised. Default: accuracy for classification, loss for causal-lm and preference.")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping, description="Early stopping on metric_for_best.")
    save_every: Optional[int] = Field(None, ge=1, description="Also write a checkpoint every N optimizer steps (the best one is always kept).")
    keep_checkpoints: int = Field(2, ge=1, description="Periodic checkpoints kept on disk (oldest removed first).")
    cache_activations: Literal["auto", "off"] = Field("auto", description="auto: when frozen layers are deterministic (eval mode, no random augmentation), compute their outputs once and reuse them every epoch: the pooled features for linear-probe, the last frozen layer's activations for partial (checked to give the same logits, else off with the reason logged).")
    group_by_length: bool = Field(True, description="Batch texts of similar length together (less padding, faster).")
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="Image models: keep weights and images in channels-last (NHWC) memory layout. auto = on for CUDA (faster convolutions with bf16/fp16 tensor cores), off on CPU (measured no faster there: PERFORMANCE.md).")
    gradient_checkpointing: bool = Field(False, description="Recompute each block's activations in the backward pass instead of keeping them: much less memory for long texts and big models, about a third more compute. Hugging Face and timm backbones.")
    flush_denormal: bool = Field(True, description="CPU: flush subnormal floats (magnitude below 1.2e-38 in fp32) to zero while training and evaluating, in every intra-op thread, and restore the previous setting afterwards. x86 computes subnormals slowly, and real images drive convolutional backward passes into them (a bare EfficientNet step measured 15-25% faster with flushing on a quiet machine, not yet reproduced on a busy one: PERFORMANCE.md); the values flushed are far below what changes a result. No effect on GPUs.")
    threads: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field("auto", description="CPU: intra-op threads for this run. auto = torch's default (one per core) unless other processes keep cores busy when the run starts, then only the free cores (measured for 0.25 s from /proc; threads waiting for a descheduled peer made training 10-17x slower on a shared 2-core machine: PERFORMANCE.md); OMP_NUM_THREADS / MKL_NUM_THREADS in the environment are respected. A number sets it. The count used is in the manifest (torch_threads); the previous setting is restored when the run ends.")
    fast_dropout: bool = Field(True, description="CPU: draw dropout masks with tuneforge's own kernel (64 random bits from torch's generator serve four elements) instead of one Bernoulli draw per element: 3-4x faster per dropout, which was 10% of a MiniLM training step (PERFORMANCE.md); Hugging Face models' attention-probability dropout too (an attention function registered beside transformers' SDPA, used only while training on CPU with dropout). Same distribution (drop probability to 1/32768, expectation kept exactly), same seeded generator, so runs stay reproducible and resumable; a different random stream from torch's dropout, so results differ from a run with it off as they would with another seed. GPUs and torch.compile keep torch's dropout.")
    compile: bool = Field(False, description="torch.compile the backbone (in place; saved weights keep their names). Opt-in: compiling takes tens of seconds to minutes, which only pays off on long runs; text batches of varying length compile with dynamic shapes.")
    progress: bool = Field(True, description="Show progress bars.")

    @model_validator(mode="after")
    def _rates(self) -> "TrainSection":
        if self.layer_decay is not None and self.lr_range is not None:
            raise ValueError("train.layer_decay and train.lr_range both set the backbone's per-layer learning "
                             "rates; keep one of them")
        if self.lr_range is not None:
            lo, hi = self.lr_range
            if not 0 < lo <= hi:
                raise ValueError(f"train.lr_range must be [lo, hi] with 0 < lo <= hi (e.g. [1e-5, 1e-3]), got {[lo, hi]}")
        return self

    @property
    def minimize(self) -> bool:
        from .evaluation.names import lower_is_better

        return lower_is_better(self.metric_for_best)


class RetainSection(_Section):
    data: Optional[str] = Field(None, description="Inputs on which forgetting is measured before training and at every evaluation (a file like data.train, or an image folder/manifest); labels optional.")
    text_column: Optional[str] = Field(None, description="Text column of retain.data; default data.text_column.")
    image_column: Optional[str] = Field(None, description="Image-path column of a retain.data manifest; default data.image_column.")
    label_column: Optional[str] = Field(None, description="Label column of retain.data; needed with retain.head_from.")
    head_from: Optional[str] = Field(None, description="Run directory of an earlier task (fine-tuning in sequence): its head and labels score retain.data on the current backbone, and the accuracy drop is the forgetting.")
    max_rows: int = Field(512, ge=1, description="Use at most this many retain examples (the features of the starting model are kept in memory).")
    max_drop: Optional[float] = Field(None, ge=0, description="Forgetting budget: an evaluation whose forgetting (retain accuracy drop with head_from, else 1 - linear CKA) exceeds it cannot become the best checkpoint.")


class OutputSection(_Section):
    dir: Optional[str] = Field(None, description="Run directory; default runs/<recipe name>-<timestamp>.")
    name: Optional[str] = Field(None, description="Run name used in the default directory.")
    overwrite: bool = Field(False, description="Allow writing into a directory that already holds a run.")
    save_model: bool = Field(True, description="Write the final model (best checkpoint) into <run>/model.")
    merge: bool = Field(False, description="lora / ia3: fold the trained update into the base weights and save a plain model (no peft needed to load it); the largest logit difference abs(merged - unmerged) on validation examples is printed, and above merge_tolerance the run fails.")
    merge_tolerance: float = Field(1e-4, gt=0, description="Largest logit difference abs(merged - unmerged) that output.merge accepts, in units of max(1, largest abs(logit)) (fp32, up to 16 validation examples).")
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list, description="Also log to these experiment trackers (each an optional extra): tensorboard writes <run>/tensorboard; mlflow writes a local MLflow file store in <run>/mlruns (the recipe as parameters; view with mlflow ui --backend-store-uri <run>/mlruns).")
    report: bool = Field(True, description="Write <run>/report.html (self-contained) and the figures as PNGs in <run>/report/ at the end of the run.")


class Recipe(_Section):
    """A complete, reproducible description of one fine-tuning run."""

    model: ModelSection = Field(default_factory=ModelSection, description="The pretrained model to adapt.")
    task: TaskSection = Field(default_factory=TaskSection, description="What the model learns.")
    data: DataSection = Field(default_factory=DataSection, description="Where the examples come from.")
    strategy: StrategyOptions = Field(default_factory=StrategyOptions, description="Which parameters train, and how.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation settings.")
    retain: RetainSection = Field(default_factory=RetainSection, description="Forgetting: what the model should keep knowing.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where results go.")

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_options(cls, value: Any) -> Any:
        from .strategies import options_class

        if isinstance(value, StrategyOptions):
            value = value.model_dump()
        if value is None:
            value = {}
        if not isinstance(value, dict):
            # ValueError, not TypeError: pydantic turns only ValueError into a validation error
            raise ValueError(f"strategy must be a mapping such as {{name: lora, rank: 8}}, got {type(value).__name__}")
        value = dict(value)
        name = value.setdefault("name", "full")
        if not isinstance(name, str):
            raise ValueError(f"strategy.name must be a strategy name (full, linear-probe, partial, lora, ...; see `tuneforge options`), got {name!r}")
        return options_class(name).model_validate(value)

    @model_validator(mode="after")
    def _combinations(self) -> "Recipe":
        if self.task.type == "image-classification":
            if self.task.multi_label:
                raise ValueError("task.multi_label is only supported for text-classification so far; set task.multi_label: false")
        from .models.aliases import ALIASES

        alias = ALIASES.get(self.model.name)
        wanted = "image" if self.task.type == "image-classification" else "text"
        if self.task.type in ("causal-lm", "preference"):
            if alias is not None:
                raise ValueError(
                    f"model '{self.model.name}' is a {alias.modality} encoder, but task.type {self.task.type} needs a "
                    "decoder language model: set model.name to a local Hugging Face directory of a Llama, Qwen, "
                    "GPT-2 (or similar) model")
            if self.strategy.name in ("linear-probe", "auto", "gradual-unfreeze"):
                raise ValueError(
                    f"strategy {self.strategy.name} is for classifiers (it trains or schedules a new task head); a "
                    f"{self.task.type} run keeps the model's own LM head — use lora (the usual choice), full, partial, "
                    "adapters, ia3, bitfit or prompt-tuning")
        if self.task.classifier == "label-words" or self.task.label_words:
            self._check_label_words(alias)
        if alias is not None and alias.modality != wanted:
            others = [n for n, a in ALIASES.items() if a.modality == wanted]
            raise ValueError(
                f"model '{self.model.name}' is a {alias.modality} model but task.type is {self.task.type}; "
                f"use {'an' if wanted == 'image' else 'a'} {wanted} model (e.g. {', '.join(others)}) or change task.type"
            )
        if wanted not in type(self.strategy).modalities:
            raise ValueError(
                f"strategy {self.strategy.name} works on {' and '.join(type(self.strategy).modalities)} models only, but "
                f"task.type is {self.task.type}; for images use lora, adapters, ia3, bitfit, partial or full")
        if self.model.load_in_4bit and self.strategy.name != "lora":
            raise ValueError("model.load_in_4bit (QLoRA) trains LoRA adapters on a frozen 4-bit base: set "
                             f"strategy.name: lora (got {self.strategy.name}), or load_in_4bit: false")
        if self.output.merge:
            from .strategies import strategy_class

            if not getattr(strategy_class(self.strategy.name), "mergeable", False):
                raise ValueError(
                    f"output.merge folds a LoRA/IA3 update into the base weights; strategy {self.strategy.name} has "
                    "nothing to fold (its weights are already plain, or its adapters are non-linear) — "
                    "set output.merge: false, or use strategy lora / ia3")
        from .evaluation.names import check_metric_name

        generative = self.task.type in ("causal-lm", "preference")
        if self.train.metric_for_best is None:
            self.train.metric_for_best = "loss" if generative else "accuracy"
        check_metric_name(self.train.metric_for_best, self.task.multi_label,
                          task=self.task.type if generative else None)
        r = self.retain
        if r.data is None and (r.head_from or r.max_drop is not None or r.label_column):
            raise ValueError("retain.head_from / max_drop / label_column need retain.data: the inputs to measure on")
        if r.head_from and not r.label_column:
            raise ValueError("retain.head_from scores labelled data: set retain.label_column")
        if self.train.eval_batch_size is None:
            self.train.eval_batch_size = 2 * self.train.batch_size
        return self

    def _check_label_words(self, alias) -> None:
        t = self.task
        if t.classifier != "label-words":
            raise ValueError("task.label_words only applies with task.classifier: label-words; set that, or remove "
                             "task.label_words")
        if t.type != "text-classification":
            raise ValueError(f"task.classifier: label-words is for text-classification, not {t.type}; "
                             "remove task.classifier")
        if alias is not None:
            raise ValueError(
                f"model '{self.model.name}' is a {alias.modality} encoder, but task.classifier: label-words scores "
                "the label words with a decoder language model's own head: set model.name to a local Hugging Face "
                "directory of a Llama, Qwen, GPT-2 (or similar) model, or use task.classifier: head")
        if t.multi_label:
            raise ValueError("task.classifier: label-words picks one label per text (the most likely words); for "
                             "multi-label data use task.classifier: head")
        if self.strategy.name in ("linear-probe", "auto", "gradual-unfreeze"):
            raise ValueError(
                f"strategy {self.strategy.name} trains or schedules a new task head, and task.classifier: "
                "label-words has none (the LM's own head scores the labels) — use lora, full, partial, bitfit, "
                "adapters, ia3 or prompt-tuning")

    def dump(self) -> dict:
        """The resolved recipe as plain data (every default filled in)."""
        return self.model_dump(mode="json", serialize_as_any=True)


# --------------------------------------------------------------------------- loading

def _sections(model_cls: type[BaseModel]) -> dict[str, Any]:
    return dict(model_cls.model_fields)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation (Optional[X], X), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _check_keys(data: Any, model_cls: type[BaseModel], path: str) -> None:
    """Reject unknown keys with a did-you-mean, before pydantic sees them."""
    if not isinstance(data, dict):
        return
    if model_cls is StrategyOptions:
        from .strategies import options_class

        try:
            model_cls = options_class(str(data.get("name", "full")))
        except TuneforgeError:
            return  # the unknown strategy name is reported by validation
    fields = _sections(model_cls)
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            valid = ", ".join(fields)
            scope = f" (for strategy '{data.get('name', 'full')}')" if path == "strategy" else ""
            raise TuneforgeError(
                f"unknown recipe key '{where}'{suggest(str(key), fields)}; valid keys here{scope} are: {valid}"
            )
        annotation = fields[key].annotation
        nested = _nested_model(annotation)
        if nested is not None and getattr(annotation, "__origin__", None) is not dict:
            _check_keys(value, nested, where)
        elif nested is not None and isinstance(value, dict):  # dict[str, Section]
            for sub_key, sub_value in value.items():
                _check_keys(sub_value, nested, f"{where}.{sub_key}")


def _format_validation(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        msg = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
        lines.append(f"  {loc or '<recipe>'}: {msg}{shown}")
    return f"invalid recipe {origin}:\n" + "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-5`` -> (["train", "lr"], 3e-05). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise TuneforgeError(f"--set expects key.path=value, got '{text}' (e.g. --set train.lr=3e-5)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise TuneforgeError(f"--set '{text}' names no key before '='; write key.path=value (e.g. --set train.lr=3e-5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML ("[", "a: b: c"): keep the text as typed; validation then names the key
    # YAML reads "3e-5" as a string (it wants a dot); users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def recipe_from_dict(data: dict, origin: str = "(python)") -> Recipe:
    if not isinstance(data, dict):
        raise TuneforgeError(f"recipe {origin} must be a mapping of sections (model, task, data, strategy, train, output)")
    _check_keys(data, Recipe, "")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise TuneforgeError(_format_validation(err, origin)) from None


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML path, a dict or a Recipe, then apply ``key.path=value`` overrides."""
    if isinstance(source, Recipe):
        data, origin = source.dump(), "(python)"
    elif isinstance(source, dict):
        data, origin = source, "(python)"
    else:
        path = Path(source)
        if not path.is_file():
            raise TuneforgeError(f"recipe file '{path}' does not exist (see recipes/ for examples)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            line = err.object[:err.start].count(b"\n") + 1
            raise TuneforgeError(f"{path} line {line}: not valid UTF-8 (byte 0x{err.object[err.start]:02x}) "
                                 "— re-save the recipe as UTF-8") from None
        except RecursionError:
            raise TuneforgeError(f"{path}: nested too deeply to be a recipe (a recipe is a few sections of "
                                 "key: value pairs) — check the file's brackets and indentation") from None
        except OSError as err:
            raise TuneforgeError(f"cannot read recipe file {path} ({err.strerror or err}) — check its permissions") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise TuneforgeError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
        origin = str(path)
        data = _resolve_relative_paths(data, path.parent)
    if overrides:
        data = apply_overrides(data, overrides)
    return recipe_from_dict(data, origin)


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Paths in a recipe file are relative to the current directory, as users type them;
    we keep them so. (Hook kept for a later `relative_to: recipe` option.)"""
    return data


def describe_fields(model_cls: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every field: the source for docs and `tuneforge validate --explain`."""
    rows = []
    for name, field in model_cls.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        if nested is not None and getattr(field.annotation, "__origin__", None) is not dict:
            rows.append((key, "", field.description or ""))
            rows.extend(describe_fields(nested, key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, repr(default), field.description or ""))
    return rows
