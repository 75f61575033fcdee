"""The stages after training: best weights back, final evaluation, the task's own evaluation
(generation), forgetting, the optional merge, the saved model, the manifest and the report."""

from __future__ import annotations

import time
from pathlib import Path


def finish(job) -> None:
    """Best weights -> final evaluation -> saved model; ``job.final`` holds what eval.json does."""
    from ..engine.checkpoint import load_best_weights
    from .artifact import save_model

    recipe, trainer, run, log = job.recipe, job.trainer, job.run, job.log
    best = load_best_weights(run.checkpoints, job.model, report=log)  # its sha256 checked first
    final = job.final = {"best_step": best["step"], "metric_for_best": recipe.train.metric_for_best,
                         "validation": trainer.evaluate(job.loaders["validation"], "validation")}
    start = next((e for e in trainer.state.evals if e["step"] == 0), None)  # train.eval_before
    if start is not None:
        final["before"] = {k: v for k, v in start.items() if k != "step"}
    if "test" in job.loaders:
        final["test"] = trainer.evaluate(job.loaders["test"], "test")
    final["labels"] = job.labels.names
    generation = job.task.after_training(job.model, job.splits, run, job.device, job.autocast, log)
    if generation:  # causal-lm: generation on held-out prompts (with train.eval_before, before and after)
        final["generation"] = generation
    if start is not None:
        for line in before_after(final, recipe.train.minimize):
            log(line)
    for cb in trainer.callbacks:
        summary = cb.summary(final["best_step"])
        if summary is not None:  # forgetting (retain.data)
            final["forgetting"] = summary
    for split in ("validation", "test"):
        if split in final:
            name_examples(final[split].get("confidently_wrong", []), job.splits[split])
    merged = None
    if recipe.output.merge:
        job.model, merged = merge(job)
        final["merge"] = merged
    run.write_json("eval.json", final)
    if recipe.output.save_model:
        save_model(run.model_dir, model=job.model, loaded=job.loaded, strategy=job.strategy, labels=job.labels,
                   task=job.task, recipe=recipe, merged=merged, warm_start=job.warm_start)


def before_after(final: dict, minimize: bool) -> list[str]:
    """The summary of ``train.eval_before``: validation metric_for_best and loss from the starting
    weights to the saved (best) ones, the generation scores likewise, and a plain warning when
    training never beat the start (the saved model is still the best trained step: the starting
    weights are a baseline, not a candidate; engine/callbacks.py)."""
    metric, before, after = final["metric_for_best"], final["before"], final["validation"]
    names = [k for k in dict.fromkeys((metric, "loss", "perplexity", "accuracy"))
             if isinstance(before.get(k), (int, float)) and isinstance(after.get(k), (int, float))]
    lines = [f"validation before -> after (starting weights -> best step {final['best_step']}): "
             + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in names)]
    gen = final.get("generation") or {}
    if "before" in gen:
        lines.append("generation before -> after (greedy, " + f"{gen['prompts']} held-out prompts): " + ", ".join(
            f"{k} {gen['before']['greedy'][k]:g} -> {v:g}" for k, v in gen["greedy"].items()
            if k in gen["before"]["greedy"]))
        for group, scores in (gen.get("groups") or {}).items():
            was = (gen["before"].get("groups") or {}).get(group)
            if was:
                lines.append(f"generation ({group}) before -> after ({scores['prompts']} prompts, greedy): " + ", ".join(
                    f"{k} {was['greedy'][k]:g} -> {v:g}" for k, v in scores["greedy"].items() if k in was["greedy"]))
    b, a = before.get(metric), after.get(metric)
    if isinstance(b, (int, float)) and isinstance(a, (int, float)) and not (a < b if minimize else a > b):
        lines.append(f"[yellow]training did not improve validation {metric} on the starting weights ({b:.4f} before, "
                     f"{a:.4f} at the best step {final['best_step']}); the saved model is that trained step, not the "
                     "start — lower train.lr, train longer or check the data[/]")
    return lines


