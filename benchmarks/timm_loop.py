"""Worker: a plain PyTorch training loop for image classification, written the way timm's
``train.py`` does it. Run by image.py in its own process: ``python benchmarks/timm_loop.py CONFIG.json``.

* model: the packaged EfficientNet-Lite0 backbone via ``tuneforge.models.load_model`` (the same
  weights and pretrained preprocessing tuneforge uses; timm ``tf_efficientnet_lite0``,
  ``num_classes=0``) + Dropout(0.1) + Linear head (tuneforge's default head dropout);
* data: torchvision ``ImageFolder`` + ``timm.data.create_transform`` (train: RandomResizedCrop
  with the given scale, hflip p, no colour jitter -- the settings tuneforge's recipe uses; eval:
  resize to size/crop_pct + centre crop); ``DataLoader`` with num_workers=1, pin_memory=False,
  persistent workers, shuffled, drop_last=False (timm drops the last partial batch; we keep it
  so every contender sees the same samples);
* optimisation: ``timm.optim.create_optimizer_v2(model, "adamw", ...)`` (no weight decay on
  biases/norms), ``timm.scheduler.CosineLRScheduler`` stepped per update with warmup,
  plain cross-entropy (timm's default label smoothing 0.1 is off, as in tuneforge), gradient
  clipping at 1.0 (tuneforge's default; timm's ``--clip-grad``), loss read back only every
  ``log_interval`` steps;
* precision: fp32 (timm's default) or ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``--amp``).

Timing: ``model_load_s`` = load_model + head; ``preprocess_s`` = building the ImageFolder
datasets and transforms; ``train_s`` = the sum of the per-epoch training loops (first-batch
worker start-up included, evaluation excluded); ``eval_s`` = the last validation pass.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import accuracy_score, f1_score
    from timm.data import create_transform
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from tuneforge.models import load_model

    seed = cfg["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    class Classifier(nn.Module):
        def __init__(self, backbone, num_features: int, num_classes: int):
            super().__init__()
            self.backbone = backbone
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(num_features, num_classes)

        def forward(self, x):
            return self.head(self.drop(self.backbone(x)))  # (B, C)

    # -- model: the same packaged backbone weights and preprocessing as tuneforge's alias
    t0 = time.perf_counter()
    lm = load_model(cfg["model"])
    pre = lm.info.preprocessing
    backbone_load_s = time.perf_counter() - t0

    # -- data: timm transforms + ImageFolder (images are decoded lazily, per item)
    t0 = time.perf_counter()
    size = cfg["image_size"]
    common_kw = dict(input_size=(3, size, size), mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                     interpolation=pre.get("interpolation", "bicubic"), crop_pct=pre.get("crop_pct", 0.875))
    train_tf = create_transform(**common_kw, is_training=True, scale=tuple(cfg["crop_scale"]), hflip=cfg["hflip"],
                                color_jitter=None)
    eval_tf = create_transform(**common_kw, is_training=False)
    train_ds = ImageFolder(cfg["train_dir"], transform=train_tf)
    val_ds = ImageFolder(cfg["val_dir"], transform=eval_tf)
    if val_ds.classes != train_ds.classes:
        raise SystemExit(f"validation classes {val_ds.classes} differ from training classes {train_ds.classes}")
    preprocess_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = Classifier(lm.backbone, lm.info.feature_dim, len(train_ds.classes))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as timm's train.py picks it
    model.to(device)
    model_load_s = backbone_load_s + time.perf_counter() - t0

    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_ds, batch_size=cfg["batch_size"], shuffle=True, num_workers=cfg["workers"],
                              pin_memory=False, drop_last=False, persistent_workers=cfg["workers"] > 0, generator=g)
    val_loader = DataLoader(val_ds, batch_size=cfg["eval_batch_size"], shuffle=False, num_workers=cfg["workers"],
                            pin_memory=False, persistent_workers=cfg["workers"] > 0)

    # -- optimisation, as timm's train.py sets it up (per-update schedule)
    epochs = cfg["epochs"]
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * epochs
    warmup = int(round(cfg["warmup"] * total)) if cfg["warmup"] < 1 else int(cfg["warmup"])
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=0.0, warmup_t=warmup,
                                  warmup_lr_init=cfg["lr"] / max(1, warmup), warmup_prefix=True, t_in_epochs=False)
    amp = cfg["amp"]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def evaluate():
        model.eval()
        preds, ys, loss_sum = [], [], 0.0
        t = time.perf_counter()
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device), y.to(device)
                with autocast():
                    out = model(x)
                loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
                preds.append(out.argmax(-1).cpu())
                ys.append(y.cpu())
        p, y = torch.cat(preds).numpy(), torch.cat(ys).numpy()
        return {"accuracy": float(accuracy_score(y, p)), "f1_macro": float(f1_score(y, p, average="macro")),
                "loss": loss_sum / len(y), "eval_seconds": round(time.perf_counter() - t, 3)}

    train_s, seen, updates, losses, evals = 0.0, 0, 0, [], []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            with autocast():
                out = model(x)
                loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            seen += y.shape[0]
            if updates % cfg["log_interval"] == 0 or updates == total:
                losses.append({"step": updates, "loss": float(loss)})
        train_s += time.perf_counter() - t0
        evals.append({"epoch": epoch + 1, **evaluate()})
        print(f"epoch {epoch + 1}: train {train_s:.1f}s cumulative, val {evals[-1]}", flush=True)

    final, best = evals[-1], max(evals, key=lambda e: e["accuracy"])
    common.write_worker_result(cfg["result_path"], {
        "precision": "bf16" if amp else "fp32",
        "model_load_s": round(model_load_s, 2),
        "preprocess_s": round(preprocess_s, 2),
        "train_s": round(train_s, 2),
        "eval_s": final["eval_seconds"],
        "accuracy": final["accuracy"],
        "f1_macro": final["f1_macro"],
        "eval_loss": final["loss"],
        "best_accuracy": best["accuracy"],
        "best_f1_macro": best["f1_macro"],
        "evals": evals,
        "steps": updates,
        "samples_seen": seen,
        "train_losses": losses,
        "classes": train_ds.classes,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    })


if __name__ == "__main__":
    main(sys.argv[1])
