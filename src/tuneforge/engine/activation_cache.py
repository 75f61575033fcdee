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


def weights_digest(model: torch.nn.Module, names: list[str]) -> str:
    """sha256 of the named sub-modules' weights and buffers (the frozen part a cache depends on)."""
    h = hashlib.sha256()
    for name in names:
        for key, tensor in sorted(model.get_submodule(name).state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
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
def _compute(model, batches, n: int, inputs: tuple[str, ...], device, autocast) -> np.ndarray:
    """Pooled features (n, H) of every example, from ``batches`` (each carrying ``index``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    was_training = base.training
    base.eval()
    out = None
    for batch in batches:
        feed = {k: v.to(device) for k, v in batch.items() if k in inputs}
        with autocast():
            feats = base.features(**feed).float().cpu().numpy()  # (B, H)
        if out is None:
            out = np.empty((n, feats.shape[1]), dtype=np.float32)
        out[batch["index"].numpy()] = feats
    base.train(was_training)
    return out


def build_cached_loaders(model, datasets: dict, *, batches, digest, inputs: tuple[str, ...], settings: dict, cfg,
                         device, autocast, log) -> dict:
    """Replace each split's loader by one over cached backbone features.

    ``batches(dataset)``: the dataset's examples in eval batches (with ``index``); ``digest(dataset)``:
    a hash of what the dataset feeds the model; ``inputs``: the batch keys the model takes;
    ``settings``: everything else the features depend on (preprocessing, pooling, precision);
    ``cfg``: the train section (batch sizes, seed, group_by_length)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = weights_digest(base, ["backbone"])
    key_settings = json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str)
    loaders = {}
    for split, dataset in datasets.items():
        key = hashlib.sha256(f"{weights}|{digest(dataset)}|{key_settings}".encode()).hexdigest()[:32]
        path = cache_dir() / f"{key}.npy"
        if path.exists():
            size = path.stat().st_size
            features = np.load(path, mmap_mode="r" if size > MMAP_BYTES else None)
            log(f"activation cache: {split} features reused ({path})")
        else:
            features = _compute(model, batches(dataset), len(dataset), inputs, device, autocast)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, features)
                tmp.replace(path)
            except OSError:
                pass  # a read-only cache directory only costs the reuse
            log(f"activation cache: {split} features computed once ({features.shape[0]} x {features.shape[1]})")
        train = split == "train"
        # Same sampler and seed as the uncached path: identical batches in identical order.
        sampler = EpochBatchSampler(len(dataset.targets), cfg.batch_size if train else cfg.eval_batch_size,
                                    shuffle=train, seed=cfg.seed, lengths=dataset.lengths,
                                    group_by_length=cfg.group_by_length)
        loaders[split] = DataLoader(FeatureDataset(features, dataset.targets, list(dataset.where), dataset.lengths),
                                    batch_sampler=sampler, collate_fn=_collate,
                                    generator=torch.Generator().manual_seed(cfg.seed))
    return loaders
