"""A LoRA run warm-started from another run (``--init-from`` / ``model.init_from``, the SFT -> DPO
set-up) reloads onto the weights it trained on, not onto the original base (issue 15's bug)."""

from __future__ import annotations

import json
import shutil

import pytest

from tuneforge import finetune
from tuneforge.deploy.evaluate import evaluate_run
from tuneforge.errors import TuneforgeError
from tuneforge.llm.tiny import make_tiny_lm


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny LM, and a full fine-tuning run far enough from it that a reload onto the base shows."""
    root = tmp_path_factory.mktemp("warm")
    model = make_tiny_lm(root / "tiny-lm")
    source = finetune(_recipe(model, root / "sft", "full", lr=1e-2))
    return {"model": model, "source": source.path, "root": root}


def _recipe(model, out, strategy, lr=5e-3, steps=6, **model_keys):
    return {"model": {"name": str(model), **model_keys},
            "task": {"type": "causal-lm", "max_length": 48, "generation": {"eval_prompts": 0}},
            "data": {"train": str(model / "sft-train.jsonl"), "validation": str(model / "sft-val.jsonl"),
                     "max_train_rows": 64},
            "strategy": {"name": strategy},
            "train": {"max_steps": steps, "eval_every": steps, "batch_size": 8, "lr": lr, "precision": "fp32",
                      "progress": False},
            "output": {"dir": str(out), "report": False}}


def test_lora_from_a_run_reloads_onto_the_warm_started_weights(chain, tmp_path):
    val = str(chain["model"] / "sft-val.jsonl")
    base_loss = evaluate_run(chain["source"], val)["loss"]
    run = finetune(_recipe(chain["model"], tmp_path / "lora", "lora"), init_from=str(chain["source"]))
    meta = json.loads((run.path / "model" / "tuneforge.json").read_text())
    assert meta["layout"] == "peft-adapter" and meta["warm_start"]["model"] == str((chain["source"] / "model").resolve())
    assert "state" not in meta["warm_start"] and len(meta["warm_start"]["sha256"]) == 64  # a reference, no copy
    # reloaded, the run scores exactly what it scored at its end (before the fix: the adapter sat on
    # the untrained base, far from the SFT run's weights)
    assert evaluate_run(run.path, val)["loss"] == pytest.approx(run.metrics["validation"]["loss"], abs=1e-5)
    assert abs(run.metrics["validation"]["loss"] - base_loss) < 0.5 * base_loss  # it did start from the SFT run
    # the recipe records the warm start: config.yaml has it, so `--resume` rebuilds the same start
    assert f"init_from: {chain['source']}" in (run.path / "config.yaml").read_text()


def test_model_init_from_in_the_recipe_is_the_same_warm_start(chain, tmp_path):
    val = str(chain["model"] / "sft-val.jsonl")
    run = finetune(_recipe(chain["model"], tmp_path / "lora", "lora", init_from=str(chain["source"])))
    assert json.loads((run.path / "manifest.json").read_text())["init_from"] == str(chain["source"])
    assert evaluate_run(run.path, val)["loss"] == pytest.approx(run.metrics["validation"]["loss"], abs=1e-5)


def test_a_changed_source_is_refused_on_reload(chain, tmp_path):
    source = tmp_path / "sft-copy"
    shutil.copytree(chain["source"], source)
    run = finetune(_recipe(chain["model"], tmp_path / "lora", "lora"), init_from=str(source))
    weights = source / "model" / "backbone" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state = {k: v + 0.01 for k, v in state.items()}
    save_file(state, str(weights))  # "retrained in place"
    with pytest.raises(TuneforgeError, match="changed since.*sha256"):
        evaluate_run(run.path, str(chain["model"] / "sft-val.jsonl"))
    shutil.rmtree(source)
    with pytest.raises(TuneforgeError, match="that run is gone.*export"):
        evaluate_run(run.path, str(chain["model"] / "sft-val.jsonl"))


def test_a_source_gone_before_saving_is_copied_into_the_model(chain, tmp_path, monkeypatch):
    """The source moved away while the run trained: the run saves its whole state (nothing lost)."""
    import tuneforge.run.artifact as artifact

    source = tmp_path / "sft-copy"
    shutil.copytree(chain["source"], source)
    real = artifact.save_model

    def save_after_the_source_went(*args, **kwargs):
        shutil.rmtree(source)
        return real(*args, **kwargs)

    monkeypatch.setattr(artifact, "save_model", save_after_the_source_went)
    run = finetune(_recipe(chain["model"], tmp_path / "lora", "lora"), init_from=str(source))
    meta = json.loads((run.path / "model" / "tuneforge.json").read_text())["warm_start"]
    assert meta["state"] == "warm_start_state.safetensors" and "is gone" in meta["why"]
    assert not source.exists()
    loss = evaluate_run(run.path, str(chain["model"] / "sft-val.jsonl"))["loss"]
    assert loss == pytest.approx(run.metrics["validation"]["loss"], abs=1e-5)
