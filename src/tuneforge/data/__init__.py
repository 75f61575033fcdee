"""Data readers: tabular records, image records and pixels, splits, the demo digits set.

Submodules import lazily (``tuneforge.data.ImageDataset`` pulls in torch only when used),
so reading a CSV never pays for torch, timm or scikit-learn.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Record": "records",
    "read_records": "records",
    "resolve_format": "records",
    "file_fingerprint": "fingerprint",
    "FORMATS": "records",
    "IMAGE_EXTENSIONS": "images",
    "DEFAULT_MAX_PIXELS": "images",
    "read_image_records": "images",
    "load_image": "images",
    "filter_readable_images": "images",
    "build_image_transform": "images",
    "ImageDataset": "images",
    "stratified_split": "splits",
    "label_counts": "splits",
    "materialise_digits": "digits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # PEP 562 lazy attribute
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
