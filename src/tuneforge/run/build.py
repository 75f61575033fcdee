"""The stages that assemble a run, each a function over the :class:`~tuneforge.run.job.Job`.

Order matters only where stated: data and model are read and checked before anything is
written (a wrong path or model costs nothing and leaves no half-made run behind); the run
directory is checked and locked right after the data, before the model loads (a refusal
costs nothing either), and opens after the model; the datasets and loaders, then the
trainer, come after it, so their failures are recorded in the manifest.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..engine.callbacks import CHECKPOINT, Callback
from ..errors import TuneforgeError


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


def resolve_compute(job) -> None:
    """Device, seeds and the autocast precision."""
    from ..engine.precision import resolve_device, resolve_precision

    job.device = resolve_device(job.cfg.device)
    seed_everything(job.cfg.seed, job.cfg.deterministic)
    job.amp_dtype = resolve_precision(job.cfg.precision, job.device)


# --------------------------------------------------------------------------- data

def read_data(job) -> None:
    """The task, every split's records (validation held out from train when absent), the labels."""
    from ..data.fingerprint import file_fingerprint
    from ..data.overlap import check_overlap
    from ..data.splits import stratified_split
    from ..tasks import get_task
    from ..tasks.base import canonical_label

    from rich.markup import escape

    recipe, log = job.recipe, job.log
    job.task = task = get_task(recipe)
    if recipe.task.reference_model:  # DPO's separate reference: checked now, loaded by the task when needed
        from .artifact import reference_loader

        task.reference_source = reference_loader(recipe.task.reference_model)
    data = recipe.data
    if not data.train:
        raise TuneforgeError("data.train is not set; point it at a CSV/TSV/JSONL/Parquet file or an image folder")
    for split in ("train", "validation", "test"):
        path = getattr(data, split)
        if path is None:
            continue
        if not Path(path).exists():
            raise TuneforgeError(f"data.{split} path '{path}' does not exist (relative paths start at {Path.cwd()})")
        limit = data.max_train_rows if split == "train" else data.max_eval_rows
        job.skipped[split] = []
        # notes quote the data (field names like conversations[from=gpt]): plain text, never rich markup
        job.splits[split] = task.read(split, path, limit=limit, skipped=job.skipped[split],
                                      log=lambda note: log(escape(note)))
        job.rows[split] = len(job.splits[split])
    splits = job.splits
    if "validation" not in splits:
        def label_of(record) -> str:
            labels = task.record_labels(record)
            return canonical_label(labels[0]) if labels else ""  # "01" and "1" are one stratum

        splits["train"], splits["validation"] = stratified_split(
            splits["train"], label_of, data.validation_split, recipe.train.seed)[:2]
        log(f"validation: held out {len(splits['validation'])} of the training rows "
            f"(data.validation_split={data.validation_split}, stratified, seed {recipe.train.seed})")
    check_overlap(splits, allow=data.allow_overlap, log=log, paths={s: getattr(data, s) for s in job.rows})
    for split, items in job.skipped.items():
        if items:
            log(f"[yellow]skipped {len(items)} bad {split} record(s)[/]: " + "; ".join(map(str, items[:3]))
                + (" ..." if len(items) > 3 else ""))
    job.labels = task.label_map(splits["train"])
    for split in ("validation", "test"):  # every label known now, not when a dataset is built after the model
        for record in splits.get(split, ()):
            for value in task.record_labels(record):
                job.labels.id(value, record.where)
    log("data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " examples"
        + (f"; {job.labels.summary()}" if len(job.labels) else ""))
    job.fingerprints = {s: file_fingerprint(getattr(data, s)) for s in job.rows}


# --------------------------------------------------------------------------- model

