"""Security: no network when offline, no remote code unless the recipe asks, no pickles."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.errors import TuneforgeError
from tuneforge.models import load_model


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


def test_offline_training_and_unknown_hub_name_never_touch_the_network(no_network, tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=20)
    finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"epochs": 1}))
    load_model("minilm-l6")
    with pytest.raises(TuneforgeError, match="local"):
        load_model("some-org/not-in-the-cache")
    assert no_network == []


def test_remote_code_needs_explicit_consent(tiny_bert_dir, tmp_path):
    """A model directory whose config asks for its own Python code is refused unless
    model.trust_remote_code is set, and the code is never run."""
    model_dir = tmp_path / "custom"
    shutil.copytree(tiny_bert_dir, model_dir)
    marker = tmp_path / "code-ran"
    (model_dir / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (model_dir / "config.json").write_text(json.dumps(config))
    try:
        loaded = load_model(str(model_dir))
    except TuneforgeError as err:
        assert "trust_remote_code" in str(err)
    else:  # transformers may fall back to the built-in class: fine, as long as no custom code ran
        assert type(loaded.backbone).__name__ == "BertModel"
    assert not marker.exists()


def test_pickled_weights_are_refused(tiny_timm_weights, tmp_path):
    import pickle

    arch, _ = tiny_timm_weights
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(TuneforgeError):
        load_model(arch, weights=str(path))
    assert not marker.exists()
