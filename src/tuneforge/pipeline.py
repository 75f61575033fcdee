"""From a recipe to a fine-tuned model: the steps of DESIGN.md's flow, in order.

    recipe -> data records -> labels -> pretrained model (+ModelInfo) -> task head
    -> strategy -> loaders -> optimizer/schedule -> Trainer.fit() -> best weights
    -> final evaluation -> saved model + run directory
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import TuneforgeError
from .recipe import Recipe, load_recipe
from .run import RunDir, default_run_dir, prepare_run_dir


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


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
            from .saving import Predictor

            self._predictor = Predictor(self.path)
        return self._predictor.predict(inputs)


class _Log:
    def __init__(self, console):
        self.console = console

    def __call__(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, soft_wrap=True)


def _read_splits(recipe: Recipe, task, log) -> tuple[dict, dict, dict]:
    from .data.splits import stratified_split

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


def finetune(recipe: Recipe | dict | str | Path, *, overrides: list[str] | None = None, console=None,
             argv: list[str] | None = None, overwrite: bool | None = None) -> Run:
    """Run a recipe end to end; return a :class:`Run`."""
    from rich.console import Console

    from .data.records import file_fingerprint
    from .engine.callbacks import BestCheckpoint, EarlyStopping, MetricsLog
    from .engine.checkpoint import load_checkpoint_weights
    from .engine.optim import build_optimizer, build_scheduler
    from .engine.precision import precision_name, resolve_device, resolve_precision
    from .engine.progress import RichProgress
    from .engine.trainer import Trainer
    from .models import load_model
    from .saving import save_model
    from .strategies import describe_trainable, get_strategy
    from .tasks import get_task

    origin = str(recipe) if isinstance(recipe, (str, Path)) else None
    recipe = load_recipe(recipe, overrides)
    console = console if console is not None else Console(stderr=True)
    log = _Log(console)
    cfg = recipe.train
    t_start = time.perf_counter()
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)

    # 1. data, read and checked before anything is written or loaded
    task = get_task(recipe)
    splits, skipped, rows = _read_splits(recipe, task, log)
    labels = task.label_map(splits["train"])
    log(f"data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f" examples; {len(labels)} labels")

    # 2. the run directory
    run = RunDir(prepare_run_dir(Path(recipe.output.dir) if recipe.output.dir else default_run_dir(recipe, origin),
                                 recipe.output.overwrite if overwrite is None else overwrite))
    run.write_recipe(recipe)
    run.start_manifest(recipe, argv, device, precision_name(amp_dtype))
    run.update_manifest(data={s: {**file_fingerprint(getattr(recipe.data, s)), "rows_read": n} for s, n in rows.items()},
                        examples={k: len(v) for k, v in splits.items()},
                        skipped={k: [str(x) for x in v] for k, v in skipped.items() if v})

    # Everything after this point is recorded in the manifest if it fails, so a
    # run directory never looks complete (or silently "running") when it is not.
    try:
        # 3. model, head and strategy
        t0 = time.perf_counter()
        m = recipe.model
        loaded = load_model(m.name, source=m.source, weights=m.weights, key_map=m.key_map,
                            trust_remote_code=m.trust_remote_code)
        if loaded.info.modality != task.modality:
            raise TuneforgeError(
                f"model '{m.name}' is a {loaded.info.modality} model but task.type is {recipe.task.type}; "
                f"pick a {task.modality} model (see `tuneforge models`) or change task.type")
        task.attach(loaded)
        model = task.build_model(loaded, labels)
        strategy = get_strategy(recipe.strategy)
        model = strategy.apply(model, loaded.info)
        model.to(device)
        log(f"model: {m.name} ({loaded.info.family}, {loaded.info.modality}) loaded in {time.perf_counter() - t0:.1f}s; "
            f"strategy {strategy.name}: {describe_trainable(model)}")
        adapted = getattr(strategy, "adapted", [])
        if adapted:
            log(f"adapted modules ({len(adapted)}): " + ", ".join(adapted[:6]) + (" ..." if len(adapted) > 6 else ""))

        # 4. batches (texts are tokenised here, once)
        t0 = time.perf_counter()
        datasets = {k: task.dataset(v, labels, k) for k, v in splits.items()}
        prep_s = time.perf_counter() - t0
        loaders = {k: task.loader(d, cfg.batch_size if k == "train" else cfg.eval_batch_size, train=k == "train",
                                  seed=cfg.seed) for k, d in datasets.items()}
        truncated = getattr(task, "truncated", {})
        if any(truncated.values()):
            log(f"[yellow]truncated to {task.max_length} tokens[/]: " + ", ".join(f"{k} {v}" for k, v in truncated.items() if v)
                + " text(s) (set task.max_length to change)")

        # 5. train
        head_lr = cfg.head_lr or cfg.lr
        optimizer = build_optimizer(strategy.param_groups(model, cfg.lr, head_lr, cfg.weight_decay), device)
        trainer_kwargs = dict(model=model, task=task, strategy=strategy, optimizer=optimizer, train_loader=loaders["train"],
                              val_loader=loaders["validation"], cfg=cfg, device=device, amp_dtype=amp_dtype,
                              metrics_factory=lambda: task.metrics(labels))
        callbacks = [MetricsLog(run.metrics_path, cfg.log_every),
                     BestCheckpoint(run.checkpoints, cfg.metric_for_best, cfg.minimize, cfg.save_every,
                                    cfg.keep_checkpoints, cfg.early_stopping.min_delta)]
        if cfg.early_stopping.patience:
            callbacks.append(EarlyStopping(cfg.early_stopping.patience))
        if cfg.progress:
            callbacks.append(RichProgress(console))
        trainer = Trainer(scheduler=None, callbacks=callbacks, **trainer_kwargs)
        trainer.scheduler = build_scheduler(optimizer, cfg.schedule, trainer.total_steps, cfg.warmup)
        log(f"training: {trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch), batch {cfg.batch_size}"
            f"x{cfg.grad_accum}, lr {cfg.lr:g} (head {head_lr:g}), {precision_name(amp_dtype)} on {device}")
        t0 = time.perf_counter()
        state = trainer.fit()
        train_s = time.perf_counter() - t0
        if state.stop_reason:
            log(state.stop_reason)

        # 6. best weights -> final evaluation -> saved model
        best = load_checkpoint_weights(run.checkpoints / "best", model)
        final = {"best_step": best["step"], "metric_for_best": cfg.metric_for_best,
                 "validation": trainer.evaluate(loaders["validation"], "validation")}
        if "test" in loaders:
            final["test"] = trainer.evaluate(loaders["test"], "test")
        final["labels"] = labels.names
        run.write_json("eval.json", final)
        if recipe.output.save_model:
            save_model(run.model_dir, model=model, loaded=loaded, strategy=strategy, labels=labels, task=task, recipe=recipe)
        timings = {"preprocess_s": round(prep_s, 2), "train_s": round(train_s, 2),
                   "total_s": round(time.perf_counter() - t_start, 2),
                   "train_samples_per_s": round(state.examples / max(train_s, 1e-9), 2)}
        run.update_manifest(status="completed", steps=state.step, best_step=best["step"], timings=timings,
                            task_settings=task.settings(), model_info=_info_json(loaded.info))
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        run.update_manifest(status=status, error=f"{type(err).__name__}: {err}")
        raise
    return Run(path=run.path, metrics=final, recipe=recipe, history=state.evals)


def _info_json(info) -> dict:
    return {"family": info.family, "modality": info.modality, "source": info.source,
            "layer_groups": len(info.layer_groups), "feature_dim": info.feature_dim}