def merge(job):
    """output.merge: fold the adapter into the weights, checked on up to 16 validation examples."""
    from ..modalities import modality_of
    from ..strategies.merge import merge_and_check

    batch = next(iter(job.loaders["validation"]))
    keys = modality_of(job.task.modality).model_inputs
    inputs = {k: batch[k][:16].to(job.device) for k in keys if k in batch}
    tolerance = job.recipe.output.merge_tolerance
    merged, report = merge_and_check(job.model, inputs, tolerance)
    job.log(f"merge: max |merged - unmerged| logit = {report['max_abs_logit_diff']:.3g} on {report['examples']} "
            f"validation examples (logits up to {report['logit_scale']:.3g}; tolerance {tolerance:g} x max(1, |logit|), "
            "fp32): ok")
    return merged, report


def name_examples(wrong: list[dict], records: list) -> None:
    """Give each confidently-wrong example its input (text, or image path) and row, for the report."""
    for item in wrong:
        record = records[item["index"]]
        item["where"] = record.where
        if "text" in record.values:
            item["text"] = str(record.values["text"])[:500]
        if "span" in item and "tokens" in record.values:  # a tagger's wrong span: its words marked in the sentence
            words, (a, b) = list(record.values["tokens"]), item["span"]
            item["text"] = " ".join(words[:a] + ["[[" + " ".join(words[a:b]) + "]]"] + words[b:])[:500]
        if isinstance(record.values.get("image"), str):  # a path (parquet may hold raw bytes: left out)
            item["image"] = record.values["image"]


def record_completion(job, train_s: float) -> None:
    """Timings, throughput and what the run was, into the manifest: status completed."""
    from ..engine.throughput import peak_memory, speed
    from ..evaluation.parameters import parameter_summary

    state, mfu = job.state, job.mfu
    mfu.remeasure_peak()  # outside the timed training
    eval_s = sum(e.get("eval_seconds", 0.0) for e in state.evals)
    # throughput over training time without the evaluations inside it
    counts = (train_s - eval_s, state.examples, state.tokens, state.positions)
    timings = {"preprocess_s": round(job.timings.get("preprocess_s", 0.0), 2), "train_s": round(train_s, 2),
               "eval_in_train_s": round(eval_s, 2), "total_s": round(time.perf_counter() - job.started, 2),
               **speed(*counts), **mfu.figures(*counts), **peak_memory(job.device),
               "matmul_peak_flops": mfu.peak_flops,
               "train_flops_per_" + ("token" if state.positions else "example"): mfu.flops_per_unit}
    job.log("speed: " + ", ".join(f"{k} {v}" for k, v in timings.items() if k in (
        "samples_per_s", "tokens_per_s", "padding_fraction", "mfu", "peak_rss_mb")))
    job.run.update_manifest(status="completed", steps=state.step, best_step=job.final["best_step"], timings=timings,
                            task_settings=job.task.settings(), model_info=info_json(job.loaded.info),
                            skipped_nonfinite=state.skipped_nonfinite, speedups=job.speedups,
                            parameters=parameter_summary(job.model, job.loaded.info.layer_groups))


def drop_resumable(job) -> None:
    """A completed run keeps ``best`` (the weights of its model) but not the periodic checkpoints
    with their optimizer state (twice the trainable weights, per checkpoint), unless
    ``output.keep_resumable``: there is nothing left to resume."""
    import shutil

    run = job.run
    if job.recipe.output.keep_resumable or not run.checkpoints.is_dir():
        return
    stale = sorted(run.checkpoints.glob("step-*"))
    size = sum(f.stat().st_size for d in stale for f in d.rglob("*") if f.is_file())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        job.log(f"dropped {len(stale)} resumable checkpoint(s) ({size / 2**20:.0f} MB): the run is complete "
                "(output.keep_resumable: true keeps them)")
    run.update_manifest(resumable=False)


def write_report(path: Path, log) -> None:
    """A report failure never costs a finished run: the model and eval.json are already saved."""
    from ..evaluation.report import write_report as write

    t0 = time.perf_counter()
    try:
        log(f"report: {write(path)} ({time.perf_counter() - t0:.1f}s)")
    except Exception as err:  # noqa: BLE001 - any failure here is reported, never raised
        log(f"[yellow]warning: the report could not be written ({type(err).__name__}: {err}); the run is complete "
            f"— try again with `tuneforge report {path}`[/]")


def info_json(info) -> dict:
    return {"family": info.family, "modality": info.modality, "source": info.source,
            "layer_groups": len(info.layer_groups), "feature_dim": info.feature_dim}
