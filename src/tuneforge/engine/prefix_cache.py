"""Activation caching for frozen *prefixes* (``partial``: the lower layer groups frozen).

The frozen groups run in eval mode (no dropout, fixed BatchNorm statistics) and,
without random augmentation, see the same input every epoch, so the output of
the last frozen group is a pure function of the example. We compute it once per
example and, for every later step, *replay* it: the frozen modules' ``forward``
is swapped (on the instance, so parameter names and saved weights are untouched)
for one that returns the cached tensor (the first frozen module called) or
passes its input through (the others). The trainable top groups run as usual.

This is generic over chain-shaped backbones (BERT-style encoders, CNN stages),
found rather than assumed: a probe forward records the order in which the
frozen modules run and what they return, and before training we check on real
examples that the replayed model gives the logits of the normal one. A backbone
that does work *between* its layer groups (e.g. scales the embeddings, or keeps
position embeddings as bare parameters like timm's ViT) fails that check or the
probe, and the run simply trains without the cache, saying why.

Text activations are stored unpadded per example (ragged, with offsets) and
re-padded with zeros per batch: padded positions are masked out as attention
keys, so their values never reach a real position or the pooled features.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.batching import EpochBatchSampler
from .activation_cache import MMAP_BYTES, cache_dir, weights_digest

FORMAT = 1
KEY = "prefix_activations"


def loose_parameters(model, frozen: list[str]) -> list[str]:
    """Frozen-group entries that are bare parameters rather than modules (timm ViT's pos_embed):
    they are used outside any module's forward, so replaying the modules cannot stand in for them."""
    names = dict(model.named_modules())
    return [n for n in frozen if n not in names]


class _Stop(Exception):
    """Raised by the capture hook: nothing after the last frozen module needs computing."""


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    return None


def _replace_first(out, tensor):
    if torch.is_tensor(out):
        return tensor
    return type(out)([tensor, *out[1:]]) if isinstance(out, (tuple, list)) else tensor


class Replay:
    """Swaps the frozen modules' forwards for cache replays; ``remove()`` restores them."""

    def __init__(self, model: nn.Module, order: list[str], structure: dict):
        self.model, self.order, self.structure = model, order, structure
        self.current: torch.Tensor | None = None
        self.modules = {n: model.get_submodule(n) for n in order}
        self.active = False

    def install(self) -> None:
        if self.active:
            return
        entry = self.order[0]
        for name, module in self.modules.items():
            module.forward = self._entry(name) if name == entry else self._passthrough(name)
        self._hook = self.model.register_forward_pre_hook(self._take, with_kwargs=True)
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        for module in self.modules.values():
            del module.forward  # the class's own forward again
        self._hook.remove()
        self.active = False

    def _take(self, _module, args, kwargs):
        self.current = kwargs.pop(KEY, None)
        return args, kwargs

    def _entry(self, name):
        def forward(*args, **kwargs):
            if self.current is None:
                raise RuntimeError("prefix replay is installed but the batch carries no cached activations")
            return _replace_first(self.structure[name], self.current)
        return forward

    def _passthrough(self, name):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            return _replace_first(self.structure[name], hidden)
        return forward


def _probe(model, frozen: list[str], inputs: dict):
    """Run one forward; record the order the frozen modules run in and what they return."""
    order, structure, counts = [], {}, {}
    handles = []
    for name in frozen:
        def hook(_m, _a, out, name=name):
            counts[name] = counts.get(name, 0) + 1
            if name not in structure:
                order.append(name)
                structure[name] = tuple(out) if isinstance(out, list) else out
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    if set(order) != set(frozen) or any(c != 1 for c in counts.values()):
        return None, None, "the frozen modules do not each run exactly once per forward"
    last = _first_tensor(structure[order[-1]])
    if last is None or any(_first_tensor(structure[n]) is None for n in order):
        return None, None, "a frozen module returns no tensor"
    # Keep only placeholders for the non-tensor parts (None, small tuples); drop the big tensors.
    skeleton = {n: _replace_first(structure[n], None) if not torch.is_tensor(structure[n]) else None
                for n in order}
    return order, skeleton, ""


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy()
    return t.numpy()


def _from_numpy(a, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


@torch.inference_mode()
def _compute(model, batches, n: int, boundary: str, inputs: tuple[str, ...], device, autocast):
    """Output of the last frozen module for every example: (flat rows, offsets) for ragged inputs
    (texts, unpadded per example), one fixed-shape array otherwise (images)."""
    rows: list = [None] * n
    captured = {}

    def hook(_m, _a, out):
        captured["out"] = _first_tensor(out).detach()
        raise _Stop

    handle = model.get_submodule(boundary).register_forward_hook(hook)
    was_training = model.training
    model.eval()
    ragged = False
    try:
        for batch in batches:
            feed = {k: v.to(device) for k, v in batch.items() if k in inputs}
            try:
                with autocast():
                    model(**feed)
            except _Stop:
                pass
            out = captured.pop("out").cpu()
            ragged = "attention_mask" in batch
            lengths = batch["attention_mask"].sum(1).tolist() if ragged else None
            for j, i in enumerate(batch["index"].tolist()):
                rows[i] = out[j, : lengths[j]].clone() if lengths else out[j].clone()
    finally:
        handle.remove()
        model.train(was_training)
    dtype = rows[0].dtype
    if ragged:
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([r.shape[0] for r in rows])
        return _to_numpy(torch.cat(rows)), offsets, dtype
    return _to_numpy(torch.stack(rows)), None, dtype


class PrefixDataset(Dataset):
    """The task's dataset plus each example's cached prefix activations. Ragged inputs (texts)
    keep their items (token ids give the mask and the shapes); fixed-size ones (images) are
    not decoded at all."""

    def __init__(self, inner, values, offsets, dtype, ragged: bool):
        self.inner, self.values, self.offsets, self.dtype, self.ragged = inner, values, offsets, dtype, ragged
        self.where = list(inner.where)
        self.targets = inner.targets
        self.lengths = inner.lengths

    def __len__(self) -> int:
        return len(self.targets)

    def activations(self, i: int) -> torch.Tensor:
        if self.offsets is not None:
            return _from_numpy(self.values[self.offsets[i]: self.offsets[i + 1]], self.dtype)
        return _from_numpy(self.values[i], self.dtype)

    def __getitem__(self, i: int) -> dict:
        item = self.inner[i] if self.ragged else {"labels": self.targets[i], "index": i}
        return {**item, KEY: self.activations(i)}


def _collate_fn(collate, ragged: bool, inputs: tuple[str, ...]):
    """``collate``: the task's own collate for ragged items (it pads the ids and builds the mask)."""
    def collate_with_activations(items: list[dict]) -> dict:
        acts = [it.pop(KEY) for it in items]
        if ragged:
            batch = collate(items)
            longest = batch["input_ids"].shape[1]
            padded = acts[0].new_zeros((len(acts), longest, acts[0].shape[-1]))  # (B, T, H)
            for row, a in enumerate(acts):
                padded[row, : a.shape[0]] = a
            batch[KEY] = padded
            return batch
        labels = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        stacked = torch.stack(acts)  # (B, ...) the frozen prefix's output
        # The replayed stem ignores its input; a 1-pixel placeholder keeps the call signature.
        placeholders = {k: stacked.new_zeros((len(items), 3, 1, 1), dtype=torch.float32) for k in inputs}
        return {**placeholders, "labels": labels, "index": torch.tensor([it["index"] for it in items]), KEY: stacked}
    return collate_with_activations


def _load_or_compute(path: Path, compute):
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        mmap = "r" if path.stat().st_size > MMAP_BYTES else None
        values = np.load(path, mmap_mode=mmap)
        offsets = np.asarray(meta["offsets"], dtype=np.int64) if meta["offsets"] is not None else None
        return values, offsets, getattr(torch, meta["dtype"]), True
    values, offsets, dtype = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, values)
        tmp.replace(path)
        meta_path.write_text(json.dumps({"offsets": offsets.tolist() if offsets is not None else None,
                                         "dtype": str(dtype).removeprefix("torch.")}))
    except OSError:
        pass  # a read-only cache directory only costs the reuse
    return values, offsets, dtype, False


def _check_replay(model, datasets, batches, replay: Replay, collate, inputs, device, autocast, tolerance: float) -> str:
    """Logits with the replay must equal the normal forward's on real training examples."""
    train = datasets["train"]
    n = min(8, len(train))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast():
            batch = next(iter(batches(train.inner, n)))
            expected = model(**{k: v.to(device) for k, v in batch.items() if k in inputs}).float()
            cached = collate([train[i] for i in batch["index"].tolist()])
            replay.install()
            try:
                got = model(**{k: v.to(device) for k, v in cached.items() if k in inputs + (KEY,)}).float()
            finally:
                replay.remove()
    finally:
        model.train(was_training)
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item() + 1.0
    if not diff <= tolerance * scale:
        return f"replaying cached activations changes this model's logits (max difference {diff:.3g})"
    return ""


def build_prefix_loaders(model, frozen: list[str], datasets: dict, *, batches, collate, digest,
                         inputs: tuple[str, ...], ragged: bool, settings: dict, cfg, device, autocast, precision: str,
                         log):
    """Loaders that carry cached prefix activations, and the installed ``Replay``;
    ``(None, None)`` with the reason logged when this model cannot replay.

    ``frozen``: the frozen modules' names; ``batches(dataset, batch_size)``: eval batches of a
    dataset (with ``index``); ``collate``: the task's collate for ragged items; ``digest(dataset)``:
    a hash of what the dataset feeds the model; ``inputs``: the batch keys the model takes;
    ``ragged``: inputs vary in length (texts); ``settings``: what else the activations depend on."""
    probe_batch = next(iter(batches(datasets["train"], min(2, len(datasets["train"])))))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast():
            order, skeleton, why = _probe(model, list(frozen),
                                          {k: v.to(device) for k, v in probe_batch.items() if k in inputs})
    finally:
        model.train(was_training)
    if order is None:
        log(f"activation cache off: {why}")
        return None, None
    boundary = order[-1]
    weights = weights_digest(model, order)
    key_settings = json.dumps({"format": FORMAT, "kind": "prefix", "frozen": order, **settings,
                               "precision": precision}, sort_keys=True, default=str)
    wrapped, reused = {}, []
    for split, dataset in datasets.items():
        key = hashlib.sha256(f"{weights}|{digest(dataset)}|{key_settings}".encode()).hexdigest()[:32]
        values, offsets, dtype, hit = _load_or_compute(
            cache_dir() / f"prefix-{key}.npy",
            lambda: _compute(model, batches(dataset, cfg.eval_batch_size), len(dataset), boundary, inputs, device,
                             autocast))
        reused.append(f"{split} {'reused' if hit else 'computed once'}")
        wrapped[split] = PrefixDataset(dataset, values, offsets, dtype, ragged)
    replay = Replay(model, order, skeleton)
    collate_cached = _collate_fn(collate, ragged, inputs)
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    why = _check_replay(model, wrapped, batches, replay, collate_cached, inputs, device, autocast, tolerance)
    if why:
        log(f"activation cache off: {why}")
        return None, None
    loaders = {}
    for split, ds in wrapped.items():
        train = split == "train"
        # Same sampler and seed as the uncached path: identical batches in identical order.
        sampler = EpochBatchSampler(len(ds), cfg.batch_size if train else cfg.eval_batch_size, shuffle=train,
                                    seed=cfg.seed, lengths=ds.lengths, group_by_length=cfg.group_by_length)
        loaders[split] = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_cached,
                                    generator=torch.Generator().manual_seed(cfg.seed))
    replay.install()
    log(f"activation cache: frozen layers {order[0]} .. {boundary} run once, replayed from the cache "
        f"({', '.join(reused)})")
    return loaders, replay
