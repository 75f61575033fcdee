"""The demo data set: scikit-learn's handwritten digits as PNG class folders.

``load_digits`` ships inside scikit-learn (1,797 8x8 images, no download), which makes it
the one image set every install can train on offline. Writing it out as ordinary class
folders means the demo exercises exactly the path a user's own images take.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tuneforge.errors import TuneforgeError

__all__ = ["materialise_digits"]

_MARKER = ".tuneforge-digits.json"
_VERSION = 1  # bump when the layout or the pixels written change, to invalidate old copies


def materialise_digits(root: str | Path, *, size: int = 64, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write ``root/train/<digit>/<i>.png`` and ``root/test/<digit>/<i>.png``; return
    ``{"train": str, "test": str, "n_train": int, "n_test": int}``.

    ``<i>`` is the image's index in ``load_digits()``, so any file traces back to its source.
    Idempotent: a completion marker with the same parameters means the work is done.
    The set is built in a temporary sibling folder and renamed into place, so a crash
    never leaves half a data set behind.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    params = {"version": _VERSION, "size": int(size), "test_fraction": float(test_fraction), "seed": int(seed)}
    done = _read_marker(root)
    if done is not None and done.get("params") == params:
        return _result(root, done)
    if root.exists() and done is None and any(root.iterdir()):
        # Never delete a folder we did not create.
        raise TuneforgeError(f"{root} exists and is not a tuneforge digits folder — choose an empty or new "
                             "folder for the demo data")

    digits = load_digits()
    # 0..16 ink levels -> 0..255; bicubic upscaling gives smooth strokes, closer to the
    # natural images pretrained backbones saw than nearest-neighbour's 8x8 blocks.
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    indices = np.arange(len(pixels))
    train_idx, test_idx = train_test_split(indices, test_size=test_fraction, random_state=seed,
                                           stratify=digits.target)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split, idx in (("train", train_idx), ("test", test_idx)):
            for i in sorted(idx.tolist()):
                folder = tmp / split / str(int(digits.target[i]))
                folder.mkdir(parents=True, exist_ok=True)
                image = Image.fromarray(pixels[i]).resize((size, size), Image.Resampling.BICUBIC)
                image.save(folder / f"{i:04d}.png", optimize=False)
        marker = {"params": params, "n_train": len(train_idx), "n_test": len(test_idx)}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        _swap_into_place(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _result(root, marker)


def _swap_into_place(tmp: Path, root: Path) -> None:
    # A directory rename is atomic but cannot replace a non-empty directory, so move any
    # old copy (ours, with different parameters) aside first and delete it afterwards.
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.replace(root, old)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _result(root: Path, marker: dict) -> dict:
    return {"train": str(root / "train"), "test": str(root / "test"),
            "n_train": int(marker["n_train"]), "n_test": int(marker["n_test"])}
