"""Strategies on a tiny BERT classifier: what trains, what stays frozen."""

from __future__ import annotations

import torch

from tuneforge.models import load_model
from tuneforge.recipe import load_recipe
from tuneforge.strategies import get_strategy
from tuneforge.strategies.base import count_params, param_groups
from tuneforge.tasks.base import Classifier


def _model(tiny_bert_dir):
    loaded = load_model(str(tiny_bert_dir))
    torch.manual_seed(0)
    return Classifier(loaded.backbone, loaded.info.feature_dim, 3, "text"), loaded


def _strategy(**options):
    return get_strategy(load_recipe({"strategy": options}).strategy)


def _inputs():
    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 11, 3, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_linear_probe_trains_head_only(tiny_bert_dir):
    model, loaded = _model(tiny_bert_dir)
    model = _strategy(name="linear-probe").apply(model, loaded.info)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"task_head.weight", "task_head.bias"}


def test_partial_unfreezes_top_groups(tiny_bert_dir):
    model, loaded = _model(tiny_bert_dir)
    strategy = _strategy(name="partial", layers=1)
    model = strategy.apply(model, loaded.info)
    trainable = {n.split(".")[1] + "." + n.split(".")[2] if n.startswith("backbone.") else n
                 for n, p in model.named_parameters() if p.requires_grad}
    assert "embeddings.word_embeddings" not in trainable
    assert any(n.startswith("backbone.encoder.layer.1.") and p.requires_grad for n, p in model.named_parameters())
    assert not any(n.startswith("backbone.encoder.layer.0.") and p.requires_grad for n, p in model.named_parameters())
    strategy.set_train_mode(model)
    assert not model.backbone.embeddings.training and model.backbone.encoder.layer[1].training


def test_lora_starts_equal_to_base_and_merges(tiny_bert_dir):
    model, loaded = _model(tiny_bert_dir)
    model.eval()
    with torch.no_grad():
        base = model(**_inputs())
    lora = _strategy(name="lora", rank=4, dropout=0.0).apply(model, loaded.info).eval()
    with torch.no_grad():
        assert torch.allclose(lora(**_inputs()), base, atol=1e-6)  # B is zero-initialised
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        adapted = lora(**_inputs())
        assert not torch.allclose(adapted, base, atol=1e-4)
        merged = lora.merge_and_unload()
        assert torch.allclose(merged(**_inputs()), adapted, atol=1e-5)


def test_param_groups_separate_head_lr_and_no_decay(tiny_bert_dir):
    model, loaded = _model(tiny_bert_dir)
    strategy = _strategy(name="full")
    model = strategy.apply(model, loaded.info)
    train = load_recipe({"train": {"lr": 1e-4, "head_lr": 1e-3, "weight_decay": 0.01}}).train
    groups = param_groups(model, loaded.info, train)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == 1e-3 and by_name["backbone"]["lr"] == 1e-4
    assert by_name["backbone.no_decay"]["weight_decay"] == 0.0
    assert sum(p.numel() for g in groups for p in g["params"]) == count_params(model)[0]
