"""A fine-tuning job request -> the recipe its run gets, and a job row -> OpenAI's ``fine_tuning.job``.

OpenAI's hyperparameters map onto the recipe like this (``docs/service.md`` has the table):

    n_epochs                  train.epochs                   auto: 3
    batch_size                train.batch_size               auto: min(8, training examples)
    learning_rate_multiplier  train.lr = BASE_LR x value     auto: 1 (BASE_LR per method and strategy below)
    beta (dpo)                task.beta                      auto: 0.1
    seed                      train.seed                     absent: a random one, returned in the job

A supervised job trains a ``causal-lm`` task on the chat examples (loss on every assistant
message: ``task.train_on: completion``), a dpo job a ``preference`` task (``loss: dpo``), both
with LoRA unless the ``tuneforge`` extension says otherwise. The extension object is either
``{"recipe": {...}}`` (a whole recipe: how every other task is submitted) or ``{"overrides":
{"train.max_steps": 4, ...}}`` (dotted keys, or ``["key=value", ...]``), or both; it is
validated by the Recipe schema itself. What it may not do: name code to run
(``model.key_map``, ``model.trust_remote_code``), choose where the run writes (``output.dir``,
``output.loggers``), or name a file or a model by path — data comes from uploaded files
(``file-...`` ids), models from the server's model list, ``retain.head_from`` from the
project's own finished jobs (``ftjob-...``).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import random
from pathlib import Path

from ..errors import TuneforgeError

BASE_LR = {("supervised", "lora"): 2e-4, ("supervised", "other"): 2e-5,
           ("dpo", "lora"): 5e-5, ("dpo", "other"): 5e-6,
           ("task", "lora"): 5e-4, ("task", "other"): 5e-5}
DEFAULT_EPOCHS = 3
AUTO_BATCH_MAX = 8
CREATE_FIELDS = ("model", "training_file", "validation_file", "suffix", "seed", "metadata", "method", "hyperparameters",
                 "integrations", "tuneforge")
# Recipe keys a request may not set: code to run, or where the run writes.
FORBIDDEN = {"model.key_map": "names code to run", "model.trust_remote_code": "lets a model directory run its own code",
             "model.source": "is decided by the server", "output.dir": "is the job's own run directory",
             "output.loggers": "writes outside the run directory", "output.overwrite": "is decided by the server"}
FILE_KEYS = ("data.train", "data.validation", "data.test", "retain.data")
LLM_TASKS = ("causal-lm", "preference")


class BadRequest(TuneforgeError):
    """A request the API answers with 400: ``param`` names the field (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request_error", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def check_fields(body: dict) -> None:
    unknown = [k for k in body if k not in CREATE_FIELDS]
    if unknown:
        near = difflib.get_close_matches(unknown[0], CREATE_FIELDS, n=1)
        raise BadRequest(f"unknown field '{unknown[0]}'" + (f"; did you mean '{near[0]}'?" if near else
                                                           f"; fields are {', '.join(CREATE_FIELDS)}"), unknown[0])
    for name in ("model", "training_file"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise BadRequest(f"'{name}' is required (a string)", name)
    if body.get("integrations"):
        raise BadRequest("integrations (Weights & Biases) are not supported by this server; every job's metrics are "
                         "in its events and its run directory's report", "integrations")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or ":" in suffix):
        raise BadRequest("'suffix' is a string of at most 64 characters without ':'", "suffix")
    if body.get("seed") is not None and (not isinstance(body["seed"], int) or isinstance(body["seed"], bool)):
        raise BadRequest("'seed' must be an integer", "seed")
    meta = body.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict) or len(meta) > 16 or any(
                not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in meta.items()):
            raise BadRequest("'metadata' is at most 16 string keys (64 chars) with string values (512 chars)", "metadata")


