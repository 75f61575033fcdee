"""Image records, robust RGB loading of awkward modes, and timm transforms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tuneforge.data.images import (
    ImageDataset,
    build_image_transform,
    filter_readable_images,
    load_image,
    read_image_records,
)
from tuneforge.data.records import Record
from tuneforge.errors import TuneforgeError

PRE = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.875}


def png(path, size=(12, 10), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    for cls, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            png(root / cls / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_image_folder_records(folder):
    recs = read_image_records(folder)
    assert [r.values["label"] for r in recs] == ["cat"] * 3 + ["dog"] * 2
    assert recs[0].where == "train/cat/0.png"
    assert recs[0].values["image"] == str((folder / "cat" / "0.png").resolve())


def test_image_folder_limit_is_round_robin_over_classes(folder):
    assert sorted(r.values["label"] for r in read_image_records(folder, limit=3)) == ["cat", "cat", "dog"]


def test_image_folder_without_classes(tmp_path):
    png(tmp_path / "flat" / "a.png")
    with pytest.raises(TuneforgeError, match=r"(?s)found 1 images directly.*cat/ 0001\.jpg"):
        read_image_records(tmp_path / "flat")
    assert len(read_image_records(tmp_path / "flat", label_column=None)) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(TuneforgeError, match="no class sub-folders"):
        read_image_records(tmp_path / "empty")


def test_manifest_relative_paths_and_missing_file(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png")
    m = tmp_path / "m.csv"
    m.write_text("file,cls\nimgs/a.png,x\nimgs/b.png,y\n")
    recs = read_image_records(m, image_column="file", label_column="cls")
    assert recs[1].values == {"image": str((tmp_path / "imgs" / "b.png").resolve()), "label": "y"}
    m.write_text("file,cls\nimgs/a.png,x\nimgs/gone.png,y\n")
    with pytest.raises(TuneforgeError, match=r"m\.csv line 3: image file not found: imgs/gone\.png"):
        read_image_records(m, image_column="file", label_column="cls")
    skipped: list[str] = []
    assert len(read_image_records(m, image_column="file", label_column="cls", on_bad_record="skip",
                                  skipped=skipped)) == 1
    assert skipped[0].startswith("m.csv line 3")


def rgb_at(img, xy=(0, 0)):
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_load_image_modes(tmp_path):
    Image.new("L", (4, 4), 100).save(tmp_path / "l.png")
    assert rgb_at(load_image(tmp_path / "l.png")) == (100, 100, 100)

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black -> white, not black
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    im = load_image(tmp_path / "rgba.png")
    assert rgb_at(im) == (255, 255, 255) and rgb_at(im, (1, 1)) == (255, 0, 0)

    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((2, 2), 1)
    p.save(tmp_path / "p.png", transparency=0)
    im = load_image(tmp_path / "p.png")
    assert rgb_at(im) == (255, 255, 255) and rgb_at(im, (2, 2)) == (0, 255, 0)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = rgb_at(load_image(tmp_path / "cmyk.jpg"))
    assert r > 200 and g < 60 and b < 60


def test_load_image_16_bit_and_float_scale_instead_of_clipping(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    im = load_image(tmp_path / "g16.png")
    assert [rgb_at(im, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    im = load_image(tmp_path / "f.tif")
    assert [rgb_at(im, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (30, 10), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (10, 30)


def test_bad_files_raise_tuneforge_error(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(TuneforgeError, match=r"zero\.png.*empty.*on_bad_record: skip"):
        load_image(tmp_path / "zero.png")
    good = png(tmp_path / "good.png", size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(TuneforgeError, match=r"trunc\.png.*remove or replace the file"):
        load_image(tmp_path / "trunc.png")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(TuneforgeError, match=r"cannot read image .*text\.jpg"):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(TuneforgeError, match="not found"):
        load_image(tmp_path / "missing.png")
    recs = [Record({"image": str(good)}, "a"), Record({"image": str(tmp_path / "trunc.png")}, "b")]
    skipped: list[str] = []
    assert filter_readable_images(recs, skipped=skipped) == recs[:1] and skipped[0].startswith("b: ")


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    f = png(tmp_path / "big.png", size=(100, 100))
    with pytest.raises(TuneforgeError, match=r"too large .*limit is 5,000 pixels"):
        load_image(f, max_pixels=5000)
    assert load_image(f, max_pixels=10_000).size == (100, 100)
    # PIL's own process-wide guard (error above 2x its limit) is converted too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TuneforgeError, match="too large"):
            load_image(f, max_pixels=None)


def test_transforms_shapes_and_eval_determinism(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    ev = build_image_transform(PRE, train=False)
    a, b = ev(img), ev(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(build_image_transform(PRE, train=True, augment=False)(img), a)
    tr = build_image_transform(PRE, train=True)
    torch.manual_seed(0)
    assert tr(img).shape == (3, 32, 32)
    assert "ColorJitter" not in repr(tr) and "RandomResizedCrop" in repr(tr)
    with pytest.raises(TuneforgeError, match="input_size"):
        build_image_transform({"input_size": [1, 2]}, train=False)


def test_image_dataset(folder):
    recs = read_image_records(folder)
    ds = ImageDataset(recs, {"cat": 0, "dog": 1}, build_image_transform(PRE, train=False))
    item = ds[4]
    assert item["pixel_values"].shape == (3, 32, 32) and item["labels"] == 1 and item["index"] == 4
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["labels"].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(TuneforgeError, match=r"train/dog/0\.png: label 'dog' is not one of the training labels"):
        ImageDataset(recs, {"cat": 0}, build_image_transform(PRE, train=False))
    assert "labels" not in ImageDataset(recs, None, build_image_transform(PRE, train=False))[0]


def test_links_out_of_an_image_folder_are_refused(tmp_path, folder):
    # a link named like an image used to be followed wherever it led (/etc/passwd), as was a
    # class folder linked in from elsewhere
    secret = png(tmp_path / "outside" / "secret.png")
    (folder / "cat" / "inside.png").symlink_to(folder / "cat" / "0.png")  # stays inside: followed
    assert len(read_image_records(folder)) == 6
    link = folder / "dog" / "passwd.png"
    link.symlink_to(secret)
    for labelled in (True, False):
        with pytest.raises(TuneforgeError) as e:
            read_image_records(folder, label_column="label" if labelled else None)
        msg = str(e.value)
        assert "train/dog/passwd.png is a link to" in msg and str(secret.resolve()) in msg, msg
        assert "outside the image folder" in msg and "copy the file" in msg
    link.unlink()
    (folder / "bird").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(TuneforgeError, match=r"train/bird is a link to .*outside the image folder"):
        read_image_records(folder)


def test_manifest_labels_are_typed(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "imgs/a.png", "label": "cat"}\n{"image": "imgs/a.png", "label": ["cat", "dog"]}\n')
    with pytest.raises(TuneforgeError, match=r"m\.jsonl line 2: column 'label' holds a list"):
        read_image_records(m)
    assert read_image_records(m, label_kind="labels")[1].values["label"] == ["cat", "dog"]
