"""What tuneforge knows about each input modality: one table, the sibling of ``models.FAMILIES``.

Code that must treat texts and images differently (speed-ups, prediction, serving, export,
forgetting, cross-validation) reads a :class:`Modality` from :data:`MODALITIES` instead of
comparing ``modality == "image"``. Adding a modality (audio is next) is one entry here plus
the tasks that read it.

Heavy imports (PIL, the image transforms, numpy) happen inside the functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import TuneforgeError


@dataclass(frozen=True)
class Modality:
    name: str
    input: str                     # the record field (and default data column) holding one input: text / image
    model_inputs: tuple[str, ...]  # the batch keys a model's forward takes
    request_field: str             # the JSON field of a `tuneforge serve` request: {"inputs": [...]} / {"images": [...]}
    spatial: bool                  # 4-D (B, C, H, W) batches: channels-last memory layout applies
    variable_length: bool          # batch shapes vary with the inputs (dynamic compile; ragged cached activations)
    tokenized: bool                # inputs go through the model's tokenizer (saved beside exports)
    files: bool                    # an input may be a file path (relative to its manifest; folders list them)
    suffixes: tuple[str, ...]      # file suffixes of inputs when `files`
    random_inputs: Callable        # (recipe) -> why training inputs differ every epoch, "" when they do not
    digest: Callable               # (dataset) -> sha256 of what the dataset feeds the model (cache keys)
    read_inputs: Callable          # (path, *, column, label_column, limit, data, hints) -> records
    decode: Callable               # (value, *, max_pixels, where) -> what Task.encode_inputs takes
    synthetic: Callable            # (task, n, generator) -> model inputs when a run's data is gone (export checks)
    default_workers: Callable      # (device) -> DataLoader workers when data.num_workers is unset


# --------------------------------------------------------------------------- text

def _no_randomness(recipe) -> str:
    return ""


def _token_digest(dataset) -> str:
    import numpy as np

    h = hashlib.sha256()
    for ids in dataset.input_ids:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _read_texts(path, *, column: str, label_column: str | None, limit: int | None, data, hints: dict):
    from .data.records import read_records

    columns = {"text": column}
    if label_column:
        columns["label"] = label_column
    return read_records(path, columns=columns, format=data.format, limit=limit, encoding=data.encoding, hints=hints)


def _decode_text(value, *, max_pixels: int | None = None, where: str = "input"):
    if not isinstance(value, str):
        raise TuneforgeError(f"{where} is not a string")
    return value


def _synthetic_tokens(task, n: int, generator):
    import torch

    vocab = getattr(task.tokenizer, "vocab_size", 100)
    ids = torch.randint(5, max(6, vocab), (n, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1 % n, 8:] = 0  # one padded row: an exported graph must honour the mask
    return {"input_ids": ids, "attention_mask": mask}


def _no_workers(device) -> int:
    return 0  # texts are tokenised once, before training: nothing is left to do per batch


# --------------------------------------------------------------------------- images

def _augmentation(recipe) -> str:
    if recipe.data.augment:
        return "random augmentation changes the model's input every epoch (set data.augment: false to cache)"
    return ""


def _file_digest(dataset) -> str:
    h = hashlib.sha256()
    for record in dataset.records:
        path = Path(str(record.values["image"]))
        stat = path.stat() if path.exists() else None
        h.update(f"{path}|{stat.st_size if stat else ''}|{stat.st_mtime_ns if stat else ''}\n".encode())
    return h.hexdigest()


def _read_images(path, *, column: str, label_column: str | None, limit: int | None, data, hints: dict):
    from .data.images import read_image_records

    return read_image_records(path, image_column=column, label_column=label_column, limit=limit, hints=hints,
                              format=data.format, encoding=data.encoding, on_bad_record="error", skipped=[])


def _decode_image(value, *, max_pixels: int | None = None, where: str = "image"):
    """A path, raw bytes or a PIL image -> an upright RGB PIL image (limits enforced)."""
    import os

    from .data.images import load_image

    if isinstance(value, (str, os.PathLike, bytes)):
        return load_image(value, max_pixels=max_pixels, where=where)
    return value.convert("RGB")


def _synthetic_images(task, n: int, generator):
    import torch

    size = task.preprocessing.get("input_size", [3, 224, 224])
    return {"pixel_values": torch.randn(n, *[int(s) for s in size], generator=generator)}


def _image_workers(device) -> int:
    """On a GPU one worker decodes and augments the next batch while the GPU computes. On CPU
    the training threads already hold every core: a worker preempts one of them and the rest
    of the OpenMP team waits, so loading runs in the main process (EfficientNet-Lite0 on 2
    cores: 63-66 images/s without a worker, 49-61 with one; PERFORMANCE.md)."""
    import os

    return 1 if device.type == "cuda" and (os.cpu_count() or 1) >= 2 else 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

MODALITIES: dict[str, Modality] = {
    "text": Modality("text", "text", ("input_ids", "attention_mask"), "inputs", spatial=False, variable_length=True, tokenized=True,
                     files=False, suffixes=(), random_inputs=_no_randomness, digest=_token_digest,
                     read_inputs=_read_texts, decode=_decode_text, synthetic=_synthetic_tokens,
                     default_workers=_no_workers),
    "image": Modality("image", "image", ("pixel_values",), "images", spatial=True, variable_length=False, tokenized=False,
                      files=True, suffixes=IMAGE_SUFFIXES, random_inputs=_augmentation, digest=_file_digest,
                      read_inputs=_read_images, decode=_decode_image, synthetic=_synthetic_images,
                      default_workers=_image_workers),
}


def modality_of(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise TuneforgeError(f"unknown modality '{name}'; known: {', '.join(MODALITIES)}") from None
