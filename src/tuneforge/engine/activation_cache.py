"""Activation caching for frozen backbones.

When the whole backbone is frozen and deterministic (``linear-probe``: eval
mode, so no dropout, and no random augmentation), its pooled features for an
example are the same in every epoch. We compute them once and train the head
on them: every later epoch costs a matrix multiply instead of a full forward
pass. Mainstream trainers recompute the frozen forward each epoch.

The cache is keyed by a hash of the frozen weights, the encoded examples (token
ids, or image files and their sizes/mtimes) and the preprocessing, precision
and pooling; any change gives a new key. Features live in memory, and are also
written under ``$TUNEFORGE_CACHE/activations`` (memory-mapped when large) so
repeated runs on the same data reuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.batching import EpochBatchSampler

FORMAT = 1
MMAP_BYTES = 1 << 30  # features larger than this are memory-mapped instead of loaded


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge")) / "activations"


def cacheable(model, strategy, task, recipe) -> tuple[bool, str]:
    """Whether caching applies, and why not when it does not (for the log)."""
    if recipe.train.cache_activations == "off":
        return False, "train.cache_activations is off"
    if not getattr(task, "cacheable", True):
        return False, "every layer of this task's model trains"
    if strategy.name != "linear-probe":
        return False, "the backbone is not entirely frozen"
    if task.modality == "image" and recipe.data.augment:
        return False, "random augmentation changes the backbone's input every epoch (set data.augment: false to cache)"
    return True, ""


def weights_digest(model: torch.nn.Module, names: list[str]) -> str:
    """sha256 of the named sub-modules' weights and buffers (the frozen part a cache depends on)."""
    h = hashlib.sha256()
    for name in names:
        for key, tensor in sorted(model.get_submodule(name).state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data_digest(dataset) -> str:
    h = hashlib.sha256()
    if hasattr(dataset, "input_ids"):
        for ids in dataset.input_ids:
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
    else:
        for record in dataset.records:
            path = Path(str(record.values["image"]))
            stat = path.stat() if path.exists() else None
            h.update(f"{path}|{stat.st_size if stat else ''}|{stat.st_mtime_ns if stat else ''}\n".encode())
    return h.hexdigest()


class FeatureDataset(Dataset):
    def __init__(self, features, targets: list, where: list[str], lengths: list[int] | None):
        self.features, self.targets, self.where, self.lengths = features, targets, where, lengths

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        return {"features": torch.as_tensor(np.asarray(self.features[i])), "labels": self.targets[i], "index": i}


def _collate(items: list[dict]) -> dict:
    labels = [it["labels"] for it in items]
    dtype = torch.float32 if isinstance(labels[0], list) else torch.long
    return {"features": torch.stack([it["features"] for it in items]),  # (B, H)
            "labels": torch.tensor(labels, dtype=dtype), "index": torch.tensor([it["index"] for it in items])}


@torch.inference_mode()
def _compute(model, task, dataset, batch_size: int, device, autocast) -> np.ndarray:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = base.training
    base.eval()
    out = None
    for batch in task.loader(dataset, batch_size, train=False, seed=0):
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        with autocast():
            feats = base.features(**inputs).float().cpu().numpy()  # (B, H)
        if out is None:
            out = np.empty((len(dataset), feats.shape[1]), dtype=np.float32)
        out[batch["index"].numpy()] = feats
    base.train(was_training)
    return out


def build_cached_loaders(model, task, datasets: dict, recipe, device, autocast, precision: str, log) -> dict:
    """Replace each split's loader by one over cached backbone features."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = weights_digest(base, ["backbone"])
    preprocessing = {k: v for k, v in task.settings().items() if k != "truncated"}  # counts are not inputs
    settings = json.dumps({"format": FORMAT, "preprocessing": preprocessing, "pooling": recipe.task.pooling,
                           "precision": precision}, sort_keys=True, default=str)
    cfg, loaders = recipe.train, {}
    for split, dataset in datasets.items():
        key = hashlib.sha256(f"{weights}|{_data_digest(dataset)}|{settings}".encode()).hexdigest()[:32]
        path = cache_dir() / f"{key}.npy"
        if path.exists():
            size = path.stat().st_size
            features = np.load(path, mmap_mode="r" if size > MMAP_BYTES else None)
            log(f"activation cache: {split} features reused ({path})")
        else:
            features = _compute(model, task, dataset, cfg.eval_batch_size, device, autocast)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, features)
                tmp.replace(path)
            except OSError:
                pass  # a read-only cache directory only costs the reuse
            log(f"activation cache: {split} features computed once ({features.shape[0]} x {features.shape[1]})")
        targets = dataset.targets if hasattr(dataset, "targets") else dataset.labels
        where = list(getattr(dataset, "where", None) or [r.where for r in dataset.records])
        lengths = dataset.lengths if hasattr(dataset, "input_ids") else None
        train = split == "train"
        # Same sampler and seed as the uncached path: identical batches in identical order.
        sampler = EpochBatchSampler(len(targets), cfg.batch_size if train else cfg.eval_batch_size, shuffle=train,
                                    seed=cfg.seed, lengths=lengths, group_by_length=cfg.group_by_length)
        loaders[split] = DataLoader(FeatureDataset(features, targets, where, lengths), batch_sampler=sampler,
                                    collate_fn=_collate, generator=torch.Generator().manual_seed(cfg.seed))
    return loaders
