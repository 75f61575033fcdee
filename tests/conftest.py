"""Shared fixtures: tiny models built on the spot, so no test ever downloads.

* ``tiny_bert_dir``: a saved 2-layer, 32-wide BERT + WordPiece tokenizer (HF directory).
* ``tiny_timm_weights``: ``(arch, path)`` of a ``.safetensors`` state dict
  (``num_classes=0``) for timm's smallest EfficientNet, ``test_efficientnet``.
"""

from __future__ import annotations

import json
import os

# Before transformers / huggingface_hub are imported anywhere: never reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# One intra-op thread, set before torch loads so that the runs tests start in subprocesses
# (kill and resume, signals) inherit it. The tiny models here gain nothing from a second
# thread, and on a shared 2-core machine two OpenMP threads wait on each other: a tiny image
# run took 0.7 s with one and 11.8 s with two while other jobs ran. `OMP_NUM_THREADS=2 make
# test` overrides it; the tests of multi-threaded paths set their own count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a an movie film plot actor was is were good bad great awful boring fun "
    "i it this and not very really loved hated liked"
).split()
TINY_TIMM_ARCH = "test_efficientnet"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """Directory with config.json, model.safetensors and tokenizer files of a tiny BERT."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny_bert")
    vocab_dir, model_dir = root / "vocab", root / "model"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    # Loading vocab.txt through AutoTokenizer works on transformers 4 and 5 alike
    # (5.x silently ignores BertTokenizerFast(vocab_file=...)).
    (vocab_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64})
    )
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(model_dir, safe_serialization=True)
    return model_dir


@pytest.fixture(scope="session")
def tiny_timm_weights(tmp_path_factory):
    """``(arch, path)``: a headless ``test_efficientnet`` state dict saved as .safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY_TIMM_ARCH, pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("tiny_timm") / f"{TINY_TIMM_ARCH}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return TINY_TIMM_ARCH, path


@pytest.fixture
def real_matmul_peak():
    """Request this to measure the MFU yardstick at full size (see ``_small_matmul_peak``)."""


@pytest.fixture(autouse=True)
def _small_matmul_peak(request, monkeypatch):
    """Every run measures its MFU yardstick twice (a 2048x2048 matmul, best of 5, before and
    after training): ~1.2 s of a tiny test run's ~4 s on a quiet 2-core machine. Tests
    measure it on a 256x256 matmul instead, which is still a real, positive peak; the tests
    of the figures themselves ask for ``real_matmul_peak``. Runs in a subprocess measure
    the full size."""
    if "real_matmul_peak" in request.fixturenames:
        return
    from tuneforge.engine import throughput

    real = throughput.measure_matmul_peak
    monkeypatch.setattr(throughput, "measure_matmul_peak",
                        lambda device, dtype, n=256, repeats=2: real(device, dtype, n=n, repeats=repeats))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    models this small gain nothing from a second thread, and on a shared 2-core machine two OpenMP
    threads wait on each other (a training step measured 20x slower than with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
