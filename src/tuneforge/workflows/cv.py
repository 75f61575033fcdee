"""`tuneforge cv RECIPE --folds K`: k-fold cross-validation of a recipe.

The training file is read once (with the recipe's own reader, columns and limits),
split into K stratified folds (``StratifiedGroupKFold`` when a group column is
given, so no group straddles train and validation), and each fold is written as a
pair of JSONL files and trained as an ordinary run of its own:

    <cv dir>/folds/fold-k/{train,validation}.jsonl   the exact examples of fold k (k = 1..K)
    <cv dir>/fold-k/                                 a complete run directory
    <cv dir>/cv.json                                 per-fold metrics and mean ± std
    <cv dir>/report.html                             the folds side by side

Writing the folds as files (rather than passing rows in memory) keeps each fold a
normal, reproducible run: its manifest hashes the files it read, and
`tuneforge reproduce <cv dir>/fold-k` repeats it.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path

from ..errors import TuneforgeError


def _fold_indices(keys: list, groups: list | None, k: int, seed: int) -> list[list[int]]:
    """Validation indices of each fold (sklearn's stratified splitters, shuffled with the seed)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    splitter = (StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed) if groups is not None
                else StratifiedKFold(n_splits=k, shuffle=True, random_state=seed))
    codes = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    y = [codes[key] for key in keys]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class ...": checked ourselves below
        try:
            return [sorted(val.tolist()) for _, val in splitter.split(y, y, groups)]
        except ValueError as err:
            raise TuneforgeError(f"cannot make {k} folds: {err}; use fewer --folds") from None


def _check_classes(task, records, groups, k: int) -> None:
    """Every class must be trainable in every fold: at least 2 examples (2 groups when grouped)."""
    seen: dict[str, set] = {}
    for i, r in enumerate(records):
        for label in task.record_labels(r):
            seen.setdefault(str(label), set()).add(groups[i] if groups is not None else i)
    thin = sorted(label for label, members in seen.items() if len(members) < 2)
    if thin:
        unit = "groups" if groups is not None else "examples"
        raise TuneforgeError(f"class(es) {', '.join(thin[:10])} have fewer than 2 {unit} in the training data, so "
                             f"some fold would train without them; add examples, merge those classes, or drop them")
    if len(records) < k:
        raise TuneforgeError(f"{len(records)} training examples cannot make {k} folds; use fewer --folds")


def _read_groups(recipe, records, column: str) -> list:
    from ..data.records import read_records

    d = recipe.data
    rows = read_records(d.train, columns={"group": column}, format=d.format, limit=d.max_train_rows,
                        encoding=d.encoding, on_bad_record="skip", hints={"group": "--group-column"})
    by_where = {r.where: r.values["group"] for r in rows}
    missing = [r.where for r in records if r.where not in by_where]
    if missing:
        raise TuneforgeError(f"group column '{column}' is empty in {len(missing)} row(s), e.g. {missing[0]}; "
                             "every training row needs a group")
    return [str(by_where[r.where]) for r in records]


def _write_jsonl(path: Path, records: list, task) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(task.fold_row(r), ensure_ascii=False) + "\n")  # the roles the fold reads back


def _fold_recipe(base: dict, train: Path, val: Path, out: Path, id_column: str | None) -> dict:
    recipe = json.loads(json.dumps(base))
    data = recipe["data"]
    data.update(train=str(train), validation=str(val), format="auto", text_column="text", label_column="label",
                image_column="image", columns={}, max_train_rows=None, max_eval_rows=None,
                id_column="id" if id_column else None)
    recipe["output"].update(dir=str(out), overwrite=False)
    return recipe


