"""A causal LM as a text classifier: a classification head on the last real token.
Tiny Llama- and GPT-2-style models are built from configs and a tokenizer is trained in
the test with the `tokenizers` library (no pretrained LLM can be downloaded here)."""

from __future__ import annotations

import pytest
import torch

from helpers import FILLER, NEG, POS, text_recipe, write_text_csv
from tuneforge import finetune, load


def _tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [" ".join(FILLER + POS + NEG)] * 2
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)  # no pad token: decoders ship without one, the loader uses eos
    return fast


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_decoder_dir(request, tmp_path_factory):
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    directory = tmp_path_factory.mktemp(f"tiny_{request.param}")
    tok = _tokenizer(directory)
    torch.manual_seed(0)
    if request.param == "llama":
        model = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64))
    else:
        model = GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_decoder_learns_to_classify(tiny_decoder_dir, tmp_path, strategy):
    train = write_text_csv(tmp_path / "train.csv", n=64)
    val = write_text_csv(tmp_path / "val.csv", n=24, seed=5)
    lr = 3e-3 if strategy == "full" else 1e-2
    run = finetune(text_recipe(tiny_decoder_dir, train, tmp_path / "run", strategy, task={"pooling": "last"},
                               data={"validation": str(val)}, train={"epochs": 6, "lr": lr, "head_lr": 1e-2}))
    # the words carry the label: a working classifier separates them, chance is 0.5
    assert run.metrics["validation"]["accuracy"] >= 0.8
    texts = ["good great fine film", "bad awful film"]
    assert load(run.path).predict(texts) == run.predict(texts)  # the saved model predicts what the trained one did


def test_last_pooling_reads_the_last_real_token():
    from tuneforge.tasks.base import Classifier

    class Echo(torch.nn.Module):  # hidden state = the token id, so the pooled value names the token
        def forward(self, input_ids, attention_mask):
            return type("O", (), {"last_hidden_state": input_ids.unsqueeze(-1).float()})()

    model = Classifier(Echo(), 1, 2, "text", pooling="last")
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 4], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # right, left and no padding
    assert model.features(input_ids=ids, attention_mask=mask).squeeze(-1).tolist() == [7.0, 4.0, 5.0]