def build_model(job) -> None:
    """Pretrained backbone -> task head -> (warm start) -> strategy -> device."""
    from ..models import load_model
    from ..strategies import describe_trainable, get_strategy

    from ..engine.progress import quiet_library_bars

    recipe, task, log = job.recipe, job.task, job.log
    t0 = time.perf_counter()
    job.on_exit(quiet_library_bars(job.console))  # no tqdm bars in a log: loading and saving weights
    m = recipe.model
    job.loaded = loaded = load_model(m.name, source=m.source, weights=m.weights, key_map=m.key_map,
                                     trust_remote_code=m.trust_remote_code, load_in_4bit=m.load_in_4bit,
                                     causal_lm=task.generative or task.needs_lm_head)
    if loaded.info.modality != task.modality:
        raise TuneforgeError(
            f"model '{m.name}' is a {loaded.info.modality} model but task.type is {recipe.task.type}; "
            f"pick a {task.modality} model (see `tuneforge models`) or change task.type")
    task.attach(loaded, log=log)
    model = task.build_model(loaded, job.labels)
    if job.init_from:
        from .resume import warm_start

        job.warm_start = warm_start(model, job.init_from, job.labels, log)
    strategy = get_strategy(recipe.strategy)
    if strategy.chooses:  # `auto`: pick a concrete strategy from the facts of this run
        job.decision = strategy.decide({
            "train_examples": len(job.splits["train"]), "classes": len(job.labels.names), "device": str(job.device),
            "parameters": sum(p.numel() for p in model.parameters()), "modality": loaded.info.modality,
            "train": recipe.train.model_dump()})
        log(f"auto: {job.decision['paragraph']}")
        strategy = get_strategy(job.decision["options"])
    job.strategy = strategy
    model = strategy.apply(model, loaded.info)
    limit = strategy.max_text_tokens
    if limit and task.max_length and task.max_length > limit:
        log(f"task.max_length lowered from {task.max_length} to {limit}: strategy {strategy.name}'s virtual tokens "
            "use the rest of the model's positions")
        task.max_length = limit
    job.model = model.to(job.device)
    _keep_fp32_where_faster(job)
    log(f"model: {m.name} ({loaded.info.family}, {loaded.info.modality}) loaded in {time.perf_counter() - t0:.1f}s; "
        f"strategy {strategy.name}: {describe_trainable(model)}")
    adapted = strategy.adapted
    if adapted:
        log(f"adapted modules ({len(adapted)}): " + ", ".join(adapted[:6]) + (" ..." if len(adapted) > 6 else ""))


def _keep_fp32_where_faster(job) -> None:
    """``precision: auto`` on CPU keeps models with depthwise convolutions in fp32 (measured faster)."""
    from ..engine.precision import has_depthwise_conv

    if job.cfg.precision == "auto" and job.device.type == "cpu" and job.amp_dtype is not None \
            and has_depthwise_conv(job.model):
        job.amp_dtype = None
        job.log("precision: fp32 (auto): this model's depthwise convolutions train slower in bf16 than in fp32 on "
                "CPU; train.precision: bf16 forces bf16")


# --------------------------------------------------------------------------- run directory

def check_run_dir(job, lock: bool = True) -> None:
    """Where the run goes, checked before the model loads (a refusal costs nothing) and locked
    for this process until the run ends, however it ends: a new run may not go into a directory
    that holds another run (without --overwrite) or lies inside one; a resumed run must be the
    same run, unfinished, not trained by a live process, with a valid checkpoint.

    ``lock=False`` (``tuneforge validate``): a new run's refusals only; nothing is created,
    locked or tidied, and ``job.run`` stays unset (a default ``runs/<name>-<stamp>`` is always free)."""
    from .resume import check_resumable, check_same_run, find_run_to_resume
    from .rundir import RunDir, check_output_dir, default_run_dir

    recipe = job.recipe
    if not lock:
        if job.resume:
            raise TuneforgeError("a resumed run is checked under its lock (check_run_dir(job, lock=True))")
        if recipe.output.dir:
            check_output_dir(Path(recipe.output.dir), _overwrite(job))
        return
    if job.resume:
        run = RunDir(find_run_to_resume(job.resume, recipe, job.origin))
        _lock(job, run, "resume")
        check_same_run(run.path, recipe, job.fingerprints)
        job.checkpoint = check_resumable(run.path, job.log)
    elif recipe.output.dir:
        path = Path(recipe.output.dir)
        check_output_dir(path, _overwrite(job))  # at once: nothing written, nothing locked
        run = RunDir(path)
        _lock(job, run, "train")
        check_output_dir(path, _overwrite(job))  # again under the lock: a run started meanwhile has it now
    else:
        run = _fresh_default(job, default_run_dir(recipe, job.origin))
    job.run = run


def _fresh_default(job, path: Path):
    """No output.dir: runs/<name>-<stamp>, or -2, -3 ... when a run started in the same second has it."""
    from .rundir import RunBusy, RunDir, check_output_dir

    for n in range(1, 100):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        if candidate.exists() and any(candidate.iterdir()):
            continue
        run = RunDir(candidate)
        try:
            _lock(job, run, "train")
        except RunBusy:
            continue
        try:
            check_output_dir(candidate, False)
            return run
        except TuneforgeError:
            if run.lock is not None:
                run.lock.release()
    raise TuneforgeError(f"no free run directory next to {path}; set output.dir")