def summarise(folds: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1) of every scalar metric over the folds."""
    out: dict = {}
    for split in ("validation", "test"):
        keys = list(dict.fromkeys(k for f in folds for k, v in f.get(split, {}).items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)))
        for key in keys:
            values = [f[split][key] for f in folds if isinstance(f.get(split, {}).get(key), (int, float))]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            out.setdefault(split, {})[key] = {"mean": mean, "std": std, "n": len(values)}
    return out


def cross_validate(recipe_source, *, folds: int, group_column: str | None = None, overrides: list[str] | None = None,
                   output: str | None = None, console=None) -> dict:
    from rich.console import Console

    from ..run.finetune import finetune
    from ..run.job import Log as _Log
    from ..recipe import load_recipe
    from ..tasks import get_task

    if folds < 2:
        raise TuneforgeError(f"--folds must be at least 2, got {folds}")
    recipe = load_recipe(recipe_source, overrides)
    console = console if console is not None else Console(stderr=True)
    log = _Log(console)
    if not recipe.data.train or not Path(recipe.data.train).exists():
        raise TuneforgeError(f"data.train '{recipe.data.train}' does not exist; cross-validation splits that file")
    task = get_task(recipe)
    if task.generative:
        raise TuneforgeError(f"tuneforge cv splits labelled examples into stratified folds; a {recipe.task.type} run "
                             "has no labels to stratify — train it with `tuneforge train` and a validation file")
    skipped: list = []
    records = task.read("train", recipe.data.train, limit=recipe.data.max_train_rows, skipped=skipped)
    groups = _read_groups(recipe, records, group_column) if group_column else None
    _check_classes(task, records, groups, folds)
    keys = [tuple(sorted(map(str, task.record_labels(r)))) for r in records]
    fold_val = _fold_indices(keys, groups, folds, recipe.train.seed)
    if recipe.data.validation:
        log(f"[yellow]data.validation ({recipe.data.validation}) is not used: each fold validates on its held-out part[/]")
    name = recipe.output.name or (Path(str(recipe_source)).stem if isinstance(recipe_source, (str, Path)) else "run")
    root = Path(output) if output else Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-cv-{datetime.now():%Y%m%d-%H%M%S}"
    if root.exists() and any(root.iterdir()):
        raise TuneforgeError(f"cross-validation directory '{root}' is not empty; choose another --output")
    base = recipe.dump()
    results = []
    for k, val_idx in enumerate(fold_val, start=1):  # one numbering, from 1: "fold 2/3" is fold-2/
        held = set(val_idx)
        train = [r for i, r in enumerate(records) if i not in held]
        val = [records[i] for i in val_idx]
        files = root / "folds" / f"fold-{k}"
        _write_jsonl(files / "train.jsonl", train, task)
        _write_jsonl(files / "validation.jsonl", val, task)
        log(f"[bold]fold {k}/{folds}[/]: train {len(train)}, validation {len(val)}"
            + (f" ({len({groups[i] for i in val_idx})} groups held out)" if groups else ""))
        run = finetune(_fold_recipe(base, files / "train.jsonl", files / "validation.jsonl", root / f"fold-{k}",
                                    recipe.data.id_column), console=console)
        results.append({"fold": k, "run": str(run.path), "train_examples": len(train), "validation_examples": len(val),
                        **{s: run.metrics[s] for s in ("validation", "test") if s in run.metrics}})
    summary = {"folds": folds, "grouped_by": group_column, "seed": recipe.train.seed, "summary": summarise(results),
               "std": "sample standard deviation (ddof=1) over folds",
               "per_fold": [{k: v for k, v in r.items() if k not in ("validation", "test")}
                            | {s: {m: v for m, v in r[s].items() if isinstance(v, (int, float)) or v is None}
                               for s in ("validation", "test") if s in r} for r in results]}
    (root / "cv.json").write_text(json.dumps(summary, indent=2))
    if recipe.output.report:
        try:
            from ..evaluation.report import write_comparison

            write_comparison([r["run"] for r in results], root / "report.html")
        except Exception as err:  # noqa: BLE001 - the folds' runs are complete whatever happens here
            log(f"[yellow]warning: the cross-validation report could not be written ({err})[/]")
    summary["path"] = str(root)
    return summary


def render(summary: dict) -> str:
    lines = [f"{summary['folds']}-fold cross-validation" + (f", grouped by {summary['grouped_by']}"
                                                           if summary["grouped_by"] else ", stratified")
             + f": {summary['path']}"]
    for split, metrics in summary["summary"].items():
        lines.append(f"{split}:")
        for key, s in metrics.items():
            if key not in ("examples", "eval_seconds"):
                lines.append(f"  {key:20s} {s['mean']:.4f} ± {s['std']:.4f}" + (f"  (n={s['n']})" if s["n"] != summary["folds"] else ""))
    return "\n".join(lines)
