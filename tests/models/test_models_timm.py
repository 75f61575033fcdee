"""timm loader: weight files, key maps, safety of .pth loading, groups and LoRA targets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.errors import TuneforgeError
from tuneforge.models import group_param_names, load_model

MARKER = {"ran": False}


def _pwned():  # what a malicious pickle would run on load
    MARKER["ran"] = True
    return {}


class _Evil:
    def __reduce__(self):
        return (_pwned, ())


def _same_weights(model, ref: dict):
    sd = model.state_dict()
    assert sd.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k


def test_safetensors_loads_bit_identical(tiny_timm_weights):
    arch, path = tiny_timm_weights
    lm = load_model(arch, weights=str(path))
    _same_weights(lm.backbone, load_file(str(path)))
    info = lm.info
    assert (info.family, info.modality) == ("efficientnet", "image")
    assert lm.tokenizer is None
    x = torch.randn(2, *info.preprocessing["input_size"])
    with torch.no_grad():
        assert lm.backbone(x).shape == (2, info.feature_dim)  # num_classes=0 -> pooled features
    assert info.spec == {"kind": "timm", "arch": arch}
    json.dumps(info.preprocessing)
    assert set(info.preprocessing) == {"input_size", "mean", "std", "interpolation", "crop_pct"}


def test_pth_container_and_classifier_dropped(tiny_timm_weights, tmp_path):
    import timm

    arch, path = tiny_timm_weights
    ref = load_file(str(path))
    # a full checkpoint: 10-class head + the usual {"state_dict": ...} wrapper
    full = timm.create_model(arch, num_classes=10).state_dict()
    full.update(ref)
    assert "classifier.weight" in full
    pth = tmp_path / "ckpt.pth"
    torch.save({"state_dict": full, "epoch": 3}, pth)
    lm = load_model(arch, weights=str(pth))
    _same_weights(lm.backbone, ref)


def test_pth_is_loaded_with_weights_only(tiny_timm_weights, tmp_path):
    arch, path = tiny_timm_weights
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": load_file(str(path)), "payload": _Evil()}, bad)
    with pytest.raises(TuneforgeError, match="no code to unpickle.*safetensors"):
        load_model(arch, weights=str(bad))
    assert MARKER["ran"] is False


def test_key_map_callable(tiny_timm_weights, tmp_path):
    from safetensors.torch import save_file

    arch, path = tiny_timm_weights
    ref = load_file(str(path))
    renamed = tmp_path / "renamed.safetensors"
    save_file({f"backbone.{k}": v for k, v in ref.items()}, str(renamed))

    with pytest.raises(TuneforgeError) as e:  # without a map: names the mismatch and the fix
        load_model(arch, weights=str(renamed))
    assert "missing" in str(e.value) and "unexpected" in str(e.value) and "model.key_map" in str(e.value)

    def strip(sd, model):
        assert isinstance(model, torch.nn.Module)
        return {k.removeprefix("backbone."): v for k, v in sd.items()}

    _same_weights(load_model(arch, weights=str(renamed), key_map=strip).backbone, ref)


def test_key_map_module_function_string(tiny_timm_weights, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    arch, path = tiny_timm_weights
    ref = load_file(str(path))
    renamed = tmp_path / "renamed.safetensors"
    save_file({f"net.{k}": v for k, v in ref.items()}, str(renamed))
    (tmp_path / "my_key_maps.py").write_text(
        "def strip_net(sd, model):\n    return {k[len('net.'):]: v for k, v in sd.items()}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    lm = load_model(arch, weights=str(renamed), key_map="my_key_maps:strip_net")
    _same_weights(lm.backbone, ref)
    with pytest.raises(TuneforgeError, match="could not be imported"):
        load_model(arch, weights=str(renamed), key_map="my_key_maps:nope")


def test_unknown_key_map_name_suggests(tiny_timm_weights):
    arch, path = tiny_timm_weights
    with pytest.raises(TuneforgeError, match="did you mean 'efficientnet_pytorch'"):
        load_model(arch, weights=str(path), key_map="efficientnet_pytorh")


def test_shape_mismatch_is_reported(tiny_timm_weights, tmp_path):
    from safetensors.torch import save_file

    arch, path = tiny_timm_weights
    sd = load_file(str(path))
    sd["conv_stem.weight"] = torch.zeros(1, 1, 1, 1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(TuneforgeError, match=r"other shapes \(e\.g\. conv_stem\.weight"):
        load_model(arch, weights=str(bad))


def test_pretrained_without_weights_never_downloads(tiny_timm_weights):
    arch, _ = tiny_timm_weights
    with pytest.raises(TuneforgeError, match="set model.weights to a local"):
        load_model(arch)
    lm = load_model(arch, pretrained=False)  # random init is fine
    assert "random init" in lm.info.source


def test_missing_weights_file(tiny_timm_weights, tmp_path):
    arch, _ = tiny_timm_weights
    with pytest.raises(TuneforgeError, match="does not exist"):
        load_model(arch, weights=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize(
    "arch,family,first,last",
    [
        ("test_efficientnet", "efficientnet", ["conv_stem", "bn1"], ["blocks.4", "conv_head", "bn2"]),
        ("test_vit", "vit", ["cls_token", "pos_embed", "patch_embed"], ["blocks.5", "norm"]),
        ("test_resnet", "resnet", ["conv1", "bn1"], ["layer4"]),
        ("test_convnext", "convnext", ["stem"], ["head"]),
    ],
)
def test_timm_groups_and_lora_targets(arch, family, first, last):
    peft = pytest.importorskip("peft")
    lm = load_model(arch, pretrained=False)
    info = lm.info
    assert info.family == family
    assert info.layer_groups[0] == first and info.layer_groups[-1] == last
    per_group = group_param_names(lm.backbone, info.layer_groups)
    flat = [n for g in per_group for n in g]
    assert sorted(flat) == sorted(n for n, _ in lm.backbone.named_parameters())
    assert len(flat) == len(set(flat)) and all(per_group)
    # the defaults must be accepted by peft as they are
    model = peft.get_peft_model(lm.backbone, peft.LoraConfig(r=2, target_modules=info.lora_targets))
    x = torch.randn(1, *info.preprocessing["input_size"])
    with torch.no_grad():
        assert model(x).shape == (1, info.feature_dim)


def test_build_model_info_for_timm_model():
    import timm

    from tuneforge.models import build_model_info

    model = timm.create_model("test_vit", num_classes=0)
    info = build_model_info(model)
    assert info.family == "vit" and info.spec == {"kind": "timm", "arch": "test_vit"}
    assert info.feature_dim == model.num_features


def test_unknown_timm_arch_suggests():
    with pytest.raises(TuneforgeError, match="did you mean 'efficientnet_lite0'"):
        load_model("efficientnet_lite00", source="timm", pretrained=False)
