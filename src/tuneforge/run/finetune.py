"""From a recipe to a fine-tuned model: the steps of DESIGN.md's flow, in order.

    recipe -> data records -> labels -> pretrained model (+ModelInfo) -> task head
    -> strategy -> loaders -> optimizer/schedule -> Trainer.fit() -> best weights
    -> final evaluation -> saved model + run directory
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import TuneforgeError
from ..recipe import Recipe, load_recipe
from .rundir import RunDir, default_run_dir, prepare_run_dir


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        import os

        # cuBLAS needs a fixed workspace to be deterministic (CUDA docs, "Results reproducibility");
        # it is read when cuBLAS starts, so set it before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # Set both ways: an earlier deterministic run in this process must not leak into this one.
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


@dataclass
class Run:
    """What ``finetune`` returns: the run directory, its metrics and a predictor."""

    path: Path
    metrics: dict
    recipe: Recipe
    history: list = field(default_factory=list)
    _predictor: object = None

    def predict(self, inputs: list) -> list[dict]:
        if self._predictor is None:
            from ..deploy.predictor import Predictor

            self._predictor = Predictor(self.path)
        return self._predictor.predict(inputs)


class _Log:
    def __init__(self, console):
        self.console = console

    def __call__(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, soft_wrap=True)


def _read_splits(recipe: Recipe, task, log) -> tuple[dict, dict, dict]:
    from ..data.splits import stratified_split

    data = recipe.data
    if not data.train:
        raise TuneforgeError("data.train is not set; point it at a CSV/TSV/JSONL/Parquet file or an image folder")
    skipped: dict[str, list] = {}
    splits, rows = {}, {}
    for split in ("train", "validation", "test"):
        path = getattr(data, split)
        if path is None:
            continue
        if not Path(path).exists():
            raise TuneforgeError(f"data.{split} path '{path}' does not exist (relative paths start at {Path.cwd()})")
        limit = data.max_train_rows if split == "train" else data.max_eval_rows
        skipped[split] = []
        splits[split] = task.read(split, path, limit=limit, skipped=skipped[split])
        rows[split] = len(splits[split])
    if "validation" not in splits:
        label_fn = lambda r: str(task.record_labels(r)[0]) if task.record_labels(r) else ""  # noqa: E731
        splits["train"], splits["validation"] = stratified_split(
            splits["train"], label_fn, data.validation_split, recipe.train.seed)[:2]
        log(f"validation: held out {len(splits['validation'])} of the training rows "
            f"(data.validation_split={data.validation_split}, stratified, seed {recipe.train.seed})")
    for split, items in skipped.items():
        if items:
            log(f"[yellow]skipped {len(items)} bad {split} record(s)[/]: " + "; ".join(map(str, items[:3]))
                + (" ..." if len(items) > 3 else ""))
    return splits, skipped, rows


class RunInterrupted(TuneforgeError):
    """SIGINT/SIGTERM stopped training; a resumable checkpoint was saved first."""


@contextlib.contextmanager
def _stop_on_signals(state, log):
    """First SIGINT/SIGTERM: finish the current step, save, exit. A second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        state.should_stop = state.interrupted = True
        state.stop_reason = f"{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)"
        log(f"[yellow]{state.stop_reason}[/]")
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, getattr(torch, "OutOfMemoryError", ())) or (
        isinstance(err, RuntimeError) and any(t in text for t in ("out of memory", "can't allocate memory",
                                                                  "not enough memory")))


def finetune(recipe: Recipe | dict | str | Path, *, overrides: list[str] | None = None, console=None,
             argv: list[str] | None = None, overwrite: bool | None = None, resume: str | None = None,
             init_from: str | None = None) -> Run:
    """Run a recipe end to end; return a :class:`Run`.

    ``resume``: a run directory (or ``"auto"``) to continue exactly from its newest valid
    checkpoint. ``init_from``: a run directory whose final weights start a new run.
    """
    from rich.console import Console

    if resume and init_from:
        raise TuneforgeError("--resume continues a run exactly and --init-from starts a new one; use one of them")
    origin = str(recipe) if isinstance(recipe, (str, Path)) else None
    recipe = load_recipe(recipe, overrides)
    console = console if console is not None else Console(stderr=True)
    log = _Log(console)
    from ..engine.precision import resolve_device
    from ..engine.threads import intra_op_threads

    device = resolve_device(recipe.train.device)
    with intra_op_threads(recipe.train.threads, device, log):
        return _finetune(recipe, origin, device, console, log, argv=argv, overwrite=overwrite, resume=resume,
                         init_from=init_from)


