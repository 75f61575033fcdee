"""Saving the final model into ``<run>/model`` and loading it back for prediction.

Layout (``tuneforge.json`` says which applies; the strategy's declared ``saved_layout``
chooses):
- ``plain``, HF backbone (full / partial / gradual-unfreeze): ``backbone/`` is a Hugging Face
  model directory (config, safetensors weights, tokenizer) + ``head.safetensors``
  (``hf-backbone+head``); a timm backbone: ``model.safetensors`` + the timm architecture name
  (``full-state``);
- ``peft`` (LoRA / IA3): ``adapter/`` as written by ``peft`` (loads with
  ``PeftModel.from_pretrained`` on the same base) + the base model reference; with
  ``output.merge`` the update is folded in and the model is saved plainly;
- ``trainable`` (linear-probe, adapters, bitfit, prompt / prefix tuning): ``trainable.safetensors``
  (only the tensors that trained, by name) + the strategy's options + the base model reference
  (``base+trainable``); loading rebuilds the base, re-applies the strategy and fills in the
  trained tensors. A warm-started run (``--init-from``) of a strategy whose model is the plain
  architecture (linear-probe, bitfit) is saved ``plain``: its frozen weights are another run's,
  not the referenced base's.
- a warm-started ``peft`` or ``trainable`` run (LoRA from an SFT run: the usual DPO set-up) saves
  only what it trained, but its frozen weights are the *source run's*, not the base's:
  ``warm_start`` records the source's model directory and its sha256 (``file_fingerprint``), and
  loading rebuilds the base, copies the source's weights in (checked against that sha256 first)
  and only then applies the adapter — the order training used. A source that changed or went
  away before the model was saved cannot be referenced: the whole model state is saved instead
  (``warm_start.state``), so the run's result is never lost.
Plus ``labels.json`` (label map) and the task's preprocessing settings. Models saved before
linear-probe declared ``trainable`` (``hf-backbone+head`` / ``full-state``) load as they did.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import TuneforgeError

FORMAT_VERSION = 1


def save_model(directory: Path, *, model, loaded, strategy, labels, task, recipe, merged: dict | None = None,
               warm_start: dict | None = None) -> Path:
    """``merged``: the report of ``merge_and_check`` when ``model`` is an already merged plain model.
    ``warm_start``: the model started from another run's weights (``--init-from``), not the base's:
    :func:`copy_run_weights`'s record of the source.

    Written into ``.<name>.tmp`` beside ``directory`` and renamed into place at the end: a full
    disk or a crash leaves no half-saved model under the real name, and no partial copy at all
    (a failed write removes it: left behind, it kept a full disk full)."""
    import shutil

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_model(tmp, model=model, loaded=loaded, strategy=strategy, labels=labels, task=task, recipe=recipe,
                     merged=merged, warm_start=warm_start)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)
    return directory


def _write_model(directory: Path, *, model, loaded, strategy, labels, task, recipe, merged: dict | None,
                 warm_start: dict | None) -> None:
    info = loaded.info
    meta = {
        "format_version": FORMAT_VERSION,
        "task": recipe.task.model_dump(mode="json"),
        "modality": info.modality,
        "family": info.family,
        "feature_dim": info.feature_dim,
        "strategy": strategy.name,  # the concrete one (`auto` records what it chose)
        "base_model": recipe.model.model_dump(mode="json"),
        "base_spec": info.spec,
        "task_settings": task.settings(),
    }
    layout = "plain" if merged else strategy.saved_layout
    if layout == "trainable" and warm_start and strategy.plain_export:
        layout = "plain"  # the untrained weights are the warm start's: a reference to the base would lose them
    if merged:
        meta["merged"] = merged
    if warm_start and layout in ("peft", "trainable"):
        meta["warm_start"] = _warm_start_meta(warm_start, model, directory)
    if layout == "peft":
        model.save_pretrained(str(directory / "adapter"))
        meta["layout"] = "peft-adapter"
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(directory / "tokenizer"))
    elif layout == "trainable":
        from ..strategies.base import trainable_tensors

        save_file(trainable_tensors(model), str(directory / "trainable.safetensors"))
        meta["layout"] = "base+trainable"
        meta["strategy_options"] = strategy.options.model_dump(mode="json")  # the concrete one (auto's choice)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(directory / "tokenizer"))
    elif task.needs_lm_head:
        # the model is the whole *ForCausalLM (decoder + LM head): it loads with AutoModelForCausalLM on its own
        model.lm.save_pretrained(str(directory / "backbone"), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(directory / "backbone"))
        meta["layout"] = "hf-causal-lm"
    elif info.spec.get("kind") == "hf":
        model.backbone.save_pretrained(str(directory / "backbone"), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(directory / "backbone"))
        save_file({k: v.detach().contiguous().cpu() for k, v in model.task_head.state_dict().items()},
                  str(directory / "head.safetensors"))
        meta["layout"] = "hf-backbone+head"
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        meta["layout"] = "full-state"
    labels.save(directory / "labels.json")
    (directory / "tuneforge.json").write_text(json.dumps(meta, indent=2))


def _load_base(meta: dict, directory: Path):
    from ..models import load_model

    layout = meta["layout"]
    causal_lm = bool(meta.get("base_spec", {}).get("causal_lm"))
    if layout in ("hf-backbone+head", "hf-causal-lm"):
        return load_model(str(directory / "backbone"), source="hf", causal_lm=causal_lm)
    if layout == "full-state":
        spec = meta["base_spec"]
        return load_model(spec["arch"], source="timm", pretrained=False)
    base = meta["base_model"]  # a peft adapter or trained tensors: rebuild the same pretrained base
    try:
        return load_model(base["name"], source=base["source"], weights=base["weights"], key_map=base["key_map"],
                          trust_remote_code=base["trust_remote_code"], causal_lm=causal_lm,
                          load_in_4bit=base.get("load_in_4bit", False))
    except TuneforgeError as err:
        where = base["weights"] or base["name"]
        raise TuneforgeError(
            f"{directory} holds only what its run trained (strategy {meta['strategy']}) and a reference to its base "
            f"model '{where}', which does not load now: {err} — put the base model back where the run found it "
            "(a plain copy of a trained model comes from `tuneforge export RUN --format safetensors` while its base "
            "is there)") from None


WARM_STATE_FILE = "warm_start_state.safetensors"


def _model_dir(path) -> Path:
    path = Path(path)
    return path / "model" if (path / "model" / "tuneforge.json").exists() else path


def copy_run_weights(model, run_dir, labels, *, where: str) -> dict:
    """Copy a saved run's final weights (a LoRA/IA3 run's adapter merged in) into ``model``, a
    freshly built model of the same architecture *before* its strategy is applied (a warm
    start); -> ``{"model": its model directory, "sha256": of that directory, "tensors",
    "same_labels"}``, which a saved adapter run records to be rebuilt on the same weights."""
    from ..data.fingerprint import file_fingerprint
    from ..strategies.base import merged_module

    source_dir = _model_dir(run_dir)
    digest = file_fingerprint(source_dir)["sha256"] if source_dir.is_dir() else None  # the files that are read
    source, _, source_labels, _ = load_model_dir(source_dir)
    state = merged_module(source).state_dict()  # a LoRA run: its adapter folded into the weights
    same_labels = labels is None or source_labels.names == labels.names
    if not same_labels:
        state = {k: v for k, v in state.items() if not k.startswith("task_head.")}
    target = model.state_dict()
    mismatched = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        raise TuneforgeError(f"{where}: its model does not match this recipe's "
                             f"({', '.join(mismatched[:3])} differ in shape); use the same model.name")
    foreign = [k for k in state if k not in target]
    if foreign:
        # adapters / prompt or prefix tuning: weights outside the base architecture, which a
        # warm start (before the strategy is applied) would drop without a word
        raise TuneforgeError(f"{where}: its model holds weights the base model has no place for "
                             f"({', '.join(foreign[:3])}), e.g. adapters or virtual tokens, so they cannot seed a "
                             "new run; warm-start from a full, partial, bitfit, lora or ia3 run instead")
    model.load_state_dict(state, strict=False)
    return {"model": str(source_dir.resolve()), "sha256": digest, "tensors": len(state), "same_labels": same_labels}


def _warm_start_meta(warm: dict, model, directory: Path) -> dict:
    """The source of a warm-started adapter run, checked now: unchanged, a reference (sha256 kept);
    changed or gone since the run read it, the whole model state is written beside the adapter."""
    from ..data.fingerprint import file_fingerprint

    source = Path(warm["model"])
    now = file_fingerprint(source)["sha256"] if source.is_dir() else None
    meta = {"model": warm["model"], "sha256": warm["sha256"]}
    if now is None or now != warm["sha256"]:
        # a clone per tensor: tied weights (embeddings = LM head) share storage, which save_file refuses
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
                  str(directory / WARM_STATE_FILE))
        meta["state"] = WARM_STATE_FILE
        meta["why"] = f"{source} {'is gone' if now is None else 'changed'} since this run started from it"
    return meta


def _follow_warm_start(model, warm: dict, labels, directory: Path) -> None:
    """Before the adapter goes on: the source run's weights, as training had them."""
    from ..data.fingerprint import file_fingerprint

    source = Path(warm["model"])
    fix = (f"put that run back where it was, or retrain; `tuneforge export {directory.parent} --format safetensors` "
           "makes a self-contained copy while the source is there")
    if not source.is_dir():
        raise TuneforgeError(f"{directory} was warm-started from {source} and keeps only what it trained on top; "
                             f"that run is gone — {fix}")
    if file_fingerprint(source)["sha256"] != warm["sha256"]:
        raise TuneforgeError(f"{directory} was warm-started from {source}, which changed since (its sha256 differs "
                             f"from the one recorded), so its adapter would sit on other weights — {fix}")
    copy_run_weights(model, source, labels, where=f"{directory} (warm-started from {source})")


