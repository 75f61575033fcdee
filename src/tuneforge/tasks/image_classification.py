"""`image-classification`: one label per image, from an image folder or a manifest.

Images are decoded lazily per item (augmentation differs every epoch); the
pipeline (EXIF orientation, any mode to RGB, resize/crop/normalise to what the
backbone was pretrained on) lives in ``tuneforge.data.images``.
"""

from __future__ import annotations

import os
from typing import ClassVar, Optional

import torch
from pydantic import Field
from torch.utils.data import DataLoader

from ..data.batching import EpochBatchSampler
from ..evaluation.names import metric_names
from .base import ClassificationTask, LabelMap
from .options import TYPE_DOC, HeadDropout, TaskOptions, register_task


class ImageClassificationOptions(TaskOptions):
    """One label per image, from an image folder (one sub-folder per class) or a manifest of image paths; the backbone's pooled features feed a new linear head."""

    type: str = Field("image-classification", description=TYPE_DOC)
    image_size: Optional[int] = Field(None, ge=16, description="Square input size for images; default: the backbone's pretrained input size.")
    head_dropout: HeadDropout = 0.1

    modality: ClassVar[str] = "image"
    default_metric: ClassVar[str] = "accuracy"
    # Facts, not options: images carry one label each here (multi-label images are not supported,
    # so `task.multi_label` is an unknown key), and a timm backbone built with num_classes=0 pools
    # its own features. Declared so the code shared with text classification, and the activation
    # cache's key, read the values they always read.
    multi_label: ClassVar[bool] = False
    pooling: ClassVar[str] = "mean"

    def metric_names(self) -> list[str]:
        return metric_names(multi_label=False)

    @property
    def metric_kind(self) -> str:
        return "single-label"



def default_workers(device: str) -> int:
    """Image-loading worker processes when ``data.num_workers`` is not set: the image modality's
    rule (``modalities.py``: one on a GPU, none on CPU, measured)."""
    from ..engine.precision import resolve_device
    from ..modalities import modality_of

    return modality_of(ImageClassificationOptions.modality).default_workers(resolve_device(device))

@register_task("image-classification", ImageClassificationOptions)
class ImageClassification(ClassificationTask):
    modality = ImageClassificationOptions.modality

    def __init__(self, recipe):
        super().__init__(recipe)
        self.preprocessing: dict = {}

    def read(self, split: str, path: str, *, limit: int | None, skipped: list, log=None) -> list:
        from ..data.images import filter_readable_images, read_image_records

        data = self.recipe.data
        scope = f"data.columns.{split}" if split != "train" else "data"
        records = read_image_records(
            path, image_column=data.column(split, "image"), label_column=data.column(split, "label"), limit=limit,
            hints={"image": f"{scope}.image_column", "label": f"{scope}.label_column", "id": "data.id_column"},
            format=data.format, encoding=data.encoding, on_bad_record=data.on_bad_record, skipped=skipped,
            id_column=data.id_column, label_kind="labels" if self.multi_label else "label",
        )
        # Decode every image once, now: a corrupt file found hours into training
        # would cost the whole run (and in a loader worker its error is buried).
        return filter_readable_images(records, on_bad_record=data.on_bad_record, skipped=skipped,
                                      max_pixels=data.max_image_pixels)

    def attach(self, loaded, log=None) -> None:
        self.preprocessing = dict(loaded.info.preprocessing)
        size = self.recipe.task.image_size
        if size:
            self.preprocessing["input_size"] = [3, size, size]

    def transform(self, train: bool):
        from ..data.images import build_image_transform

        data = self.recipe.data
        return build_image_transform(self.preprocessing, train=train, augment=data.augment,
                                     hflip=data.hflip, scale=tuple(data.crop_scale))

    def dataset(self, records: list, labels: LabelMap, split: str):
        from ..data.images import ImageDataset

        # Every label checked now, before any training; raw values (str or int) -> ids.
        label_to_id = {r.values["label"]: self.encode_label(r, labels) for r in records}
        return ImageDataset(records, label_to_id, self.transform(train=split == "train"),
                            max_pixels=self.recipe.data.max_image_pixels)

    def loader(self, dataset, batch_size: int, *, train: bool, seed: int) -> DataLoader:
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, keyed=train)
        if train:
            dataset = SeededItems(dataset, seed)
        workers = self.recipe.data.num_workers
        if workers is None:
            workers = default_workers(self.recipe.train.device)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                          collate_fn=_collate, generator=torch.Generator().manual_seed(seed),
                          worker_init_fn=_leave_signals_to_the_main_process if workers else None)

    def collate(self, items: list[dict]) -> dict:
        return _collate(items)

    def settings(self) -> dict:
        return {"preprocessing": self.preprocessing}

    def restore(self, settings: dict) -> None:
        """Take back what :meth:`settings` recorded (a saved run being loaded)."""
        if "preprocessing" in settings:
            self.preprocessing = settings["preprocessing"]

    # -- prediction
    def encode_inputs(self, images: list) -> dict:
        from ..data.images import load_image

        tf = self.transform(train=False)
        limit = self.recipe.data.max_image_pixels
        pixels = [tf(load_image(im, max_pixels=limit) if isinstance(im, (str, os.PathLike)) else im.convert("RGB"))
                  for im in images]
        return {"pixel_values": torch.stack(pixels)}


class SeededItems(torch.utils.data.Dataset):
    """Random augmentation seeded per item from (seed, epoch, index).

    A crop and flip then depend only on which example in which epoch, not on the
    worker that loads it or on where an iterator started, so a resumed run sees
    exactly the images an uninterrupted run saw. The RNGs are forked, so the
    caller's (dropout) streams are untouched when loading runs in-process.
    """

    def __init__(self, inner, seed: int):
        self.inner, self.seed = inner, seed
        self.where = [r.where for r in getattr(inner, "records", [])]

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key):
        import random

        epoch, index = key
        item_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                return self.inner[index]
        finally:
            random.setstate(state)


def _leave_signals_to_the_main_process(_worker_id: int) -> None:
    """A SIGTERM to the process group (timeout, schedulers) or Ctrl-C reaches the loader
    workers too; a worker that dies of it takes the main process's graceful
    stop-and-save down with it. Workers ignore both; the main process finishes the
    step, saves a checkpoint and shuts them down."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),  # (B, 3, H, W)
        "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items]),
    }