def method_of(body: dict) -> tuple[str, dict]:
    """(method type, its hyperparameters) from ``method`` (or the older top-level ``hyperparameters``)."""
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type") not in ("supervised", "dpo", "reinforcement"):
        raise BadRequest("'method.type' must be supervised or dpo", "method.type")
    kind = method["type"]
    if kind == "reinforcement":
        raise BadRequest("reinforcement fine-tuning (graders) is not supported by this server; use supervised or dpo",
                         "method.type")
    extra = [k for k in method if k not in ("type", kind)]
    if extra:
        raise BadRequest(f"'method.{extra[0]}' does not belong to a {kind} method; give its settings in "
                         f"method.{kind}.hyperparameters", f"method.{extra[0]}")
    hyper = dict((method.get(kind) or {}).get("hyperparameters") or {})
    hyper = {**(body.get("hyperparameters") or {}), **hyper}
    allowed = ("n_epochs", "batch_size", "learning_rate_multiplier") + (("beta",) if kind == "dpo" else ())
    for key, value in hyper.items():
        if key not in allowed:
            raise BadRequest(f"unknown hyperparameter '{key}' for {kind}; they are {', '.join(allowed)}",
                             f"method.{kind}.hyperparameters.{key}")
        if value == "auto":
            continue
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not number_ok or (key in ("n_epochs", "batch_size") and not isinstance(value, int)):
            kind_of = "a positive integer" if key in ("n_epochs", "batch_size") else "a positive number"
            raise BadRequest(f"hyperparameter '{key}' must be \"auto\" or {kind_of}, got {json.dumps(value)}",
                             f"method.{kind}.hyperparameters.{key}")
    return kind, hyper


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("columns",) else {f"{prefix}{k}": v})
    return out