def _overwrite(job) -> bool:
    return job.recipe.output.overwrite if job.overwrite is None else job.overwrite


def _lock(job, run, purpose: str) -> None:
    from .rundir import RunLock, describe_holder, is_main_process

    if not is_main_process():
        return  # one lock per run: rank 0's (the others of a multi-process run write nothing)
    run.lock = RunLock(run.path).acquire(purpose)
    job.on_exit(run.lock.release)  # registered first, so undone last: the directory stays ours to the end
    if run.lock.stale:
        job.log(f"{run.path}: its last holder is gone ({describe_holder(run.lock.stale)}); lock taken over")


def open_run_dir(job) -> None:
    """The run directory :func:`check_run_dir` chose and locked: a new one gets its recipe and
    manifest (with --overwrite the old run is set aside until this one has a checkpoint); a
    resumed one records that it runs again."""
    from ..engine.precision import precision_name
    from .provenance import record
    from .rundir import prepare_run_dir, previous_of, process_record, settle_previous

    recipe, log, run = job.recipe, job.log, job.run
    if job.resume:
        run.load_manifest()
        resumed = run.manifest.get("resumed", []) + [{"from": job.checkpoint.name, "argv": job.argv or sys.argv}]
        run.update_manifest(status="running", resumed=resumed, error=None, **process_record())
        log(f"resume: continuing {run.path} exactly from {job.checkpoint.name}")
    else:
        prepare_run_dir(run.path, _overwrite(job), log)
        backup = previous_of(run.path)
        run.previous = backup if backup.exists() else None  # the run this one replaces, until its first checkpoint
        if run.previous is not None:
            job.on_exit(lambda: settle_previous(run.path, run.previous, log))
        precision = precision_name(job.amp_dtype)
        run.write_recipe(recipe)
        run.start_manifest(recipe, job.argv, job.device, precision)
        run.update_manifest(data={s: {**job.fingerprints[s], "rows_read": n} for s, n in job.rows.items()},
                            examples={k: len(v) for k, v in job.splits.items()},
                            skipped={k: [str(x) for x in v] for k, v in job.skipped.items() if v},
                            init_from=job.init_from)
        run.update_manifest(reproducibility=record(recipe, origin=job.origin, argv=job.argv, device=job.device,
                                                   precision=precision, source=job.loaded.info.source,
                                                   init_from=job.init_from))
    if job.decision is not None:
        run.update_manifest(strategy_decision={k: v for k, v in job.decision.items() if k != "options"})


# --------------------------------------------------------------------------- batches

def build_data(job) -> None:
    """Datasets (texts tokenised here, once) and plain loaders; the task's preparation that needs
    the untrained model (DPO's reference log-probs). Cache speed-ups replace loaders afterwards."""
    task, cfg = job.task, job.cfg
    t0 = time.perf_counter()
    job.datasets = {k: task.dataset(v, job.labels, k) for k, v in job.splits.items()}
    job.loaders = {k: task.loader(d, cfg.batch_size if k == "train" else cfg.eval_batch_size, train=k == "train",
                                  seed=cfg.seed) for k, d in job.datasets.items()}
    job.add_time("preprocess_s", time.perf_counter() - t0)
    truncated = task.truncated
    if any(truncated.values()):
        job.log(f"[yellow]truncated to {task.max_length} tokens[/]: "
                + ", ".join(f"{k} {v}" for k, v in truncated.items() if v) + " text(s) (set task.max_length to change)")


def prepare_task(job) -> None:
    """The task's own preparation before the first step, with the untrained weights (DPO's reference)."""
    t0 = time.perf_counter()
    job.task.before_training(job.model, job.datasets, job.device, job.autocast, job.run.path, job.log)
    job.add_time("preprocess_s", time.perf_counter() - t0)


# --------------------------------------------------------------------------- the trainer