def _finetune(recipe: Recipe, origin: str | None, device, console, log, *, argv, overwrite, resume,
              init_from) -> Run:
    from ..data.records import file_fingerprint
    from ..engine.checkpoint import newest_valid, recover
    from ..engine.precision import precision_name, resolve_precision
    from .resume import check_same_run, find_run_to_resume
    from ..tasks import get_task

    cfg = recipe.train
    t_start = time.perf_counter()
    seed_everything(cfg.seed, cfg.deterministic)
    amp_dtype = resolve_precision(cfg.precision, device)

    # 1. data, read and checked before anything is written or loaded
    task = get_task(recipe)
    splits, skipped, rows = _read_splits(recipe, task, log)
    labels = task.label_map(splits["train"])
    log(f"data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " examples"
        + (f"; {len(labels)} labels" if len(labels) else ""))
    fingerprints = {s: file_fingerprint(getattr(recipe.data, s)) for s in rows}

    # 2. the model, also before anything is written: a wrong weights path or model
    # directory costs nothing and leaves no half-made run behind
    model, loaded, strategy, decision = _build_model(recipe, task, labels, device, init_from, log, len(splits["train"]))
    if cfg.precision == "auto" and device.type == "cpu" and amp_dtype is not None:
        from ..engine.precision import has_depthwise_conv

        if has_depthwise_conv(model):
            amp_dtype = None
            log("precision: fp32 (auto): this model's depthwise convolutions train slower in bf16 than in fp32 on "
                "CPU; train.precision: bf16 forces bf16")

    # 3. the run directory: a new one, or the run being resumed
    checkpoint = None
    if resume:
        run = RunDir(find_run_to_resume(resume, recipe, origin))
        check_same_run(run.path, recipe, fingerprints)
        recover(run.checkpoints, None, report=log)
        checkpoint = newest_valid(run.checkpoints, report=log)
        recover(run.checkpoints, checkpoint, report=log)
        if checkpoint is None:
            raise TuneforgeError(f"{run.path} has no valid resumable checkpoint to continue from; "
                                 "start it again with --overwrite (or set train.save_every to checkpoint more often)")
        run.load_manifest()
        resumed = run.manifest.get("resumed", []) + [{"from": checkpoint.name, "argv": argv or sys.argv}]
        run.update_manifest(status="running", resumed=resumed, error=None)
        log(f"resume: continuing {run.path} exactly from {checkpoint.name}")
    else:
        run = RunDir(prepare_run_dir(Path(recipe.output.dir) if recipe.output.dir else default_run_dir(recipe, origin),
                                     recipe.output.overwrite if overwrite is None else overwrite))
        run.write_recipe(recipe)
        run.start_manifest(recipe, argv, device, precision_name(amp_dtype))
        run.update_manifest(data={s: {**fingerprints[s], "rows_read": n} for s, n in rows.items()},
                            examples={k: len(v) for k, v in splits.items()},
                            skipped={k: [str(x) for x in v] for k, v in skipped.items() if v},
                            init_from=init_from)
        from .provenance import record

        run.update_manifest(reproducibility=record(recipe, origin=origin, argv=argv, device=device,
                                                   precision=precision_name(amp_dtype), source=loaded.info.source,
                                                   init_from=init_from))
    if decision is not None:
        run.update_manifest(strategy_decision={k: v for k, v in decision.items() if k != "options"})

    # Everything after this point is recorded in the manifest if it fails, so a
    # run directory never looks complete (or silently "running") when it is not.
    trainer = replay = None
    try:
        trainer, loaders, prep_s, replay, mfu = _build_trainer(recipe, task, splits, labels, model, loaded, strategy,
                                                               run, device, amp_dtype, console, log)
        if checkpoint is not None:
            from ..engine.checkpoint import load_resumable, restore_rng

            trainer.restore(load_resumable(checkpoint, model, trainer.optimizer, trainer.scheduler, trainer.scaler))
            restore_rng(checkpoint)  # last: nothing may consume randomness between here and the loop
        from ..engine.denormals import flush_denormals

        t0 = time.perf_counter()
        with _stop_on_signals(trainer.state, log), flush_denormals(device, cfg.flush_denormal):
            state = trainer.fit()
        train_s = time.perf_counter() - t0
        if state.interrupted:
            if state.last_checkpoint_step != state.step:
                trainer.save_resumable()
            run.update_manifest(status="interrupted", steps=state.step)
            command = f"tuneforge train {origin or 'RECIPE'} --resume {run.path}"
            raise RunInterrupted(f"interrupted at step {state.step}; checkpoint saved in {run.checkpoints}; "
                                 f"continue with: {command}")
        if state.stop_reason:
            log(state.stop_reason)
        final = _finish(recipe, task, loaded, labels, model, strategy, trainer, loaders, run, log, splits)
        mfu.remeasure_peak()  # outside the timed training
        from ..engine.throughput import peak_memory, speed

        eval_s = sum(e.get("eval_seconds", 0.0) for e in state.evals)
        # throughput over training time without the evaluations inside it
        counts = (train_s - eval_s, state.examples, state.tokens, state.positions)
        timings = {"preprocess_s": round(prep_s, 2), "train_s": round(train_s, 2), "eval_in_train_s": round(eval_s, 2),
                   "total_s": round(time.perf_counter() - t_start, 2), **speed(*counts), **mfu.figures(*counts),
                   **peak_memory(device), "matmul_peak_flops": mfu.peak_flops,
                   "train_flops_per_" + ("token" if state.positions else "example"): mfu.flops_per_unit}
        log("speed: " + ", ".join(f"{k} {v}" for k, v in timings.items() if k in (
            "samples_per_s", "tokens_per_s", "padding_fraction", "mfu", "peak_rss_mb")))
        from ..evaluation.report import parameter_summary

        run.update_manifest(status="completed", steps=state.step, best_step=final["best_step"], timings=timings,
                            task_settings=task.settings(), model_info=_info_json(loaded.info),
                            skipped_nonfinite=state.skipped_nonfinite, parameters=parameter_summary(model))
    except RunInterrupted:
        raise
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        run.update_manifest(status=status, error=f"{type(err).__name__}: {err}")
        if _out_of_memory(err):
            last = trainer.state.last_checkpoint_step if trainer else None
            raise TuneforgeError(
                f"out of memory ({str(err).splitlines()[0][:160]}) with train.batch_size {cfg.batch_size}; lower "
                "train.batch_size and raise train.grad_accum to keep the effective batch, shorten task.max_length "
                "or task.image_size, or use a lighter strategy (lora, linear-probe)"
                + (f"; the last checkpoint (step {last}) resumes with --resume {run.path}" if last else "")) from err
        raise
    finally:
        if replay is not None:
            replay.remove()  # the model's own forwards again, for whoever uses it next
    if recipe.output.report:
        _write_report(run.path, log)
    return Run(path=run.path, metrics=final, recipe=recipe, history=state.evals)


