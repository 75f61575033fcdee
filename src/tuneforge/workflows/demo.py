"""`tuneforge demo` / `make demo`: a real fine-tune of real pretrained weights on
real data, in a few minutes on 2 CPU cores.

EfficientNet-Lite0 (ImageNet weights, packaged) learns scikit-learn's
handwritten digits, upscaled from 8x8 to 64x64 PNG files and read back through
the ordinary image-folder pipeline, so the demo exercises the same code as any
user's image folder.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def demo_recipe_path() -> Path:
    return Path(str(resources.files("tuneforge") / "recipes" / "digits-efficientnet.yaml"))


def run_demo(data_dir: str | None = None, output: str | None = None, extra: list[str] | None = None, console=None):
    from ..data.digits import materialise_digits
    from ..run.finetune import finetune

    root = Path(data_dir or os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge")) / "digits"
    paths = materialise_digits(root)
    overrides = [f"data.train={paths['train']}", f"data.test={paths['test']}"]
    if output:
        overrides.append(f"output.dir={output}")
    return finetune(demo_recipe_path(), overrides=overrides + list(extra or []), console=console)
