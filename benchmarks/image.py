"""Benchmark: image classification (EfficientNet-Lite0), tuneforge vs a plain timm-style loop.

    .venv/bin/python benchmarks/image.py                      # scikit-learn digits as image folders
    .venv/bin/python benchmarks/image.py --image-dir DIR      # DIR/train/<class>/*, optional DIR/val/

Contenders, one after the other, each in its own process: ``tuneforge`` (the CLI, full
fine-tuning) and ``timm-loop`` (a plain PyTorch loop the way timm's train.py writes it), in
fp32 (timm's default) and/or with bf16 autocast (``--timm-precision``). Same backbone weights,
transforms, batch size, learning rate, cosine schedule with warmup, epochs and seed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

COLUMNS = [
    ("contender", "contender", ""), ("precision", "precision", ""), ("images/s", "samples_per_s", ".1f"),
    ("prep s", "preprocess_s", ".2f"), ("load s", "model_load_s", ".1f"), ("train s", "train_s", ".1f"),
    ("wall s", "wall_s", ".1f"), ("peak RSS MB", "peak_rss_mb", ".0f"), ("val acc", "accuracy", ".4f"),
    ("macro-F1", "f1_macro", ".4f"), ("best acc", "best_accuracy", ".4f"),
    ("images/s vs tf", "x_samples_per_s", "x"), ("train s vs tf", "x_train_s", "x"), ("RSS vs tf", "x_peak_rss", "x"), ("other load", "other_cpu_share", "pct"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-dir", type=Path, default=None,
                   help="folder with train/<class>/ images and optional val/ (or validation/); default: digits")
    p.add_argument("--model", default="efficientnet-lite0", help="tuneforge model alias / timm name for both")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hflip", type=float, default=0.0)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.7, 1.0))
    p.add_argument("--workers", type=int, default=1, help="data-loader workers of the timm loop (tuneforge: 1)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out when the folder has no val/")
    p.add_argument("--contenders", default="tuneforge,timm-loop")
    p.add_argument("--timm-precision", default="fp32,bf16", help="comma-separated: fp32 (timm default), bf16 (--amp)")
    common.add_common_args(p, before_after=True)
    return p.parse_args(argv)


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def resolve_data(args, work: common.Workdir) -> tuple[Path, Path, str]:
    """(train folder, validation folder, description)."""
    if args.image_dir is None:
        from tuneforge.data.digits import materialise_digits

        # Written once, reused (materialise_digits is idempotent); its test split is our validation set.
        d = materialise_digits(common.RESULTS_DIR / "data" / "digits-64", size=64)
        return Path(d["train"]), Path(d["test"]), f"scikit-learn digits ({d['n_train']} train / {d['n_test']} val)"
    root = args.image_dir.resolve()
    train = root / "train"
    if not train.is_dir():
        raise SystemExit(f"{train} not found: --image-dir must hold train/<class>/ images (and optionally val/)")
    for name in ("val", "validation"):
        if (root / name).is_dir():
            return train, root / name, str(root)
    # No validation folder: hold out a stratified, seeded fraction, hard-linked (copied where
    # links are impossible) into the work dir so both contenders read plain class folders.
    rng = random.Random(args.seed)
    split = work.path / "data"
    for cls in sorted(p for p in train.iterdir() if p.is_dir()):
        files = images_in(cls)
        rng.shuffle(files)
        n_val = max(1, round(len(files) * args.val_fraction)) if len(files) > 1 else 0
        for i, f in enumerate(files):
            dest = split / ("val" if i < n_val else "train") / cls.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dest)
            except OSError:
                import shutil

                shutil.copy2(f, dest)
    return split / "train", split / "val", f"{root} (held out {args.val_fraction:g} of train as validation)"


def main(argv=None) -> int:
    args = parse_args(argv)
    contenders = common.choices(args.contenders, ("tuneforge", "timm-loop"), "contender")
    precisions = common.choices(args.timm_precision, ("fp32", "bf16"), "--timm-precision")
    common.configure(args)
    when = common.stamp()
    work = common.Workdir("image", when, keep=args.keep_runs)
    machine = common.machine_info()
    train, val, described = resolve_data(args, work)
    n_train, n_val = len(images_in(train)), len(images_in(val))
    samples = n_train * args.epochs
    print(f"data: {described}; train {n_train} images in {train}, val {n_val} in {val}; "
          f"load average {machine['loadavg_at_start']}", flush=True)

    if args.baseline_src and "tuneforge" in contenders:
        contenders.insert(contenders.index("tuneforge") + 1, "tuneforge-baseline")
    rows = []
    for round_, contender in [(r, c) for r in range(args.rounds) for c in contenders]:
        if contender in ("tuneforge", "tuneforge-baseline"):
            recipe = {
                "model": {"name": args.model},
                "task": {"type": "image-classification", "image_size": args.image_size},
                "data": {"train": str(train), "validation": str(val), "augment": True, "hflip": args.hflip,
                         "crop_scale": list(args.crop_scale)},
                "strategy": {"name": "full"},
                "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                          "lr": args.lr, "head_lr": args.lr, "schedule": "cosine", "warmup": args.warmup,
                          "weight_decay": args.weight_decay, "seed": args.seed, "progress": False},
                "output": {"name": "tuneforge"},
            }
            src = args.baseline_src if contender == "tuneforge-baseline" else None
            name = contender + (f"-r{round_}" if args.rounds > 1 else "")
            runs = [(contender, common.run_tuneforge(name, recipe, work, src=src))]
        else:
            runs = []
            for pr in precisions:
                name = "timm-loop" if pr == "fp32" else f"timm-loop-{pr}"
                cfg = {"model": args.model, "train_dir": str(train), "val_dir": str(val),
                       "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
                       "eval_batch_size": args.eval_batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                       "warmup": args.warmup, "hflip": args.hflip, "crop_scale": list(args.crop_scale),
                       "workers": args.workers, "seed": args.seed, "amp": pr == "bf16", "clip_grad": 1.0,
                       "log_interval": 10}
                runs.append((name, common.run_worker(name, "timm_loop.py", cfg, work)))
        for name, row in runs:
            row.update(contender=name, strategy="full", round=round_)
            common.add_rates(row, samples)
            rows.append(row)
    for row in rows:  # every contender against tuneforge
        row["strategy"] = "full"
    common.add_ratios(rows)
    work.cleanup()

    title = (f"image: {args.model} on {described}, {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, "
             f"lr {args.lr:g} cosine, seed {args.seed}  (load avg {common.loadavg()})")
    common.print_table(title, rows, COLUMNS)
    common.write_json(args.output or common.default_output("image", when), {
        "benchmark": "image", "timestamp": when, "args": vars(args), "machine": machine,
        "data": {"train": str(train), "validation": str(val), "train_images": n_train, "val_images": n_val,
                 "description": described},
        "workdir": str(work.path), "results": rows, "loadavg_at_end": common.loadavg(),
    })
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