def _write_report(path: Path, log) -> None:
    """A report failure never costs a finished run: the model and eval.json are already saved."""
    from ..evaluation.report import write_report

    t0 = time.perf_counter()
    try:
        log(f"report: {write_report(path)} ({time.perf_counter() - t0:.1f}s)")
    except Exception as err:  # noqa: BLE001 - any failure here is reported, never raised
        log(f"[yellow]warning: the report could not be written ({type(err).__name__}: {err}); the run is complete "
            f"— try again with `tuneforge report {path}`[/]")


def _build_model(recipe, task, labels, device, init_from, log, n_train):
    """Pretrained backbone -> task head -> (warm start) -> strategy."""
    from ..models import load_model
    from ..strategies import describe_trainable, get_strategy

    t0 = time.perf_counter()
    m = recipe.model
    loaded = load_model(m.name, source=m.source, weights=m.weights, key_map=m.key_map,
                        trust_remote_code=m.trust_remote_code, load_in_4bit=m.load_in_4bit,
                        causal_lm=getattr(task, "generative", False) or getattr(task, "needs_lm_head", False))
    if loaded.info.modality != task.modality:
        raise TuneforgeError(
            f"model '{m.name}' is a {loaded.info.modality} model but task.type is {recipe.task.type}; "
            f"pick a {task.modality} model (see `tuneforge models`) or change task.type")
    task.attach(loaded)
    model = task.build_model(loaded, labels)
    if init_from:
        from .resume import warm_start

        warm_start(model, init_from, labels, log)
    strategy = get_strategy(recipe.strategy)
    decision = None
    if hasattr(strategy, "decide"):  # `auto`: pick a concrete strategy from the facts of this run
        decision = strategy.decide({"train_examples": n_train, "classes": len(labels.names), "device": str(device),
                                    "parameters": sum(p.numel() for p in model.parameters()),
                                    "modality": loaded.info.modality, "train": recipe.train.model_dump()})
        log(f"auto: {decision['paragraph']}")
        strategy = get_strategy(decision["options"])
    model = strategy.apply(model, loaded.info)
    limit = getattr(strategy, "max_text_tokens", None)
    if limit and getattr(task, "max_length", None) and task.max_length > limit:
        log(f"task.max_length lowered from {task.max_length} to {limit}: strategy {strategy.name}'s virtual tokens "
            "use the rest of the model's positions")
        task.max_length = limit
    model.to(device)
    if _channels_last(recipe, loaded.info.modality, device):
        model.to(memory_format=torch.channels_last)  # 4-D weights only; the trainer converts the images
        log("memory format: channels-last (train.channels_last)")
    if recipe.train.gradient_checkpointing:
        _checkpointing(model, log)
    if recipe.train.compile:
        _compile(model, task, log)
    elif recipe.train.fast_dropout and device.type == "cpu":
        from ..engine import fast_dropout

        n = fast_dropout.install(model)
        attention = fast_dropout.install_attention(model)
        if n:
            log(f"dropout: {n} dropout layers" + (" and the attention probabilities" if attention else "")
                + " draw their masks with the fast CPU kernel (train.fast_dropout)")
    log(f"model: {m.name} ({loaded.info.family}, {loaded.info.modality}) loaded in {time.perf_counter() - t0:.1f}s; "
        f"strategy {strategy.name}: {describe_trainable(model)}")
    adapted = getattr(strategy, "adapted", [])
    if adapted:
        log(f"adapted modules ({len(adapted)}): " + ", ".join(adapted[:6]) + (" ..." if len(adapted) > 6 else ""))
    return model, loaded, strategy, decision


