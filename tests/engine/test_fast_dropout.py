"""train.fast_dropout: tuneforge's CPU dropout keeps torch's dropout semantics (drop rate,
scaling, gradient, eval identity, seeded generator) and is what a CPU run trains with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.engine import fast_dropout
from tuneforge.engine.fast_dropout import FastDropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_rate_and_expectation_match_torch_dropout(p, dtype):
    torch.manual_seed(0)
    x = torch.ones(400_003, dtype=dtype)  # not a multiple of 4: the mask's last word is cut
    y = FastDropout(p).train()(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1e-4
    kept = y[y != 0].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - round(p * 32768) / 32768)), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert abs(float(y.float().mean()) - 1.0) < 0.01  # expectation kept


def test_every_bit_position_is_used():
    """Four elements share one 64-bit draw: each of the four positions must drop at rate p
    (the top 16 bits of torch's int64 draw have a constant sign bit, which the mask skips)."""
    torch.manual_seed(1)
    keep, _ = keep_mask((4 * 100_000,), 0.5)
    rates = keep.view(-1, 4).float().mean(0)
    assert torch.all((rates - 0.5).abs() < 0.01), rates


def test_gradient_is_the_mask_times_the_scale_and_eval_is_identity():
    torch.manual_seed(2)
    layer = FastDropout(0.3).train()
    x = torch.randn(64, 33, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    scale = 1 / (1 - round(0.3 * 32768) / 32768)
    keep = (y != 0)
    assert torch.allclose(x.grad, keep.float() * scale)
    assert torch.allclose(y, x.detach() * keep * scale)
    layer.eval()
    assert layer(x) is x


def test_same_seed_same_mask_and_the_generator_advances():
    layer = FastDropout(0.5).train()
    x = torch.ones(1000)
    torch.manual_seed(3)
    a, b = layer(x), layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), a)  # seeded: reproducible, resumable
    assert not torch.equal(a, b)  # and a fresh mask each call


def test_install_changes_classes_not_modules_or_state():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Dropout(0.0), nn.Dropout2d(0.2))
    before = [id(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fast_dropout.install(model) == 1  # p = 0 and other dropout kinds are left alone
    assert type(model[1]) is FastDropout and type(model[2]) is nn.Dropout and type(model[3]) is nn.Dropout2d
    assert model[1].p == 0.2 and [id(m) for m in model.modules()] == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fast_dropout.uninstall(model)
    assert type(model[1]) is nn.Dropout


@pytest.mark.parametrize("on", [True, False])
def test_a_cpu_run_trains_with_it_unless_turned_off(on, tiny_bert_dir, tmp_path, monkeypatch, capsys):
    calls = []
    real = fast_dropout.fast_dropout
    monkeypatch.setattr(fast_dropout, "fast_dropout", lambda x, p: calls.append(p) or real(x, p))
    train = write_text_csv(tmp_path / "train.csv", n=16)
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"epochs": 1, "fast_dropout": on}))
    assert bool(calls) == on
    assert ("draw their masks with the fast CPU kernel" in capsys.readouterr().err) == on
    assert 0.0 <= run.metrics["validation"]["accuracy"] <= 1.0  # the run finished and evaluated


def test_a_run_with_it_is_reproducible_and_differs_by_seed(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    train = write_text_csv(tmp_path / "train.csv", n=24)
    weights = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / name, train={"epochs": 1, "seed": seed}))
        files = sorted((run.path / "model").rglob("*.safetensors"))
        assert files
        weights[name] = {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])  # same seed: same weights
    assert any(not torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


# -- attention-probability dropout -----------------------------------------------------------

def _qkv(heads=4, kv_heads=4, q_len=7, dim=8, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, q_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, q_len, dim, generator=g)
    return q, k, v


class _Attn(nn.Module):
    def __init__(self, causal: bool, groups: int = 1):
        super().__init__()
        self.is_causal, self.num_key_value_groups = causal, groups


def _masks(batch=3, q_len=7):
    lengths = torch.tensor([7, 5, 2])
    keep = torch.arange(q_len)[None, :] < lengths[:, None]  # padding on the right
    bool_mask = keep[:, None, None, :].expand(batch, 1, q_len, q_len)
    float_mask = torch.zeros(batch, 1, q_len, q_len).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    return {"none": None, "bool": bool_mask, "float": float_mask}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("groups", [1, 2])
def test_attention_without_its_dropout_equals_sdpa(causal, mask, groups, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(kv_heads=4 // groups)
    module, attention_mask = _Attn(causal, groups), _masks()[mask]
    monkeypatch.setattr(fast_dropout, "fast_dropout", lambda x, p: x)  # the same math with the mask left out
    ours, _ = fast_dropout.attention_forward(module, q, k, v, attention_mask, dropout=0.1)
    ref, _ = sdpa_attention_forward(module, q, k, v, attention_mask, dropout=0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_the_fast_mask_on_the_probabilities():
    q, k, v = _qkv()
    module, attention_mask = _Attn(False), _masks()["bool"]
    torch.manual_seed(5)
    ours, _ = fast_dropout.attention_forward(module, q, k, v, attention_mask, dropout=0.25)
    torch.manual_seed(5)
    probs = torch.softmax((q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~attention_mask, torch.finfo(torch.float32).min), -1)
    keep, scale = keep_mask(probs.shape, 0.25)
    expected = ((probs * keep * scale) @ v).transpose(1, 2)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_attention_installs_on_training_only_and_is_not_saved(tiny_bert_dir, tmp_path, monkeypatch):
    import json

    from transformers import AutoModel

    calls = []
    real = fast_dropout.fast_dropout
    monkeypatch.setattr(fast_dropout, "fast_dropout", lambda x, p: calls.append(x.dim()) or real(x, p))
    model = AutoModel.from_pretrained(tiny_bert_dir, attn_implementation="sdpa")
    reference = AutoModel.from_pretrained(tiny_bert_dir, attn_implementation="sdpa").eval()
    assert fast_dropout.install_attention(model) == 1
    assert model.config._attn_implementation == fast_dropout.ATTENTION
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    model.train()
    model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert 4 in calls  # (batch, heads, q, k): the attention probabilities went through the fast mask
    model.eval()
    with torch.no_grad():  # evaluation: exactly transformers' SDPA
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                           reference(input_ids=ids, attention_mask=mask).last_hidden_state)
    model.save_pretrained(tmp_path / "saved")
    assert fast_dropout.ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "bert"


def test_a_rate_next_to_one_falls_back_to_torch():
    y = FastDropout(0.99999).train()(torch.ones(1000))
    assert torch.isfinite(y).all() and float((y == 0).float().mean()) > 0.99
