"""Parameter-efficient strategies on tiny models of each family: numeric contracts.

Zero-initialised adapters leave outputs bit-identical; after a few optimizer steps (the
engine's own optimizer and the strategy's parameter groups) frozen parameters are
bit-identical and the number of trainable parameters reported equals the number that
changed; merged equals unmerged within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from tuneforge.engine.optim import build_optimizer
from tuneforge.errors import TuneforgeError
from tuneforge.models import load_model
from tuneforge.recipe import load_recipe
from tuneforge.strategies import get_strategy
from tuneforge.strategies.base import count_params
from tuneforge.strategies.merge import merge_and_check
from tuneforge.tasks.base import Classifier

MERGE_TOL = 1e-4  # x max(1, |logit|), fp32; observed ~1e-7


def _strategy(**options):
    recipe = {"strategy": options}
    if options.pop("image", False):
        recipe.update(task={"type": "image-classification"}, model={"name": "efficientnet-lite0"})
    return get_strategy(load_recipe(recipe).strategy)


def _text_inputs(vocab=20):
    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 11, 3, 0]]) % vocab
    return {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}


def _bert(tiny_bert_dir):
    loaded = load_model(str(tiny_bert_dir))
    torch.manual_seed(0)
    return Classifier(loaded.backbone, loaded.info.feature_dim, 3, "text"), loaded.info, _text_inputs()


def _llama():
    from transformers import LlamaConfig, LlamaModel

    from tuneforge.models.hf import text_info

    torch.manual_seed(0)
    backbone = LlamaModel(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)).eval()
    info = text_info(backbone, source="tiny-llama")
    return Classifier(backbone, info.feature_dim, 3, "text"), info, _text_inputs()


def _vit():
    import timm

    from tuneforge.models.timm_loader import timm_info

    torch.manual_seed(0)
    backbone = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32).eval()
    info = timm_info(backbone, "test_vit", "tiny-vit")
    return Classifier(backbone, info.feature_dim, 3, "image"), info, {"pixel_values": torch.randn(2, 3, 32, 32)}


def _efficientnet(tiny_timm_weights):
    arch, weights = tiny_timm_weights
    loaded = load_model(arch, weights=str(weights))
    torch.manual_seed(0)
    model = Classifier(loaded.backbone, loaded.info.feature_dim, 3, "image")
    return model, loaded.info, {"pixel_values": torch.randn(2, 3, 32, 32)}


def _resnet():
    """Regular 3x3 convolutions (timm's test_resnet: basic blocks)."""
    import timm

    from tuneforge.models.timm_loader import timm_info

    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    info = timm_info(backbone, "test_resnet", "tiny-resnet")
    return Classifier(backbone, info.feature_dim, 3, "image"), info, {"pixel_values": torch.randn(2, 3, 32, 32)}


def _build(kind, tiny_bert_dir, tiny_timm_weights):
    return {"bert": lambda: _bert(tiny_bert_dir), "llama": _llama, "vit": _vit, "resnet": _resnet,
            "efficientnet": lambda: _efficientnet(tiny_timm_weights)}[kind]()


def _train_steps(model, strategy, inputs, info, steps=3, lr=1e-2):
    """A few optimizer steps exactly as the engine builds them (layer-group param groups, fused AdamW)."""
    from types import SimpleNamespace

    from tuneforge.strategies.base import param_groups

    train = SimpleNamespace(lr=lr, head_lr=lr, weight_decay=0.01, layer_decay=None, lr_range=None)
    optimizer = build_optimizer(param_groups(model, info, train), torch.device("cpu"))
    strategy.set_train_mode(model)
    target = torch.tensor([0, 2])
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# --------------------------------------------------------------------------- adapters: zero init is exact

@pytest.mark.parametrize("kind,style,per_layer", [("bert", "houlsby", 2), ("bert", "pfeiffer", 1),
                                                  ("llama", "houlsby", 2), ("vit", "houlsby", 2),
                                                  ("efficientnet", "pfeiffer", None)])
def test_zero_initialised_adapters_leave_outputs_unchanged(kind, style, per_layer, tiny_bert_dir, tiny_timm_weights):
    model, info, inputs = _build(kind, tiny_bert_dir, tiny_timm_weights)
    model.eval()
    with torch.no_grad():
        base = model(**inputs)
    strategy = _strategy(name="adapters", style=style, reduction_factor=4, image=kind in ("vit", "efficientnet"))
    model = strategy.apply(model, info).eval()
    adapters = [n for n, _ in model.named_modules() if n.endswith(".adapter")]
    if per_layer:
        blocks = {"bert": "encoder.layer", "llama": "layers", "vit": "blocks"}[kind]
        assert len(adapters) == per_layer * len(model.backbone.get_submodule(blocks))
    assert adapters and len(adapters) == len(strategy.adapted)
    with torch.no_grad():
        assert torch.equal(model(**inputs), base)  # exactly: the zero up-projection adds 0.0
        for n, p in model.named_parameters():
            if ".adapter.up." in n:
                p.normal_(0, 0.1)
        assert not torch.allclose(model(**inputs), base, atol=1e-4)  # the adapters are in the path


def test_houlsby_needs_attention_outputs(tiny_timm_weights):
    model, info, _ = _efficientnet(tiny_timm_weights)
    with pytest.raises(TuneforgeError, match="style: pfeiffer"):
        _strategy(name="adapters", image=True).apply(model, info)


# --------------------------------------------------------------------------- training contract

CASES = [
    ("bert", {"name": "bitfit"}),
    ("bert", {"name": "adapters", "reduction_factor": 4}),
    ("bert", {"name": "ia3"}),
    ("bert", {"name": "lora", "dora": True, "dropout": 0.0}),
    ("bert", {"name": "lora", "rslora": True, "targets": "all-linear", "dropout": 0.0}),
    ("bert", {"name": "lora", "target_regex": r"encoder\.layer\.1\.attention\.self\.(query|value)", "dropout": 0.0}),
    ("bert", {"name": "prompt-tuning", "virtual_tokens": 4}),
    ("bert", {"name": "prefix-tuning", "virtual_tokens": 4}),
    ("bert", {"name": "prefix-tuning", "virtual_tokens": 4, "projection": True}),
    ("llama", {"name": "adapters", "reduction_factor": 4}),
    ("llama", {"name": "ia3"}),
    ("llama", {"name": "prompt-tuning", "virtual_tokens": 4}),
    ("llama", {"name": "prefix-tuning", "virtual_tokens": 4}),
    ("vit", {"name": "adapters", "reduction_factor": 4}),
    ("vit", {"name": "bitfit"}),
    ("efficientnet", {"name": "bitfit"}),
    ("efficientnet", {"name": "ia3"}),
    ("efficientnet", {"name": "adapters", "style": "pfeiffer", "reduction_factor": 2}),
    ("efficientnet", {"name": "lora", "dora": True, "dropout": 0.0}),
]


@pytest.mark.parametrize("kind,options", CASES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_frozen_bit_identical_and_trainable_count_is_what_changed(kind, options, tiny_bert_dir, tiny_timm_weights):
    model, info, inputs = _build(kind, tiny_bert_dir, tiny_timm_weights)
    strategy = _strategy(**options, image=kind in ("vit", "efficientnet"))
    model = strategy.apply(model, info)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    reported, total = count_params(model)
    assert 0 < reported < total
    _train_steps(model, strategy, inputs, info)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert changed == trainable  # every frozen parameter bit-identical, every trainable one moved
    assert sum(after[n].numel() for n in changed) == reported
    for n, b in model.named_buffers():  # frozen BatchNorm statistics stay put too
        if n in buffers and b.is_floating_point():
            assert torch.equal(b, buffers[n]), n


def test_bitfit_trains_only_biases_and_head(tiny_bert_dir):
    model, info, _ = _bert(tiny_bert_dir)
    model = _strategy(name="bitfit").apply(model, info)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {"task_head.weight", "task_head.bias"} <= set(trainable)
    assert all(n.endswith(".bias") for n in trainable if not n.startswith("task_head."))
    assert not any("pooler" in n for n in trainable)  # never called by the classifier


# --------------------------------------------------------------------------- merge

@pytest.mark.parametrize("kind,options", [
    ("bert", {"name": "lora", "dropout": 0.0}),
    ("bert", {"name": "lora", "dora": True, "dropout": 0.0}),
    ("bert", {"name": "lora", "rslora": True, "rank": 16, "dropout": 0.0}),
    ("bert", {"name": "ia3"}),
    ("efficientnet", {"name": "lora", "dropout": 0.0}),
    ("efficientnet", {"name": "ia3"}),
    ("resnet", {"name": "lora", "dropout": 0.0}),
    ("resnet", {"name": "lora", "dora": True, "dropout": 0.0}),
    ("vit", {"name": "lora", "targets": "all-linear", "dropout": 0.0}),
], ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_merged_equals_unmerged(kind, options, tiny_bert_dir, tiny_timm_weights):
    model, info, inputs = _build(kind, tiny_bert_dir, tiny_timm_weights)
    strategy = _strategy(**options, image=kind in ("vit", "efficientnet", "resnet"))
    model = strategy.apply(model, info)
    if kind == "resnet":
        assert any(m.kernel_size == (3, 3) for n, m in model.named_modules() if n.endswith(".base_layer"))
    _train_steps(model, strategy, inputs, info, steps=5, lr=5e-2)  # a non-trivial update to fold in
    with torch.no_grad():
        unmerged = model(**inputs)
    merged, report = merge_and_check(model, inputs, MERGE_TOL)
    assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        diff = (merged(**inputs) - unmerged).abs().max().item()
    scale = max(1.0, unmerged.abs().max().item())
    assert report["max_abs_logit_diff"] == pytest.approx(diff) and report["logit_scale"] == pytest.approx(scale)
    assert diff <= MERGE_TOL * scale


def test_merge_check_fails_loudly(tiny_bert_dir):
    model, info, inputs = _bert(tiny_bert_dir)
    strategy = _strategy(name="lora", dropout=0.0)
    model = strategy.apply(model, info)
    _train_steps(model, strategy, inputs, info)
    with pytest.raises(TuneforgeError, match="merge_tolerance"):
        merge_and_check(model, inputs, tolerance=1e-30)  # below float rounding: must be reported


# --------------------------------------------------------------------------- prompt / prefix tuning

@pytest.mark.parametrize("name", ["prompt-tuning", "prefix-tuning"])
def test_virtual_tokens_masks_and_base_path(name, tiny_bert_dir):
    """What holds at step 0: the prompt changes outputs, the base model is recovered
    exactly with the prompt disabled, and padding never changes a text's prediction."""
    model, info, inputs = _bert(tiny_bert_dir)
    model.eval()
    with torch.no_grad():
        base = model(**inputs)
    model = _strategy(name=name, virtual_tokens=3).apply(model, info).eval()
    with torch.no_grad():
        prompted = model(**inputs)
        assert prompted.shape == base.shape
        assert not torch.allclose(prompted, base, atol=1e-5)
        # the frozen base inside the wrapper is the base model, untouched
        # (peft's disable_adapter() fails for feature-extraction prompt models, peft 0.21)
        hidden = model.backbone.peft.get_base_model()(**inputs).last_hidden_state
        assert torch.allclose(model.task_head(model.dropout(_mean_pool(hidden, inputs))), base, atol=1e-6)
        short = {k: v[1:, :4] for k, v in inputs.items()}  # the second text alone, without its padding
        assert torch.allclose(model(**short)[0], prompted[1], atol=1e-5)


def _mean_pool(hidden, inputs):
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_prompt_tuning_cls_pooling_reads_the_real_cls(tiny_bert_dir):
    loaded = load_model(str(tiny_bert_dir))
    model = Classifier(loaded.backbone, loaded.info.feature_dim, 3, "text", pooling="cls")
    model = _strategy(name="prompt-tuning", virtual_tokens=3).apply(model, loaded.info).eval()
    inputs = _text_inputs()
    with torch.no_grad():
        full = model.backbone.peft(**inputs).last_hidden_state  # (B, 3 + T, H)
        assert torch.equal(model.features(**inputs), full[:, 3])


def test_prompt_tuning_on_image_model_is_refused():
    with pytest.raises(TuneforgeError, match="prompt-tuning works on text models only"):
        load_recipe({"model": {"name": "efficientnet-lite0"}, "task": {"type": "image-classification"},
                     "strategy": {"name": "prompt-tuning"}})


# --------------------------------------------------------------------------- recipe errors

def test_lora_target_errors_list_module_names(tiny_bert_dir):
    model, info, _ = _bert(tiny_bert_dir)
    with pytest.raises(TuneforgeError, match=r"match no module.*encoder\.layer"):
        _strategy(name="lora", target_regex="nothing.*here").apply(model, info)
    with pytest.raises(TuneforgeError, match="either strategy.targets or strategy.target_regex"):
        load_recipe({"strategy": {"name": "lora", "targets": ["query"], "target_regex": "x"}})
    with pytest.raises(TuneforgeError, match="LoRA cannot adapt"):
        _strategy(name="lora", target_regex=r"encoder\.layer\.0\.attention").apply(model, info)


def test_lora_refuses_same_padded_convs():
    import timm

    from tuneforge.models.timm_loader import timm_info

    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    model = Classifier(backbone, backbone.num_features, 3, "image")
    info = timm_info(backbone, "tf_efficientnet_lite0", "lite0")
    with pytest.raises(TuneforgeError, match="'same' padding.*conv_stem"):
        _strategy(name="lora", target_regex="conv_stem", image=True).apply(model, info)
    merged_ok = _strategy(name="lora", targets="all-linear", image=True).apply(model, info)  # 1x1 convs only
    assert any("lora_A" in n for n, _ in merged_ok.named_parameters())


def test_merge_needs_a_foldable_strategy():
    with pytest.raises(TuneforgeError, match="output.merge"):
        load_recipe({"strategy": {"name": "adapters"}, "output": {"merge": True}})
    assert load_recipe({"strategy": {"name": "ia3"}, "output": {"merge": True}}).output.merge