def load_model_dir(directory: Path):
    """-> (model in eval mode, task, labels, meta)."""
    from ..recipe import recipe_from_dict, task_block_from_saved
    from ..tasks import LabelMap, get_task

    directory = _model_dir(directory)
    meta_path = directory / "tuneforge.json"
    if not meta_path.exists():
        raise TuneforgeError(
            f"'{directory}' is not a tuneforge run or model directory (no model/tuneforge.json); "
            "pass the run directory printed by `tuneforge train`"
        )
    meta = json.loads(meta_path.read_text())
    labels = LabelMap.from_json(json.loads((directory / "labels.json").read_text()))
    # models saved before each task owned its options hold every task's fields: keep the task's own
    task_block = task_block_from_saved(meta["task"])
    recipe = recipe_from_dict({"task": task_block, "model": meta["base_model"], "strategy": {"name": meta["strategy"]}})
    task = get_task(recipe)
    if recipe.task.reference_model:  # DPO against a separate reference: `tuneforge eval` loads it when needed
        task.reference_source = reference_loader(recipe.task.reference_model)
    loaded = _load_base(meta, directory)
    task.attach(loaded)
    task.restore(meta.get("task_settings", {}))  # what the task decided while training: lengths, template, sizes
    model = task.build_model(loaded, labels)
    warm = meta.get("warm_start")
    if warm and not warm.get("state"):
        _follow_warm_start(model, warm, labels, directory)
    layout = meta["layout"]
    if layout == "hf-backbone+head":
        model.task_head.load_state_dict(load_file(str(directory / "head.safetensors")))
    elif layout == "full-state":
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
    elif layout == "hf-causal-lm":
        pass  # the saved directory is the whole fine-tuned model
    elif layout == "base+trainable":
        model = _reapply_strategy(model, loaded, meta, directory)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(directory / "adapter"))
    if warm and warm.get("state"):  # the source was gone or changed when this run saved: its whole state
        model.load_state_dict(load_file(str(directory / warm["state"])))
    model.eval()
    return model, task, labels, meta