def _channels_last(recipe, modality: str, device) -> bool:
    choice = recipe.train.channels_last
    return modality == "image" and (choice == "on" or (choice == "auto" and device.type == "cuda"))


def _checkpointing(model, log) -> None:
    """train.gradient_checkpointing, through the backbone library's own switch."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.backbone
    backbone = getattr(backbone, "peft", backbone)  # prompt tuning wraps the HF model
    backbone = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    if hasattr(backbone, "gradient_checkpointing_enable"):
        # non-reentrant: works when the inputs need no grad (frozen embeddings under LoRA)
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)  # timm
    else:
        raise TuneforgeError(f"train.gradient_checkpointing: a {type(backbone).__name__} backbone has no checkpointing "
                             "switch (Hugging Face and timm models do); set train.gradient_checkpointing: false")
    log("gradient checkpointing: on (activations recomputed in the backward pass)")


def _compile(model, task, log) -> None:
    """Compile the backbone in place (``nn.Module.compile``): the module tree and its state_dict
    names stay as they are, so checkpoints, saving and strategies are unaffected."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Text batches vary in length: dynamic shapes compile once instead of once per length.
    base.backbone.compile(dynamic=task.modality == "text")
    log("torch.compile: the backbone compiles on its first batches (train.compile)")


def _build_trainer(recipe, task, splits, labels, model, loaded, strategy, run, device, amp_dtype, console, log):
    """Batches (texts tokenised here, once), optimizer, schedule, callbacks -> the Trainer, built
    complete; also the frozen-prefix replay the run removes when it ends (or None) and the MFU
    callback whose figures go into the manifest."""
    from ..engine.callbacks import BestCheckpoint, EarlyStopping, MetricsLog, ResumeCheckpoint
    from ..engine.mfu import MFU
    from ..engine.optim import build_optimizer, build_scheduler
    from ..engine.plan import TrainPlan
    from ..engine.precision import channels_last_images, precision_name
    from ..engine.progress import RichProgress
    from ..engine.trainer import Trainer

    cfg = recipe.train
    t0 = time.perf_counter()
    datasets = {k: task.dataset(v, labels, k) for k, v in splits.items()}
    prep_s = time.perf_counter() - t0
    from ..engine.activation_cache import build_cached_loaders, cacheable

    from ..engine import prefix_cache

    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    loaders, replay = None, None
    use_cache, why_not = cacheable(model, strategy, task, recipe)
    use_prefix, why_not_prefix = prefix_cache.cacheable(model, strategy, task, recipe)
    t0 = time.perf_counter()
    if use_cache:
        loaders = build_cached_loaders(model, task, datasets, recipe, device, autocast, precision_name(amp_dtype), log)
    elif use_prefix:
        loaders, replay = prefix_cache.build_prefix_loaders(model, strategy, task, datasets, recipe, device, autocast,
                                                            precision_name(amp_dtype), log)
    elif strategy.name in ("linear-probe", "partial"):
        log(f"activation cache off: {why_not if strategy.name == 'linear-probe' else why_not_prefix}")
    prep_s += time.perf_counter() - t0
    if hasattr(task, "prepare_reference"):  # preference (DPO): reference log-probs, once, before any trained weights
        t0 = time.perf_counter()
        task.prepare_reference(model, datasets, device, autocast, run.path, log)
        prep_s += time.perf_counter() - t0
    if loaders is None:
        loaders = {k: task.loader(d, cfg.batch_size if k == "train" else cfg.eval_batch_size, train=k == "train",
                                  seed=cfg.seed) for k, d in datasets.items()}
    truncated = getattr(task, "truncated", {})
    if any(truncated.values()):
        log(f"[yellow]truncated to {task.max_length} tokens[/]: " + ", ".join(f"{k} {v}" for k, v in truncated.items() if v)
            + " text(s) (set task.max_length to change)")
    from ..strategies.base import describe_lrs, param_groups

    will_train = getattr(strategy, "will_train", None)
    groups = param_groups(model, loaded.info, cfg, will_train(model) if will_train else None)
    optimizer = build_optimizer(groups, device)
    log(describe_lrs(groups, loaded.info))
    run.update_manifest(parameters={"trainable": sum(p.numel() for g in groups for p in g["params"]),
                                    "total": sum(p.numel() for p in model.parameters())},
                        param_groups=[{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                                       "parameters": sum(p.numel() for p in g["params"])} for g in groups])
    # The step counts first: the schedule and the strategy's callbacks are built from them.
    # Callbacks declare their order (engine/callbacks.py), so the list order here is free.
    plan = TrainPlan.of(loaders["train"], cfg)
    mfu = MFU(device, amp_dtype or torch.float32)
    callbacks = [mfu, MetricsLog(run.metrics_path),
                 BestCheckpoint(run.checkpoints, cfg.metric_for_best, cfg.minimize, cfg.early_stopping.min_delta),
                 ResumeCheckpoint(run.checkpoints, cfg.save_every, cfg.keep_checkpoints)]
    if recipe.output.loggers:
        from ..evaluation.loggers import build_loggers

        callbacks += build_loggers(recipe.output.loggers, run.path, recipe)
    if cfg.early_stopping.patience:
        callbacks.append(EarlyStopping(cfg.early_stopping.patience))
    if cfg.progress:
        callbacks.append(RichProgress(console))
    if recipe.retain.data:
        from ..evaluation.forgetting import RetainMonitor

        callbacks.append(RetainMonitor(task, recipe, run.path / "retain_reference.pt"))
    if getattr(strategy, "callbacks", None):
        callbacks += strategy.callbacks(plan, log)
    wrap = getattr(strategy, "wrap_schedule", None)
    scheduler = build_scheduler(optimizer, cfg.schedule, plan.total_steps, cfg.warmup,
                                wrap=wrap and (lambda fn: wrap(fn, plan)))
    trainer = Trainer(model=model, task=task, optimizer=optimizer, scheduler=scheduler, train_loader=loaders["train"],
                      val_loader=loaders["validation"], cfg=cfg, device=device, amp_dtype=amp_dtype,
                      metrics_factory=lambda: task.metrics(labels), callbacks=callbacks, plan=plan,
                      train_mode=strategy.set_train_mode,
                      prepare_batch=channels_last_images if _channels_last(recipe, task.modality, device) else None)
    if cfg.flush_denormal and device.type == "cpu":
        log("denormals: flushed to zero while training and evaluating (train.flush_denormal)")
    log(f"training: {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), batch {cfg.batch_size}"
        f"x{cfg.grad_accum}, {precision_name(amp_dtype)} on {device}")
    return trainer, loaders, prep_s, replay, mfu