def _set(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BadRequest(f"tuneforge override '{dotted}': '{part}' is not a section", "tuneforge.overrides")
    node[parts[-1]] = value


def extension_of(body: dict) -> tuple[dict, dict]:
    """(a whole recipe or {}, {dotted key: value}) from the ``tuneforge`` extension."""
    ext = body.get("tuneforge") or {}
    if not isinstance(ext, dict) or any(k not in ("recipe", "overrides") for k in ext):
        raise BadRequest("'tuneforge' is {\"recipe\": {...a whole recipe}} and/or {\"overrides\": {\"train.max_steps\": "
                         "4, ...}}", "tuneforge")
    recipe = ext.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise BadRequest("'tuneforge.recipe' must be an object (a recipe's sections)", "tuneforge.recipe")
    overrides = ext.get("overrides") or {}
    if isinstance(overrides, list):
        from ..recipe import parse_override

        parsed = {}
        for text in overrides:
            try:
                path, value = parse_override(str(text))
            except TuneforgeError as err:
                raise BadRequest(f"tuneforge override {text!r}: {err}", "tuneforge.overrides") from None
            parsed[".".join(path)] = value
        overrides = parsed
    if not isinstance(overrides, dict):
        raise BadRequest("'tuneforge.overrides' is {\"key.path\": value} or [\"key.path=value\"]", "tuneforge.overrides")
    return copy.deepcopy(recipe), dict(overrides)


def check_safe(flat: dict, resolve_file, resolve_job) -> dict:
    """Refuse what a request may not set; replace ``file-...`` / ``ftjob-...`` ids by paths."""
    out = {}
    for key, value in flat.items():
        if key in FORBIDDEN and not (key == "model.trust_remote_code" and value is False):
            raise BadRequest(f"tuneforge: '{key}' cannot be set through the service (it {FORBIDDEN[key]})",
                             f"tuneforge.{key}")
        if key == "model.name":
            raise BadRequest("tuneforge: the model is the job's 'model' field (a name from GET /v1/models), not "
                             "model.name", "tuneforge.model.name")
        if key in FILE_KEYS:
            if not (isinstance(value, str) and value.startswith("file-")):
                raise BadRequest(f"tuneforge: '{key}' must be the id of an uploaded file (file-...), not a path",
                                 f"tuneforge.{key}")
            value = str(resolve_file(value, key))
        elif key == "retain.head_from":
            if not (isinstance(value, str) and value.startswith("ftjob-")):
                raise BadRequest("tuneforge: 'retain.head_from' must be the id of one of your succeeded jobs (ftjob-...)",
                                 "tuneforge.retain.head_from")
            value = str(resolve_job(value))
        elif key == "model.weights" and value is not None:
            raise BadRequest("tuneforge: 'model.weights' cannot name a file here; register the model with the "
                             "server (--model NAME=PATH)", "tuneforge.model.weights")
        out[key] = value
    return out


def build_recipe(*, kind: str, hyper: dict, model_name: str, train_path: Path, val_path: Path | None, rows: int,
                 seed: int, run_dir: Path, ext_recipe: dict, overrides: dict, checkpoint_every: int) -> tuple[dict, dict]:
    """(the recipe as data, the resolved hyperparameters). ``ext_recipe`` / ``overrides`` are checked already."""
    task = (ext_recipe.get("task") or {}).get("type") or overrides.get("task.type")
    if task is None:
        task = "preference" if kind == "dpo" else "causal-lm"
    recipe: dict = {"model": {"name": model_name}, "task": {"type": task}, "data": {}, "strategy": {"name": "lora"},
                    "train": {}, "output": {}}
    if task == "causal-lm":
        recipe["task"]["train_on"] = "completion"
    if task == "preference":
        recipe["task"].update(loss="dpo", beta=0.1 if hyper.get("beta", "auto") == "auto" else float(hyper["beta"]))
    for section, values in ext_recipe.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            if section in ("task", "strategy") and values.get("type", values.get("name")) not in (None,
                    recipe[section].get("type", recipe[section].get("name"))):
                recipe[section] = {}  # another task or strategy: its own options only
            recipe[section].update(values)
        else:
            recipe[section] = values
    strategy = str((recipe.get("strategy") or {}).get("name", "lora"))
    for key, value in overrides.items():
        _set(recipe, key, value)
    strategy = str(recipe["strategy"].get("name", strategy))
    family = kind if task in LLM_TASKS else "task"
    base_lr = BASE_LR[(family, "lora" if strategy == "lora" else "other")]
    epochs = DEFAULT_EPOCHS if hyper.get("n_epochs", "auto") == "auto" else hyper["n_epochs"]
    batch = min(AUTO_BATCH_MAX, max(1, rows)) if hyper.get("batch_size", "auto") == "auto" else hyper["batch_size"]
    multiplier = 1.0 if hyper.get("learning_rate_multiplier", "auto") == "auto" else float(hyper["learning_rate_multiplier"])
    train = recipe["train"]
    train.setdefault("epochs", epochs)
    train.setdefault("batch_size", batch)
    train.setdefault("lr", base_lr * multiplier)
    train["seed"] = seed
    train.setdefault("save_every", checkpoint_every)
    train["progress"] = False  # a worker's log is a file: plain lines
    recipe["model"]["name"] = model_name
    recipe["data"]["train"] = str(train_path)
    if val_path is not None:
        recipe["data"]["validation"] = str(val_path)
    recipe["output"].update(dir=str(run_dir))
    resolved = {"n_epochs": train["epochs"], "batch_size": train["batch_size"],
                "learning_rate_multiplier": round(train["lr"] / base_lr, 6)}
    if task == "preference":
        resolved["beta"] = recipe["task"].get("beta", 0.1)
    return recipe, resolved


def validate_recipe(recipe: dict):
    """The Recipe schema's own check; its message (unknown key with a suggestion, bad value) is the 400."""
    from ..recipe import load_recipe

    try:
        return load_recipe(recipe)
    except TuneforgeError as err:
        raise BadRequest(f"tuneforge: the job's recipe is invalid: {err}", "tuneforge") from None


def new_seed() -> int:
    return random.SystemRandom().randrange(1, 2**31 - 1)


def fine_tuned_name(model: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{model}:{suffix or ''}:{job_id}"


def job_of_model(name: str) -> str | None:
    """The job id of an ``ft:BASE:SUFFIX:JOB`` name, or None for another name."""
    if not name.startswith("ft:"):
        return None
    job = name.rsplit(":", 1)[-1]
    return job if job.startswith("ftjob-") else None


def job_object(job, organization: str) -> dict:
    """A job row in the shape of ``openai.types.fine_tuning.FineTuningJob`` (+ ``tuneforge``: progress)."""
    import time

    estimated = None
    if job.status == "running" and job.train_started_at and job.total_steps and job.step > job.train_started_step:
        rate = (time.time() - job.train_started_at) / (job.step - job.train_started_step)  # seconds per step, measured
        estimated = int(time.time() + rate * max(0, job.total_steps - job.step))
    kind = job.method.get("type", "supervised")
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": int(job.created_at), "error": job.error,
        "fine_tuned_model": job.fine_tuned_model, "finished_at": int(job.finished_at) if job.finished_at else None,
        "hyperparameters": {k: v for k, v in job.hyperparameters.items() if k != "beta"}, "model": job.model,
        "organization_id": organization, "result_files": list(job.result_files or []), "seed": job.seed,
        "status": job.status, "trained_tokens": job.trained_tokens, "training_file": job.training_file,
        "validation_file": job.validation_file, "estimated_finish": estimated, "integrations": [],
        "metadata": job.meta, "suffix": job.suffix,
        "method": {"type": kind, kind: {"hyperparameters": job.hyperparameters}},
        "tuneforge": {"step": job.step, "total_steps": job.total_steps, "attempts": job.attempts,
                      "task": (job.recipe.get("task") or {}).get("type"), "worker": job.worker_id,
                      "control": job.control},
    }
