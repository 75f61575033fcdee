"""The `tuneforge` command. Heavy libraries import inside each subcommand so
`tuneforge --help` and `tuneforge validate` start fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import TuneforgeError


def _console():
    from rich.console import Console

    return Console(stderr=True)


def cmd_train(args) -> int:
    from .pipeline import finetune

    overrides = list(args.set or [])
    if args.output:
        overrides.append(f"output.dir={args.output}")
    run = finetune(args.recipe, overrides=overrides, console=_console(), argv=sys.argv,
                   overwrite=True if args.overwrite else None)
    _print_final(run.metrics)
    print(run.path)
    return 0


def _print_final(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"final metrics (best step {metrics.get('best_step')})")
    splits = [s for s in ("validation", "test") if s in metrics]
    table.add_column("metric")
    for s in splits:
        table.add_column(s, justify="right")
    keys = [k for k, v in metrics[splits[0]].items() if isinstance(v, (int, float)) and k != "eval_seconds"]
    for k in keys:
        table.add_row(k, *[f"{metrics[s].get(k, float('nan')):.4f}" if isinstance(metrics[s].get(k), float)
                           else str(metrics[s].get(k)) for s in splits])
    Console(stderr=True).print(table)


def cmd_validate(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    print(f"{args.recipe}: valid ({recipe.task.type}, model {recipe.model.name}, strategy {recipe.strategy.name})")
    if args.show:
        import yaml

        print(yaml.safe_dump(recipe.dump(), sort_keys=False))
    return 0


def cmd_models(args) -> int:
    from .models import known_aliases

    for name, desc in known_aliases().items():
        print(f"{name:20s} {desc}")
    return 0


def cmd_predict(args) -> int:
    from .saving import Predictor

    predictor = Predictor(args.run_dir, batch_size=args.batch_size)
    inputs = list(args.inputs or [])
    ids: list = list(range(len(inputs)))
    if args.file:
        if predictor.meta["modality"] == "image" and Path(args.file).is_dir():
            files = sorted(p for p in Path(args.file).rglob("*") if p.is_file())
            inputs, ids = [str(p) for p in files], [str(p) for p in files]
        else:
            from .data.records import read_records

            column = args.column or ("text" if predictor.meta["modality"] == "text" else "image")
            records = read_records(args.file, columns={"input": column}, hints={"input": "--column"})
            inputs, ids = [r.values["input"] for r in records], [r.where for r in records]
    if not inputs:
        raise TuneforgeError("nothing to predict: give inputs as arguments or --file FILE")
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for i, result in zip(ids, predictor.predict(inputs)):
            out.write(json.dumps({"id": i, **result}) + "\n")
    finally:
        if args.out:
            out.close()
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_run

    metrics = evaluate_run(args.run_dir, args.data, text_column=args.text_column, label_column=args.label_column)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run = run_demo(data_dir=args.data_dir, output=args.output, extra=args.set or [], console=_console())
    _print_final(run.metrics)
    print(f"test accuracy: {run.metrics['test']['accuracy']:.4f}")
    print(f"run directory: {run.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune pretrained models from one recipe.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a recipe")
    t.add_argument("recipe")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. train.lr=3e-5")
    t.add_argument("--output", help="run directory (same as --set output.dir=...)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    t.set_defaults(fn=cmd_train)

    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe")
    v.add_argument("--set", action="append", metavar="KEY=VALUE")
    v.add_argument("--show", action="store_true", help="print the resolved recipe")
    v.set_defaults(fn=cmd_validate)

    e = sub.add_parser("eval", help="evaluate a run's model on a labelled file")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="labelled data file or image folder")
    e.add_argument("--text-column", default=None)
    e.add_argument("--label-column", default=None)
    e.set_defaults(fn=cmd_eval)

    pr = sub.add_parser("predict", help="predict with a run's model")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="*", help="texts or image paths")
    pr.add_argument("--file", help="CSV/TSV/JSONL/Parquet file (or an image folder) of inputs")
    pr.add_argument("--column", help="input column in --file (default text / image)")
    pr.add_argument("--out", help="write JSON lines here instead of stdout")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.set_defaults(fn=cmd_predict)

    m = sub.add_parser("models", help="list the built-in model aliases")
    m.set_defaults(fn=cmd_models)

    d = sub.add_parser("demo", help="fine-tune EfficientNet-Lite0 on scikit-learn's digits")
    d.add_argument("--data-dir", default=None, help="where the digits images are written (default ~/.cache/tuneforge)")
    d.add_argument("--output", default=None, help="run directory")
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TuneforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