def _finish(recipe, task, loaded, labels, model, strategy, trainer, loaders, run, log, splits=None) -> dict:
    """Best weights -> final evaluation -> saved model."""
    from ..engine.checkpoint import load_checkpoint_weights
    from ..engine.denormals import flush_denormals
    from .artifact import save_model

    best = load_checkpoint_weights(run.checkpoints / "best", model)
    with flush_denormals(trainer.device, recipe.train.flush_denormal):  # as while training (train.flush_denormal)
        final = {"best_step": best["step"], "metric_for_best": recipe.train.metric_for_best,
                 "validation": trainer.evaluate(loaders["validation"], "validation")}
        if "test" in loaders:
            final["test"] = trainer.evaluate(loaders["test"], "test")
    final["labels"] = labels.names
    if hasattr(task, "after_training") and splits:  # causal-lm: generation on held-out prompts
        generation = task.after_training(model, splits, run, trainer.device, trainer.autocast, log)
        if generation:
            final["generation"] = generation
    for cb in trainer.callbacks:
        if hasattr(cb, "summary"):  # forgetting (retain.data)
            final["forgetting"] = cb.summary(final["best_step"])
    for split in ("validation", "test"):
        if split in final and splits:
            _name_examples(final[split].get("confidently_wrong", []), splits[split])
    merged = None
    if recipe.output.merge:
        model, merged = _merge(recipe, model, loaders["validation"], trainer.device, log)
        final["merge"] = merged
    run.write_json("eval.json", final)
    if recipe.output.save_model:
        save_model(run.model_dir, model=model, loaded=loaded, strategy=strategy, labels=labels, task=task,
                   recipe=recipe, merged=merged)
    return final


