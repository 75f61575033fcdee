"""Hugging Face loader on a tiny BERT built in conftest (no downloads)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tuneforge.errors import TuneforgeError
from tuneforge.models import from_spec, group_param_names, load_model


def _assert_partition(backbone, groups):
    per_group = group_param_names(backbone, groups)
    flat = [n for g in per_group for n in g]
    names = [n for n, _ in backbone.named_parameters()]
    assert len(flat) == len(set(flat)), "a parameter sits in two groups"
    assert sorted(flat) == sorted(names), "a parameter sits in no group"
    assert all(per_group), "empty group"


def test_tiny_bert_info(tiny_bert_dir):
    lm = load_model(str(tiny_bert_dir))
    info = lm.info
    assert (info.family, info.modality, info.feature_dim) == ("bert", "text", 32)
    # embeddings, one group per layer; the pooler rides with the top layer
    assert info.layer_groups == [["embeddings"], ["encoder.layer.0"], ["encoder.layer.1", "pooler"]]
    _assert_partition(lm.backbone, info.layer_groups)
    for group in info.layer_groups:  # all entries are real submodules here
        for name in group:
            lm.backbone.get_submodule(name)
    assert info.lora_targets == ["query", "key", "value", "dense"]
    assert info.preprocessing == {"max_length": 64}  # min(max_position_embeddings, tokenizer, 512)
    assert info.spec["kind"] == "hf" and info.spec["trust_remote_code"] is False
    json.dumps(info.preprocessing), json.dumps(info.spec)
    assert str(tiny_bert_dir) in info.source
    assert all(p.dtype == torch.float32 for p in lm.backbone.parameters())


def test_tiny_bert_forward_and_tokenizer(tiny_bert_dir):
    lm = load_model(str(tiny_bert_dir), source="hf")
    assert lm.tokenizer.is_fast
    enc = lm.tokenizer(["the movie was great", "bad plot"], padding=True, return_tensors="pt")
    assert enc["input_ids"][0].tolist()[:2] == [lm.tokenizer.cls_token_id, lm.tokenizer.convert_tokens_to_ids("the")]
    with torch.no_grad():
        out = lm.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert out.shape == (2, enc["input_ids"].shape[1], lm.info.feature_dim)
    assert torch.isfinite(out).all()


def test_lora_targets_accepted_by_peft(tiny_bert_dir):
    peft = pytest.importorskip("peft")
    lm = load_model(str(tiny_bert_dir))
    cfg = peft.LoraConfig(r=2, target_modules=lm.info.lora_targets)
    model = peft.get_peft_model(lm.backbone, cfg)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_from_spec_rebuilds_architecture_with_fresh_weights(tiny_bert_dir):
    lm = load_model(str(tiny_bert_dir))
    rebuilt = from_spec(lm.info.spec)
    a, b = lm.backbone.state_dict(), rebuilt.backbone.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["encoder.layer.0.attention.self.query.weight"],
                           b["encoder.layer.0.attention.self.query.weight"])
    assert rebuilt.info.layer_groups == lm.info.layer_groups
    # and a fine-tuned state dict loads straight back
    rebuilt.backbone.load_state_dict(a)


def test_directory_without_weights(tiny_bert_dir, tmp_path):
    d = tmp_path / "noweights"
    shutil.copytree(tiny_bert_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(TuneforgeError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert str(d) in msg and "no weight files" in msg and "config.json" in msg and "tokenizer.json" in msg


def test_directory_without_tokenizer(tiny_bert_dir, tmp_path):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / f, d / f)
    with pytest.raises(TuneforgeError, match="tokenizer"):
        load_model(str(d))


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(TuneforgeError, match="no config.json.*weights.bin"):
        load_model(str(tmp_path))


def test_weights_or_key_map_rejected_for_hf(tiny_bert_dir):
    with pytest.raises(TuneforgeError, match="model.weights only applies to timm"):
        load_model(str(tiny_bert_dir), weights="x.safetensors")
    with pytest.raises(TuneforgeError, match="model.key_map only applies to timm"):
        load_model(str(tiny_bert_dir), key_map="efficientnet_pytorch")


def test_trust_remote_code_is_passed_through_unchanged(tiny_bert_dir, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    load_model(str(tiny_bert_dir))
    assert seen == [False]


def test_build_model_info_and_generic_fallback(tiny_bert_dir):
    from tuneforge.models import build_model_info

    lm = load_model(str(tiny_bert_dir))
    same = build_model_info(lm.backbone, tokenizer=lm.tokenizer)
    assert same.layer_groups == lm.info.layer_groups and same.lora_targets == lm.info.lora_targets
    # a family missing from the table: largest ModuleList as blocks, every Linear leaf as target
    generic = build_model_info(lm.backbone, family_hint="mystery-encoder")
    assert generic.family == "mystery-encoder"
    assert generic.layer_groups == lm.info.layer_groups
    assert {"query", "key", "value", "dense"} <= set(generic.lora_targets)
    _assert_partition(lm.backbone, generic.layer_groups)


def test_build_model_info_rejects_unknown_module():
    from tuneforge.models import build_model_info

    with pytest.raises(TuneforgeError, match="load_model"):
        build_model_info(torch.nn.Linear(2, 2))
