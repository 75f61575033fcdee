"""The recipe: one typed, documented schema that is everything a run needs.

``defaults <- YAML <- --set overrides -> Recipe``. Unknown keys are errors that
suggest the nearest valid key (checked before pydantic so the message can say
``strategy.rnak`` -> ``strategy.rank``); wrong types and impossible
combinations are errors that say what to change. The resolved recipe is dumped
into every run directory, so a run can be repeated from its own folder.

Strategy and task options are owned by each strategy and task module (one
method, one module, one registration): ``strategy.name`` / ``task.type`` select a
registered options model and the rest of the block is validated against it. Rules
across sections live with the facts they read: each task's options (``check``),
``tasks.options.check_task_fit``, and each strategy's options (``check``, from the
strategy class's declared capabilities); this module only calls them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .yaml_safe import read_recipe_file
from .errors import TuneforgeError, suggest
from .schema import Section as _Section
from .strategies.options import DEFAULT_STRATEGY, NAME_DOC, STRATEGY_NAMES, StrategyOptions
from .tasks.options import DEFAULT_TASK, TASK_NAMES, GenerationSection, TaskOptions, check_task_fit, task_block_from_saved

# re-exported: recipe.py is the public face of the schema
__all__ = ["NAME_DOC", "GenerationSection", "Recipe", "StrategyOptions", "TaskOptions", "describe_fields",
           "from_run_config", "load_recipe", "parse_override", "recipe_from_dict", "run_config_data",
           "task_block_from_saved"]


class ModelSection(_Section):
    name: str = Field("minilm-l6", description="Alias (see `tuneforge models`), local Hugging Face directory, local .gguf file (llama.cpp; converted once to safetensors in $TUNEFORGE_CACHE/models), cached hub name, or timm architecture.")
    source: Literal["auto", "alias", "hf", "timm", "gguf"] = Field("auto", description="Where `name` comes from; `auto` tries alias, local directory or GGUF file, timm, then the local HF cache.")
    weights: Optional[str] = Field(None, description="Local weights file (.safetensors, or .pth loaded with weights_only=True) for timm architectures.")
    key_map: Optional[str] = Field(None, description="Key-mapping hook for `weights`: a registered name (e.g. efficientnet_pytorch) or 'package.module:function'.")
    trust_remote_code: bool = Field(False, description="Allow a Hugging Face model directory to run its own Python code. Off unless you trust the source.")
    load_in_4bit: bool = Field(False, description="QLoRA: load the Hugging Face model's linear weights in 4-bit NF4 (bitsandbytes; CUDA only, extra 'qlora') and train LoRA adapters on top in bf16. Needs strategy lora.")
    init_from: Optional[str] = Field(None, description="Warm start: a run directory whose final model (adapters merged) starts this run, e.g. the SFT run a DPO run continues; the strategy is applied on top. `--init-from RUN` sets it.")


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
    eval_before: Optional[bool] = Field(None, description="Evaluate the validation split once with the starting weights before the first step (never when resuming), recorded as step 0 in metrics.jsonl, eval.json ('before') and the report; the run's summary prints before -> after. The starting weights are a baseline, never the best checkpoint (the saved model is always a trained one; when no evaluation beats the start, the summary says so). causal-lm also answers its held-out prompts before training (generation scores before and after in eval.json and generations.jsonl). Default (null): on for generative tasks (causal-lm, preference), where the change is the figure to see; off for classifiers, whose new head starts at chance.")
    log_every: int = Field(10, ge=1, description="Write a training-loss line to metrics.jsonl every N optimizer steps.")
    metric_for_best: Optional[str] = Field(None, description="Validation metric that picks the best checkpoint and drives early stopping: one of the task's validation metrics (listed with each task in the Tasks section, with its default). Loss, ece and perplexity are minimised.")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping, description="Early stopping on metric_for_best.")
    save_every: Optional[int] = Field(None, ge=1, description="Also write a checkpoint every N optimizer steps (the best one is always kept).")
    keep_checkpoints: int = Field(2, ge=1, description="Periodic checkpoints kept on disk (oldest removed first).")
    cache_activations: Literal["auto", "off"] = Field("auto", description="auto: when frozen layers are deterministic (eval mode, no random augmentation), compute their outputs once and reuse them every epoch: the pooled features for linear-probe, the last frozen layer's activations for partial (checked to give the same logits, else off with the reason logged).")
    group_by_length: bool = Field(True, description="Batch texts of similar length together (less padding, faster).")
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="Image models: keep weights and images in channels-last (NHWC) memory layout. auto = on for CUDA (faster convolutions with bf16/fp16 tensor cores), off on CPU (measured no faster there: PERFORMANCE.md).")
    gradient_checkpointing: Union[Literal["auto"], bool] = Field("auto", description="Recompute each block's activations in the backward pass instead of keeping them (Hugging Face and timm backbones): less memory, more compute. auto = on only where memory is short: when one micro-batch's estimated activations (Korthikanti et al. 2022: 34 x tokens x hidden x layers bytes at 16 bits, x2 in fp32) exceed a quarter of the memory free at the start (GPU memory on CUDA, available RAM on CPU), else off, with the estimate logged. On SmolLM2-135M-Instruct (CPU, bf16, LoRA, 4 x 512 tokens) the estimate is ~1.1 GB against ~12 GB available, so auto leaves it off, and the run without it peaked at 5.9-6.1 GB RSS; the time and memory with it on are measured by benchmarks/grad_checkpointing.py (docs/llm.md). true / false force it.")
    flush_denormal: bool = Field(True, description="CPU: flush subnormal floats (magnitude below 1.2e-38 in fp32) to zero while training and evaluating, in every intra-op thread, and restore the previous setting afterwards. x86 computes subnormals slowly, and real images drive convolutional backward passes into them (a bare EfficientNet step measured 15-25% faster with flushing on a quiet machine, not yet reproduced on a busy one: PERFORMANCE.md); the values flushed are far below what changes a result. No effect on GPUs.")
    threads: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field("auto", description="CPU: intra-op threads for this run. auto = torch's default (one per core) unless other processes keep cores busy when the run starts, then only the free cores (measured for 0.25 s from /proc; threads waiting for a descheduled peer made training 10-17x slower on a shared 2-core machine: PERFORMANCE.md); OMP_NUM_THREADS / MKL_NUM_THREADS in the environment are respected. A number sets it. The count used is in the manifest (torch_threads); the previous setting is restored when the run ends.")
    fast_dropout: bool = Field(True, description="CPU: draw dropout masks with tuneforge's own kernel (64 random bits from torch's generator serve four elements) instead of one Bernoulli draw per element: 3-4x faster per dropout, which was 10% of a MiniLM training step (PERFORMANCE.md); Hugging Face models' attention-probability dropout too (an attention function registered beside transformers' SDPA, used only while training on CPU with dropout). Same distribution (drop probability to 1/32768, expectation kept exactly), same seeded generator, so runs stay reproducible and resumable; a different random stream from torch's dropout, so results differ from a run with it off as they would with another seed. GPUs and torch.compile keep torch's dropout.")
    compile: bool = Field(False, description="torch.compile the backbone (in place; saved weights keep their names). Opt-in: compiling takes tens of seconds to minutes, which only pays off on long runs; text batches of varying length compile with dynamic shapes.")
    progress: bool = Field(True, description="Show training progress: a live bar on a terminal; in a log file, CI or any non-terminal output, one plain line per log interval (never bar glyphs). The `step N validation: ...` lines are printed either way.")

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
    keep_resumable: bool = Field(False, description="Keep the periodic checkpoints (optimizer state included) after the run completes; by default only checkpoints/best stays.")


class Recipe(_Section):
    """A complete, reproducible description of one fine-tuning run."""

    model: ModelSection = Field(default_factory=ModelSection, description="The pretrained model to adapt.")
    task: TaskOptions = Field(default_factory=lambda: _options_for_task(DEFAULT_TASK)(), description="What the model learns.")
    data: DataSection = Field(default_factory=DataSection, description="Where the examples come from.")
    strategy: StrategyOptions = Field(default_factory=StrategyOptions, description="Which parameters train, and how.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation settings.")
    retain: RetainSection = Field(default_factory=RetainSection, description="Forgetting: what the model should keep knowing.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where results go.")

    @field_validator("task", mode="before")
    @classmethod
    def _task_options(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, TaskOptions):
            value = value.model_dump()
        if value is None:
            value = {}
        if not isinstance(value, dict):
            # ValueError, not TypeError: pydantic turns only ValueError into a validation error
            raise ValueError(f"task must be a mapping such as {{type: {DEFAULT_TASK}, max_length: 128}}, "
                             f"got {type(value).__name__}")
        value = dict(value)
        kind = value.setdefault("type", DEFAULT_TASK)
        if not isinstance(kind, str):
            raise ValueError(f"task.type must be a task name (see `tuneforge options`), got {kind!r}")
        # the context carries the recipe file's folder: paths a task resolves against it (task.reward_paths)
        return _options_for_task(kind).model_validate(value, context=info.context)

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_options(cls, value: Any) -> Any:
        if isinstance(value, StrategyOptions):
            value = value.model_dump()
        if value is None:
            value = {}
        if not isinstance(value, dict):
            # ValueError, not TypeError: pydantic turns only ValueError into a validation error
            raise ValueError(f"strategy must be a mapping such as {{name: lora, rank: 8}}, got {type(value).__name__}")
        value = dict(value)
        name = value.setdefault("name", DEFAULT_STRATEGY)
        if not isinstance(name, str):
            raise ValueError(f"strategy.name must be a strategy name (see `tuneforge options`), got {name!r}")
        return _options_for_strategy(name).model_validate(value)

    @model_validator(mode="after")
    def _combinations(self) -> "Recipe":
        # each rule lives with the facts it reads; here they are only called, in this order
        self.task.check(self)  # the task's own rules (label-words needs a decoder, ...)
        check_task_fit(self)  # task vs model and strategy: modality, task head
        self.strategy.check(self)  # the strategy's capabilities vs the rest (QLoRA, output.merge)
        from .evaluation.names import check_metric_name

        if self.train.eval_before is None:  # declared by the task's options, never by its name
            self.train.eval_before = type(self.task).eval_before_default
        if self.train.metric_for_best is None:
            self.train.metric_for_best = type(self.task).default_metric
        check_metric_name(self.train.metric_for_best, task=self.task)
        r = self.retain
        if r.data is None and (r.head_from or r.max_drop is not None or r.label_column):
            raise ValueError("retain.head_from / max_drop / label_column need retain.data: the inputs to measure on")
        if r.head_from and not r.label_column:
            raise ValueError("retain.head_from scores labelled data: set retain.label_column")
        if self.train.eval_batch_size is None:
            self.train.eval_batch_size = 2 * self.train.batch_size
        return self

    def dump(self) -> dict:
        """The resolved recipe as plain data (every default filled in)."""
        return self.model_dump(mode="json", serialize_as_any=True)


# --------------------------------------------------------------------------- loading

def _options_for_task(kind: str) -> type[TaskOptions]:
    from .tasks import task_options_class  # the registry fills as task modules import: only on use

    return task_options_class(kind)


def _options_for_strategy(name: str) -> type[StrategyOptions]:
    from .strategies import options_class

    return options_class(name)


def _owners(kind: str) -> dict[str, type]:
    """Every registered options class of ``kind`` by name: which one declares a misplaced key."""
    if kind == "task":
        from .tasks import task_names

        return {n: _options_for_task(n) for n in task_names()}
    from .strategies import strategy_names

    return {n: _options_for_strategy(n) for n in strategy_names()}


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
    kind, scope = "", ""
    try:  # a registered block: its selector picks the options class whose keys are valid
        if model_cls is StrategyOptions:
            kind, selected = "strategy", str(data.get("name", DEFAULT_STRATEGY))
            model_cls = _options_for_strategy(selected)
        elif model_cls is TaskOptions:
            kind, selected = "task", str(data.get("type", DEFAULT_TASK))
            model_cls = _options_for_task(selected)
    except TuneforgeError:
        return  # an unknown strategy name or task type is reported by validation
    if kind:
        scope = f" (for {kind} '{selected}')"
    fields = _sections(model_cls)
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            valid = ", ".join(fields)
            # an option of another task or strategy: say whose, the likely mix-up
            elsewhere = [name for name, cls in _owners(kind).items() if key in cls.model_fields] if kind else []
            hint = f" ('{key}' is an option of {kind} {', '.join(elsewhere)})" if elsewhere else ""
            raise TuneforgeError(
                f"unknown recipe key '{where}'{suggest(str(key), fields)}{hint}; valid keys here{scope} are: {valid}"
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
        text = repr(given)
        text = text if len(text) <= 200 else text[:200] + " ..."  # a long list would bury the message
        shown = f" (got {text})" if given is not None and not isinstance(given, dict) else ""
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


def recipe_from_dict(data: dict, origin: str = "(python)", base_dir: str | Path | None = None) -> Recipe:
    """``base_dir``: the folder of the recipe file, which options that name the user's own files
    (``task.reward_paths``) resolve relative paths against; None: the current directory."""
    if not isinstance(data, dict):
        raise TuneforgeError(f"recipe {origin} must be a mapping of sections (model, task, data, strategy, train, output)")
    _check_keys(data, Recipe, "")
    try:
        return Recipe.model_validate(data, context={"recipe_dir": str(base_dir) if base_dir is not None else None})
    except ValidationError as err:
        raise TuneforgeError(_format_validation(err, origin)) from None


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML path, a dict or a Recipe, then apply ``key.path=value`` overrides."""
    base_dir = None
    if isinstance(source, Recipe):
        data, origin = source.dump(), "(python)"
    elif isinstance(source, dict):
        data, origin = source, "(python)"
    else:
        path = Path(source)
        data = read_recipe_file(path)
        origin, base_dir = str(path), path.parent
    if overrides:
        data = apply_overrides(data, overrides)
    return recipe_from_dict(data, origin, base_dir)


