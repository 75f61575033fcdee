"""A linear-probe run saves what trained (the head) and a reference to the base, as the PEFT
strategies do (issue 22: it saved the whole 91 MB MiniLM backbone for 770 trained
parameters), and every use of a finished run works on it: predict, export, serve, warm start,
retain.head_from, reproduce; models saved the old way still load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from helpers import text_recipe, write_text_csv
from tuneforge.cli import main
from tuneforge.run.artifact import load_model_dir

TEXTS = ["good fun film", "awful boring plot", "the movie was really great"]


@pytest.fixture(scope="module")
def probe(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    train = write_text_csv(tmp / "train.csv", n=40)
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp / "run", "linear-probe",
                                         train={"max_steps": 6, "lr": 5e-2, "deterministic": True}))
    return run, train, tmp


def _bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_a_linear_probe_run_saves_its_head_and_a_reference_to_the_base(probe, tiny_bert_dir):
    run, _, _ = probe
    model_dir = run.path / "model"
    meta = json.loads((model_dir / "tuneforge.json").read_text())
    assert meta["layout"] == "base+trainable" and meta["strategy_options"] == {"name": "linear-probe"}
    assert meta["base_model"]["name"] == str(tiny_bert_dir)
    assert not (model_dir / "backbone").exists()
    saved = load_file(str(model_dir / "trainable.safetensors"))
    assert sorted(saved) == ["task_head.bias", "task_head.weight"]  # 32 x 2 + 2 = the 66 trained parameters
    weights = _bytes(model_dir) - _bytes(model_dir / "tokenizer")
    assert weights < (tiny_bert_dir / "model.safetensors").stat().st_size / 10
    # reloaded by re-applying the strategy to the base: the run's own predictions, the base's backbone
    model, _, _, _ = load_model_dir(run.path)
    assert tuneforge.load(run.path).predict(TEXTS) == run.predict(TEXTS)
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    state = model.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items() if k in state)
    assert torch.equal(model.task_head.weight.detach(), saved["task_head.weight"])


def test_export_serve_and_predict_a_linear_probe_run(probe, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from tuneforge.deploy.export import export_run
    from tuneforge.deploy.serve import create_app

    run, _, _ = probe
    for fmt in ("safetensors", "onnx"):
        report = export_run(run.path, fmt, tmp_path / fmt, log=lambda *_: None)
        assert report["check"] == "passed" and report["label_agreement"] == 1.0, fmt
    exported = tuneforge.load(tmp_path / "safetensors")  # plain weights: loads without the base reference
    assert json.loads((tmp_path / "safetensors" / "tuneforge.json").read_text())["layout"] == "hf-backbone+head"
    assert exported.predict(TEXTS) == run.predict(TEXTS)
    with TestClient(create_app(run.path)) as client:
        got = client.post("/v1/predict", json={"inputs": TEXTS}).json()["predictions"]
    expected = [p["label"] for p in run.predict(TEXTS)]
    assert [p["label"] for p in got] == expected
    assert main(["predict", str(run.path), *TEXTS]) == 0
    assert [json.loads(x)["label"] for x in capsys.readouterr().out.splitlines()] == expected


def test_warm_start_head_from_and_reproduce_from_a_linear_probe_run(probe, tiny_bert_dir, capsys, monkeypatch):
    run, train, tmp = probe
    head = load_file(str(run.path / "model" / "trainable.safetensors"))
    # --init-from: the new run starts from the probe's weights (its head: the labels are the same)
    from tuneforge.run import resume

    seen, real = {}, resume.warm_start

    def spy(model, run_dir, labels, log):
        real(model, run_dir, labels, log)
        seen["head"] = model.task_head.weight.detach().clone()

    monkeypatch.setattr(resume, "warm_start", spy)
    warm = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp / "warm", "full", train={"max_steps": 1}),
                              init_from=str(run.path))
    assert torch.equal(seen["head"], head["task_head.weight"])
    assert json.loads((warm.path / "manifest.json").read_text())["init_from"] == str(run.path)
    # retain.head_from: the probe's head scores its own data on the new backbone
    retained = tuneforge.finetune(text_recipe(
        tiny_bert_dir, train, tmp / "retain", "full", train={"max_steps": 2, "eval_every": 1},
        retain={"data": str(train), "label_column": "label", "head_from": str(run.path)}))
    forgetting = json.loads((retained.path / "eval.json").read_text())["forgetting"]
    assert "retain_accuracy" in forgetting["history"][0] and forgetting["before"]["accuracy"] > 0
    # reproduce: the same run again, identical metrics (fp32, deterministic)
    assert main(["reproduce", str(run.path), "--output", str(tmp / "again")]) == 0
    result = json.loads((tmp / "again" / "reproduction.json").read_text())
    assert result["ok"] and all(r["difference"] == 0 for r in result["metrics"])
    capsys.readouterr()


def test_a_linear_probe_model_saved_before_the_change_still_loads(probe, tmp_path):
    """Runs saved with the whole backbone (layout hf-backbone+head) keep loading as they did."""
    from types import SimpleNamespace

    from tuneforge.models import load_model
    from tuneforge.recipe import from_run_config
    from tuneforge.run.artifact import save_model

    run, _, _ = probe
    model, task, labels, meta = load_model_dir(run.path)
    recipe = from_run_config(run.path / "config.yaml")
    loaded = load_model(recipe.model.name)
    old = SimpleNamespace(name="linear-probe", saved_layout="plain", plain_export=True)  # as it declared before
    save_model(tmp_path / "model", model=model, loaded=loaded, strategy=old, labels=labels, task=task, recipe=recipe)
    assert json.loads((tmp_path / "model" / "tuneforge.json").read_text())["layout"] == "hf-backbone+head"
    assert tuneforge.load(tmp_path / "model").predict(TEXTS) == run.predict(TEXTS)


def test_a_base_model_that_no_longer_loads_names_the_fix(probe, tmp_path):
    import shutil

    from tuneforge.errors import TuneforgeError

    run, _, _ = probe
    moved = tmp_path / "model"
    shutil.copytree(run.path / "model", moved)
    meta = json.loads((moved / "tuneforge.json").read_text())
    meta["base_model"]["name"] = str(tmp_path / "gone")  # the base directory moved away since the run
    (moved / "tuneforge.json").write_text(json.dumps(meta))
    with pytest.raises(TuneforgeError, match=r"holds only what its run trained \(strategy linear-probe\) and a "
                                             r"reference to its base model '.*gone'.*put the base model back"):
        load_model_dir(moved)
