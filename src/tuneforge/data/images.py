"""Image records (class folders or manifests), robust RGB loading, and timm transforms.

Real image collections are messy: greyscale next to CMYK JPEGs, palette PNGs with
transparency, 16-bit TIFFs, phone photos stored sideways with an EXIF rotation flag,
zero-byte files from interrupted copies. ``load_image`` turns all of them into upright
8-bit RGB or into a ``TuneforgeError`` that names the file and the fix, so a bad file
never surfaces as a bare ``OSError`` from inside a DataLoader worker.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from tuneforge.data.records import Record, read_records
from tuneforge.errors import TuneforgeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "build_image_transform",
    "filter_readable_images",
    "load_image",
    "read_image_records",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# PIL's own default guard is ~89M pixels (warning) / ~179M (error). 100M still admits a
# 10k x 10k scan but stops a crafted PNG that would inflate to tens of GB in a worker.
DEFAULT_MAX_PIXELS = 100_000_000
_SKIP_FIX = "remove or replace the file, or set data.on_bad_record: skip"
_LAYOUT = (
    "expected one sub-folder per class, e.g.\n"
    "  {root}/\n"
    "    cat/ 0001.jpg 0002.png ...\n"
    "    dog/ 0001.jpg ...\n"
    f"(image extensions: {', '.join(IMAGE_EXTENSIONS)})"
)


# ---------------------------------------------------------------- records


def read_image_records(
    path: str | Path,
    *,
    image_column: str = "image",
    label_column: str | None = "label",
    limit: int | None = None,
    hints: dict[str, str] | None = None,
    format: str = "auto",
    encoding: str = "utf-8",
    on_bad_record: str = "error",
    skipped: list[str] | None = None,
    id_column: str | None = None,
    label_kind: str = "label",
) -> list[Record]:
    """Records ``{"image": <absolute path str | bytes>, "label": <class>}`` from a class folder
    tree or from a CSV/TSV/JSONL/Parquet manifest.

    A folder must hold one sub-folder per class (the class name is the folder name);
    ``label_column=None`` reads an unlabelled folder (all images, any depth) or manifest.
    A symbolic link inside the folder (a file or a class folder) may not lead out of it:
    like a manifest, a folder of images is often someone else's, and a link to
    ``/etc/passwd`` named ``cat/1.png`` must not make us read it. Links that stay inside
    the folder are followed.
    Manifest image paths are resolved against the manifest's own directory, and a relative
    path may not lead out of it (``../../etc/passwd``, or a symlink that resolves elsewhere):
    a manifest is data, often from someone else, and must not make us read arbitrary files.
    Absolute paths are allowed -- writing one is an explicit choice. Parquet manifests may
    embed the image bytes (Hugging Face's ``{"bytes", "path"}`` struct).
    ``id_column``: a required column of unique ids (role "id"; manifests only).
    ``label_kind``: "label" (one label per image) or "labels" (a list or a separated string:
    multi-label); a manifest label of another type is a bad record (:func:`read_records`' kinds).
    ``limit``, ``on_bad_record`` and ``skipped`` work as in :func:`read_records`.
    """
    path = Path(path)
    hints = dict(hints or {})
    if path.is_dir():
        if id_column is not None:
            raise TuneforgeError(
                f"{hints.get('id', 'data.id_column')} is set to '{id_column}', but {path} is an image folder, which "
                "has no columns (each image is identified by its path) — remove "
                f"{hints.get('id', 'data.id_column')}, or list the images in a CSV/JSONL manifest with an id column"
            )
        return _read_folder(path.resolve(), labelled=label_column is not None, limit=limit)
    columns = {"image": image_column} if label_column is None else {"image": image_column, "label": label_column}
    if id_column is not None:
        columns["id"] = id_column
    sink = skipped if skipped is not None else []
    records = read_records(path, columns=columns, format=format, limit=limit, hints=hints,
                           encoding=encoding, on_bad_record=on_bad_record, skipped=sink,
                           unique=("id",) if id_column is not None else (),
                           kinds={"label": label_kind, "id": "id"})
    base = path.resolve().parent
    out = []
    for record in records:
        image, problem = _resolve_image(record.values["image"], base)
        if problem is _ESCAPES:
            # Never skippable: quietly dropping the line would hide that the manifest reaches
            # outside its folder.
            raise TuneforgeError(
                f"{record.where}: image path {str(record.values['image'])[:200]!r} leads outside the manifest's "
                f"folder {base} (to {image}); relative paths in a manifest must stay inside its folder — "
                "use an absolute path if you mean that file, or move the manifest up to a folder that "
                "contains the images"
            )
        if problem is not None:
            if on_bad_record == "skip":
                sink.append(f"{record.where}: {problem}")
                continue
            raise TuneforgeError(f"{record.where}: {problem} — fix the path in column '{image_column}' "
                                 f"(relative paths are relative to {path.resolve().parent}), or set "
                                 f"{hints.get('on_bad_record', 'data.on_bad_record')}: skip")
        out.append(Record(values={**record.values, "image": image}, where=record.where))
    if records and not out:
        raise TuneforgeError(f"none of the {len(records)} images listed in {path.name} exist (e.g. {sink[-1]}) "
                             f"— paths are resolved against {path.resolve().parent}")
    return out


_ESCAPES = "leads outside the manifest's folder"  # sentinel problem: an error even with on_bad_record: skip


def _resolve_image(value: object, base: Path) -> tuple[object, str | None]:
    """(absolute path str | bytes, None) or (what was given, problem). ``base`` is resolved."""
    if isinstance(value, dict):  # Hugging Face datasets store images as {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if not isinstance(value, str):
        return value, f"expected an image file path, got {type(value).__name__} {value!r:.40}"
    if "\x00" in value:
        return value, f"the image path {value!r:.80} contains a NUL character"
    try:
        file = Path(value).expanduser()  # "~/x.png" is as explicit as an absolute path
    except RuntimeError:  # "~someone/x.png" for a user this machine does not know
        return value, f"cannot expand '~' in the image path {value!r:.80} (no such user)"
    explicit = file.is_absolute()
    try:
        file = (file if explicit else base / file).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        return value, f"cannot resolve the image path {value!r:.80} ({e})"
    if not explicit and not file.is_relative_to(base):
        return str(file), _ESCAPES
    try:
        found = file.is_file()
    except OSError as e:  # pathlib ignores ENOENT/ENOTDIR but not ENAMETOOLONG, EACCES, ...
        return value, f"cannot access the image path {value!r:.80} ({e.strerror or e})"
    if not found:
        return value, f"image file not found: {value} (looked for {file})"
    return str(file), None


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    # Sorted by relative path so record order (and hence seeded splits) is identical on
    # every machine; os.listdir order is filesystem-dependent.
    return sorted((p for p in folder.rglob("*") if _is_image(p)), key=lambda p: p.relative_to(folder).as_posix())


def _inside(root: Path, path: Path) -> Path:
    """``path`` resolved, refused when a link takes it out of ``root`` (which is resolved). Never
    skippable, like a manifest path that escapes: skipping would hide that the folder reaches out."""
    real = path.resolve()
    if not real.is_relative_to(root):
        shown = f"{root.name}/{path.relative_to(root).as_posix()}"
        raise TuneforgeError(
            f"{shown} is a link to {real}, outside the image folder {root}; links inside an image folder must "
            "stay inside it — copy the file (or folder) into the image folder instead of linking it, or list "
            "the images in a CSV manifest with absolute paths if you mean to use files from elsewhere"
        )
    return real


def _read_folder(root: Path, *, labelled: bool, limit: int | None) -> list[Record]:
    def record(file: Path, label: str | None) -> Record:
        values: dict[str, object] = {"image": str(_inside(root, file))}
        if label is not None:
            values["label"] = label
        return Record(values=values, where=f"{root.name}/{file.relative_to(root).as_posix()}")

    if not labelled:
        files = _images_under(root)
        if not files:
            raise TuneforgeError(f"no images found under {root} (image extensions: {', '.join(IMAGE_EXTENSIONS)}) "
                                 "— check the folder path in the recipe")
        return [record(f, None) for f in files[:limit]]

    per_class: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        _inside(root, sub)  # a class folder linked from elsewhere
        files = _images_under(sub)
        if files:
            per_class[sub.name] = files
        else:
            warnings.warn(f"class folder {root.name}/{sub.name} holds no images; it is ignored", stacklevel=3)
    if not per_class:
        loose = sum(1 for p in root.iterdir() if _is_image(p))
        found = f"found {loose} images directly in {root} but no class sub-folders; " if loose else \
            f"no class sub-folders with images in {root}; "
        raise TuneforgeError(found + _LAYOUT.format(root=root.name) + " — move the images into class folders, "
                             "or use a CSV manifest with image and label columns")
    if limit is not None:
        # "The first N" of a folder tree would be N images of the first class; take them
        # round-robin across classes instead so a quick limited run still sees every class.
        picked: dict[str, list[Path]] = {c: [] for c in per_class}
        queues = {c: iter(files) for c, files in per_class.items()}
        taken = 0
        while taken < limit and queues:
            for c in list(queues):
                if taken >= limit:
                    break
                nxt = next(queues[c], None)
                if nxt is None:
                    del queues[c]
                    continue
                picked[c].append(nxt)
                taken += 1
        per_class = picked
    return [record(f, c) for c, files in per_class.items() for f in files]


# ---------------------------------------------------------------- pixels


def load_image(source: str | Path | bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               where: str | None = None) -> Image.Image:
    """Open ``source`` (a path or encoded bytes) as an upright 8-bit RGB image.

    ``max_pixels`` caps width*height (``None``: only PIL's process-wide ``Image.MAX_IMAGE_PIXELS``
    guard applies). ``where`` (e.g. "train.csv line 4") is added to error messages.
    """
    is_bytes = isinstance(source, (bytes, bytearray))
    name = f"<{len(source)} bytes>" if is_bytes else str(source)
    # Folder records' `where` is already the tail of the path; manifest ones add the line.
    if where and not name.endswith(where.split("/", 1)[-1]):
        name = f"{name} ({where})"
    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # PIL only has a process-wide limit; raise it to the caller's explicit, larger cap so
        # that our per-call check below is the one that decides.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        if not is_bytes and Path(source).stat().st_size == 0:
            raise TuneforgeError(f"cannot read image {name}: the file is empty (0 bytes) — {_SKIP_FIX}")
        with warnings.catch_warnings():
            # PIL *warns* between 1x and 2x its limit; we want a hard, explicit cap instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with (io.BytesIO(source) if is_bytes else open(source, "rb")) as f:
                im = Image.open(f)
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels")
                # Decode now, while the file is open: truncation surfaces here rather than as a
                # confusing error deep inside a transform (unless someone set
                # ImageFile.LOAD_TRUNCATED_IMAGES, which hides it).
                im.load()
    except TuneforgeError:
        raise
    except Image.DecompressionBombError as e:
        limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
        raise TuneforgeError(f"image {name} is too large ({e}; the limit is {limit:,} pixels, a guard against "
                             f"decompression bombs) — downscale the file, raise data.max_image_pixels if you "
                             f"trust it, or {_SKIP_FIX}") from None
    except FileNotFoundError:
        raise TuneforgeError(f"image {name} not found — {_SKIP_FIX}") from None
    except UnidentifiedImageError:  # its own message embeds a file-object repr; say it plainly
        raise TuneforgeError(f"cannot read image {name}: not a recognised image format (or a corrupt header) — "
                             f"{_SKIP_FIX}") from None
    except Exception as e:
        # PIL's plugins raise OSError, SyntaxError, ValueError, EOFError -- and, on crafted or
        # damaged headers, struct.error, IndexError, TypeError, ZeroDivisionError, MemoryError.
        # Only decoding of this one file runs in the try block, so each of them means "bad file".
        raise TuneforgeError(f"cannot read image {name}: {_short(e)} (truncated, corrupt or not an image) "
                             f"— {_SKIP_FIX}") from None
    try:
        im = ImageOps.exif_transpose(im)  # phones store portrait shots sideways + an EXIF rotation
    except Exception:  # a malformed EXIF block should not cost us an otherwise good image
        pass
    try:
        return _to_rgb(im)
    except Exception as e:  # a mode PIL opens but cannot convert (or a malformed palette)
        raise TuneforgeError(f"cannot convert image {name} (mode {im.mode}) to RGB: {_short(e)} — "
                             f"re-save it as an 8-bit RGB PNG or JPEG, or {_SKIP_FIX}") from None


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}" if not isinstance(err, OSError) or not text else text


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(im, np.asarray(im))).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Composite on white: converting RGBA straight to RGB keeps whatever colour hides
        # under alpha=0 (often black), which turns logos and icons into black squares.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _high_depth_to_uint8(im: Image.Image, a: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit / float greyscale -> 0..255 by *scaling*; PIL's convert("L") clips at 255,
    which turns almost every 16-bit image pure white."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = a / 65535.0 * 255.0  # full 16-bit range: preserves absolute brightness
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0  # float images in [0, 1]
    else:
        scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)  # unknown range: stretch
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def filter_readable_images(records: Sequence[Record], *, on_bad_record: str = "skip",
                           skipped: list[str] | None = None,
                           max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[Record]:
    """Decode every image once and drop (``"skip"``) or raise on (``"error"``) unreadable ones.

    Costs one full decode per image, so call it only when ``data.on_bad_record: skip``:
    in ``"error"`` mode :class:`ImageDataset` raises lazily at the first bad file anyway.
    """
    kept = []
    for record in records:
        try:
            load_image(record.values["image"], max_pixels=max_pixels, where=record.where)
        except TuneforgeError as e:
            if on_bad_record != "skip":
                raise
            if skipped is not None:
                skipped.append(f"{record.where}: {str(e).split(' — ')[0]}")
            continue
        kept.append(record)
    return kept


# ---------------------------------------------------------------- transforms


def build_image_transform(preprocessing: dict, *, train: bool, augment: bool = True, hflip: float = 0.5,
                          scale: tuple[float, float] = (0.08, 1.0), **timm_kwargs) -> Callable:
    """PIL RGB image -> float tensor (3, H, W), built by timm's ``create_transform``.

    ``preprocessing`` is the backbone's pretrained config: ``{"input_size": [3, H, W],
    "mean": [...], "std": [...], "interpolation": "bicubic", "crop_pct": 0.875}``.
    train and augment: RandomResizedCrop(scale) + horizontal flip, no colour jitter
    (timm's default 0.4 jitter hurts small fine-tuning sets more than it helps; pass
    ``color_jitter=0.4`` to get it back). Otherwise: resize to size/crop_pct, centre crop,
    normalise -- deterministic, the same protocol the backbone was evaluated with.
    Extra keyword arguments go to ``timm.data.create_transform``.
    """
    from timm.data import create_transform  # lazy: timm imports take a second

    size = preprocessing.get("input_size")
    if isinstance(size, int):
        size = (3, size, size)
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and size[0] == 3 and all(int(s) > 0 for s in size)):
        raise TuneforgeError(f"preprocessing.input_size must be [3, height, width], got {size!r} — "
                             "fix the model's preprocessing settings")
    mean = tuple(preprocessing.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(preprocessing.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise TuneforgeError(f"preprocessing.mean/std must be 3 numbers each (std > 0), got {mean} / {std}")
    timm_kwargs.setdefault("color_jitter", None)
    return create_transform(
        input_size=tuple(int(s) for s in size),
        is_training=train and augment,
        mean=mean,
        std=std,
        interpolation=preprocessing.get("interpolation", "bicubic"),
        crop_pct=preprocessing.get("crop_pct", 0.875),
        hflip=hflip,
        scale=tuple(scale),
        **timm_kwargs,
    )


class ImageDataset(Dataset):
    """Records -> ``{"pixel_values": (3, H, W) float, "labels": int, "index": i}``, decoding lazily.

    Labels are checked against ``label_to_id`` up front, so a validation image of a class
    the training set lacks is reported before training, not at the first eval.
    ``label_to_id=None`` makes an unlabelled dataset (no "labels" key) for prediction.
    """

    def __init__(self, records: Sequence[Record], label_to_id: dict | None, transform: Callable, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.records = list(records)
        self.transform = transform
        self.max_pixels = max_pixels
        self.labels: list[int] | None = None
        if label_to_id is not None:
            self.labels = []
            for r in self.records:
                label = r.values.get("label")
                if label not in label_to_id:
                    known = ", ".join(map(str, list(label_to_id)[:20]))
                    raise TuneforgeError(f"{r.where}: label {label!r} is not one of the training labels ({known}) "
                                         "— fix the label, or add examples of it to the training data")
                self.labels.append(int(label_to_id[label]))

    def __len__(self) -> int:
        return len(self.records)

    # The dataset contract the caches and the trainer read (TokenisedDataset has the same):
    @property
    def targets(self) -> list[int] | None:
        return self.labels

    @property
    def where(self) -> list[str]:
        return [r.where for r in self.records]

    lengths = None  # every image becomes the same (3, H, W): no length to group or pad by

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        image = load_image(r.values["image"], max_pixels=self.max_pixels, where=r.where)
        item = {"pixel_values": self.transform(image), "index": i}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item