def describe_fields(model_cls: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every field: the source for docs and `tuneforge validate --explain`.
    ``task`` and ``strategy`` show their common base (the selector); each task's and strategy's
    own options are described from ``tasks.task_options_class`` / ``strategies.options_class``."""
    rows = []
    for name, field in model_cls.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        description = render_description(field.description or "")
        if nested is not None and getattr(field.annotation, "__origin__", None) is not dict:
            rows.append((key, "", description))
            rows.extend(describe_fields(nested, key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, repr(default), description))
    return rows


def render_description(text: str) -> str:
    """A field description with the registered names filled in (they are known only once every
    strategy and task module has registered, after the descriptions were written)."""
    if STRATEGY_NAMES in text:
        from .strategies import strategy_names

        text = text.replace(STRATEGY_NAMES, _either(strategy_names()))
    if TASK_NAMES in text:
        from .tasks import task_names

        text = text.replace(TASK_NAMES, _either(task_names()))
    return text


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# --------------------------------------------------------------------------- recipes saved by runs

def run_config_data(data: dict) -> dict:
    """A recipe saved by a run (``config.yaml``) as plain data in today's shape. Runs written
    before each task owned its options hold every task's fields in ``task:``; the fields the
    selected task does not declare are dropped. Only for recipes read from a run, never a user's."""
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    if "task" in data:
        data["task"] = task_block_from_saved(data["task"])
    return data


def from_run_config(source: str | Path | dict) -> Recipe:
    """The recipe of a run: its ``config.yaml`` (a path) or that file's data, old runs included."""
    if isinstance(source, dict):
        return recipe_from_dict(run_config_data(source), "(run config)")
    path = Path(source)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise TuneforgeError(f"cannot read the run's recipe {path} ({err})") from None
    return recipe_from_dict(run_config_data(data), str(path))