def build_trainer(job) -> None:
    """Optimizer (parameter groups by layer group), schedule, callbacks -> the Trainer, complete."""
    from ..engine.callbacks import BestCheckpoint, EarlyStopping, MetricsLog, ResumeCheckpoint
    from ..engine.mfu import MFU
    from ..engine.optim import build_optimizer, build_scheduler, schedule_curve
    from ..engine.plan import TrainPlan
    from ..engine.precision import precision_name
    from ..engine.progress import progress_callback
    from ..engine.trainer import Trainer
    from ..strategies.base import describe_lrs, param_groups

    recipe, cfg, run, strategy, log = job.recipe, job.cfg, job.run, job.strategy, job.log
    groups = param_groups(job.model, job.loaded.info, cfg, strategy.will_train(job.model))
    optimizer = build_optimizer(groups, job.device)
    log(describe_lrs(groups, job.loaded.info))
    run.update_manifest(parameters={"trainable": sum(p.numel() for g in groups for p in g["params"]),
                                    "total": sum(p.numel() for p in job.model.parameters())},
                        param_groups=[{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                                       "parameters": sum(p.numel() for p in g["params"])} for g in groups])
    # The step counts first: the schedule and the strategy's callbacks are built from them.
    # Callbacks declare their order (engine/callbacks.py), so the list order here is free.
    plan = TrainPlan.of(job.loaders["train"], cfg)
    job.mfu = MFU(job.device, job.amp_dtype or torch.float32)
    callbacks = [job.mfu, MetricsLog(run.metrics_path),
                 BestCheckpoint(run.checkpoints, cfg.metric_for_best, cfg.minimize, cfg.early_stopping.min_delta),
                 ResumeCheckpoint(run.checkpoints, cfg.save_every, cfg.keep_checkpoints),
                 *strategy.callbacks(plan, log), *job.task.callbacks(plan, log), *job.callbacks]
    if recipe.output.loggers:
        from ..evaluation.loggers import build_loggers

        callbacks += build_loggers(recipe.output.loggers, run.path, recipe)
    if cfg.early_stopping.patience:
        callbacks.append(EarlyStopping(cfg.early_stopping.patience))
    # a bar on a terminal; plain lines in a log or with train.progress: false (the evaluations always)
    callbacks.append(progress_callback(job.console, log, cfg.progress))
    if run.previous is not None:
        callbacks.append(_DropPrevious(run))  # sees the checkpoints this step wrote (its order)
    if recipe.retain.data:
        callbacks.append(_retain_monitor(job))
    scheduler = build_scheduler(optimizer, cfg.schedule, plan.total_steps, cfg.warmup,
                                wrap=lambda fn: strategy.wrap_schedule(fn, plan))
    run.update_manifest(lr_schedule=schedule_curve(scheduler, plan.total_steps))  # the report draws every step
    labels, task = job.labels, job.task
    job.trainer = trainer = Trainer(
        model=job.model, task=task, optimizer=optimizer, scheduler=scheduler, train_loader=job.loaders["train"],
        val_loader=job.loaders["validation"], cfg=cfg, device=job.device, amp_dtype=job.amp_dtype,
        metrics_factory=lambda: task.metrics(labels), callbacks=callbacks, plan=plan,
        train_mode=strategy.set_train_mode, prepare_batch=job.batch_layout)
    log(f"training: {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), batch {cfg.batch_size}"
        f"x{cfg.grad_accum}, {precision_name(job.amp_dtype)} on {job.device}")
    if job.checkpoint is not None:
        from ..engine.checkpoint import load_resumable, restore_rng

        trainer.restore(load_resumable(job.checkpoint, job.model, trainer.optimizer, trainer.scheduler, trainer.scaler))
        restore_rng(job.checkpoint)  # last: nothing may consume randomness between here and the loop


class _DropPrevious(Callback):
    """--overwrite: the run set aside goes as soon as this one has written its first checkpoint."""

    order = CHECKPOINT + 1  # after the resumable checkpoint of the same step is written

    def __init__(self, run):
        self.run = run

    def on_step_end(self, trainer) -> None:
        from .rundir import drop_previous

        if self.run.previous is not None and drop_previous(self.run.path, self.run.previous):
            self.run.previous = None

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self.on_step_end(trainer)


def _retain_monitor(job):
    """retain.data: forgetting measured at every evaluation; with retain.head_from, the earlier
    run's head (loaded here, from its saved model) scores its own data on the current backbone."""
    from ..evaluation.forgetting import RetainMonitor

    head = None
    if job.recipe.retain.head_from:
        from .artifact import load_head

        head = load_head(job.recipe.retain.head_from)
    return RetainMonitor(job.task, job.recipe, job.run.path / "retain_reference.pt", head=head)