def _reapply_strategy(model, loaded, meta: dict, directory: Path):
    """Rebuild a parameter-efficient run: the same strategy on the same base, then its trained tensors."""
    from ..strategies import get_strategy, options_class

    options = options_class(meta["strategy"]).model_validate(meta["strategy_options"])
    model = get_strategy(options).apply(model, loaded.info)
    state = load_file(str(directory / "trainable.safetensors"))
    _, unexpected = model.load_state_dict(state, strict=False)
    absent = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if unexpected or absent:
        raise TuneforgeError(f"{directory / 'trainable.safetensors'} does not fit the rebuilt {meta['strategy']} model "
                             f"(unexpected: {', '.join(unexpected[:3]) or 'none'}; missing: {', '.join(absent[:3]) or 'none'}); "
                             "was the base model changed since the run? Retrain, or restore the base model")
    return model


def reference_loader(spec: str, *, where: str = "task.reference"):
    """A separate reference model (DPO's ``task.reference``): a run directory, whose final model
    is used with its adapters merged, or a model directory/alias. Checked now (before anything is
    written), loaded only when called: -> ``() -> (CausalLM, tokenizer, what it is)``."""
    from ..models.loader import _resolve_source

    path = Path(spec)
    if (path / "tuneforge.json").exists() or (path / "model" / "tuneforge.json").exists():
        return lambda: _reference_from_run(path, where)
    if path.exists() and not (path / "config.json").exists():
        raise TuneforgeError(f"{where} {spec!r} is neither a tuneforge run (no model/tuneforge.json) nor a Hugging "
                             "Face model directory (no config.json); give the SFT run's directory, or a model "
                             "directory or alias sharing model.name's tokenizer")
    try:
        _resolve_source(spec)
    except TuneforgeError as err:
        raise TuneforgeError(f"{where} {spec!r}: {err}") from None
    return lambda: _reference_from_model(spec, where)


def _reference_from_run(path: Path, where: str):
    from ..strategies.base import merged_module

    model, task, _, meta = load_model_dir(path)
    if not task.generative:
        raise TuneforgeError(f"{where} {str(path)!r} is a {meta['task']['type']} run; a reference model is a causal "
                             "LM: give a causal-lm or preference run (e.g. the SFT run)")
    return merged_module(model), task.tokenizer, f"the model of run {path} (adapters merged)"


def _reference_from_model(spec: str, where: str):
    from ..llm.model import CausalLM
    from ..models import load_model

    try:
        loaded = load_model(spec, causal_lm=True)
    except TuneforgeError as err:
        raise TuneforgeError(f"{where} {spec!r}: {err}") from None
    return CausalLM(loaded.backbone, loaded.lm_head, loaded.lm), loaded.tokenizer, f"model {spec}"


def load_head(run_dir) -> tuple:
    """``(task head module, LabelMap)`` of a saved classification run (retain.head_from)."""
    from ..strategies.base import merged_module

    model, _, labels, _ = load_model_dir(Path(run_dir))
    return merged_module(model).task_head, labels  # LoRA/IA3: the head is peft's modules_to_save copy