def _merge(recipe, model, loader, device, log):
    """output.merge: fold the adapter into the weights, checked on up to 16 validation examples."""
    from ..strategies.merge import merge_and_check
    from ..tasks.base import MODEL_INPUTS

    batch = next(iter(loader))
    inputs = {k: batch[k][:16].to(device) for k in MODEL_INPUTS if k in batch}
    tolerance = recipe.output.merge_tolerance
    merged, report = merge_and_check(model, inputs, tolerance)
    log(f"merge: max |merged - unmerged| logit = {report['max_abs_logit_diff']:.3g} on {report['examples']} "
        f"validation examples (logits up to {report['logit_scale']:.3g}; tolerance {tolerance:g} x max(1, |logit|), "
        "fp32): ok")
    return merged, report


def _name_examples(wrong: list[dict], records: list) -> None:
    """Give each confidently-wrong example its input (text, or image path) and row, for the report."""
    for item in wrong:
        record = records[item["index"]]
        item["where"] = record.where
        if "text" in record.values:
            item["text"] = str(record.values["text"])[:500]
        if isinstance(record.values.get("image"), str):  # a path (parquet may hold raw bytes: left out)
            item["image"] = record.values["image"]


def _info_json(info) -> dict:
    return {"family": info.family, "modality": info.modality, "source": info.source,
            "layer_groups": len(info.layer_groups), "feature_dim": info.feature_dim}
