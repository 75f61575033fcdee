"""Tiny data sets written on the spot for end-to-end tests."""

from __future__ import annotations

import random
from pathlib import Path

POS = "good great fun loved liked".split()
NEG = "bad awful boring hated".split()
FILLER = "the movie film plot was is really very this it".split()


def write_text_csv(path: Path, n: int = 48, seed: int = 0, labels=("pos", "neg"), sep: str = ",") -> Path:
    rng = random.Random(seed)
    rows = ["text" + sep + "label"]
    for i in range(n):
        label = labels[i % 2]
        words = rng.sample(FILLER, 3) + [rng.choice(POS if i % 2 == 0 else NEG)] * 2
        rng.shuffle(words)
        rows.append(" ".join(words) + sep + str(label))
    path.write_text("\n".join(rows) + "\n")
    return path


def write_image_folder(root: Path, n_per_class: int = 8, size: int = 24, seed: int = 0) -> Path:
    """Two classes a tiny CNN can tell apart: bright-red vs dark-blue squares with noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, colour in (("red", (220, 30, 30)), ("blue", (20, 30, 200))):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.clip(np.array(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype("uint8")
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


def text_recipe(tiny_bert_dir, train_file, out, name="full", **extra) -> dict:
    recipe = {
        "model": {"name": str(tiny_bert_dir)},
        "task": {"type": "text-classification"},
        "data": {"train": str(train_file), "validation_split": 0.25},
        "strategy": {"name": name},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "progress": False, "precision": "fp32"},
        # report.html (matplotlib figures) costs ~1 s a run; the tests of the report turn it on
        "output": {"dir": str(out), "report": False},
    }
    for key, value in extra.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def image_recipe(tiny_timm_weights, train_dir, out, name="full", **extra) -> dict:
    arch, weights = tiny_timm_weights
    recipe = {
        "model": {"name": arch, "weights": str(weights)},
        "task": {"type": "image-classification", "image_size": 32},
        "data": {"train": str(train_dir), "validation_split": 0.25},
        "strategy": {"name": name},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "progress": False, "precision": "fp32"},
        # report.html (matplotlib figures) costs ~1 s a run; the tests of the report turn it on
        "output": {"dir": str(out), "report": False},
    }
    recipe["data"]["num_workers"] = 0
    for key, value in extra.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def simulate_crash(run: Path, after_step: int) -> None:
    """Turn a completed run into what a run killed after ``after_step`` leaves: no later
    checkpoints, no final model or eval.json, and a manifest still saying "running". The run
    must have kept its periodic checkpoints (``output.keep_resumable: true``)."""
    import json
    import shutil

    for path in (run / "checkpoints").glob("step-*"):
        if path.name > f"step-{after_step:08d}":
            shutil.rmtree(path)
    shutil.rmtree(run / "model")
    (run / "eval.json").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
