"""The manifest is a complete record, and `tuneforge reproduce` repeats a run from it."""

from __future__ import annotations

import json

import pytest

import tuneforge
from helpers import text_recipe, write_text_csv
from tuneforge.cli import main


@pytest.fixture(scope="module")
def fp32_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    train = write_text_csv(tmp / "train.csv", n=40)
    return tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp / "run", "full",
                                          train={"deterministic": True, "max_steps": 6}))


def test_manifest_is_a_complete_record(fp32_run, tiny_bert_dir):
    m = json.loads((fp32_run.path / "manifest.json").read_text())
    rec = m["reproducibility"]
    assert any(x.startswith("torch==") for x in rec["lock"]) and rec["lock"] == sorted(rec["lock"], key=lambda x: x.split("==")[0].lower())
    for key in ("python", "os", "cpu", "torch", "torch_threads"):
        assert rec["environment"][key], key
    assert rec["determinism"]["deterministic_algorithms"] is True  # read back from torch
    assert rec["seeds"]["torch"] == 42
    weights = {f["path"]: f["sha256"] for f in rec["weights"]["files"]}
    assert str((tiny_bert_dir / "model.safetensors").resolve()) in weights
    assert m["data"]["train"]["sha256"] and rec["recipe"]["train"]["deterministic"] is True
    assert "command" in rec and "may_not_reproduce" in rec
    whats = [c["what"] for c in rec["may_not_reproduce"]]
    assert not any("autocast" in w or "non-deterministic" in w for w in whats)  # fp32, deterministic


def test_reproduce_fp32_deterministic_is_identical(fp32_run, tmp_path, capsys):
    code = main(["reproduce", str(fp32_run.path), "--output", str(tmp_path / "again")])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((tmp_path / "again" / "reproduction.json").read_text())
    assert result["expected"] == "identical" and result["ok"]
    assert result["metrics"] and all(r["difference"] == 0 for r in result["metrics"])
    assert "metrics identical" in out and "accuracy" in out


def test_reproduce_bf16_states_tolerance_and_why(tiny_bert_dir, tmp_path):
    from tuneforge.workflows.reproduce import reproduce

    train = write_text_csv(tmp_path / "train.csv", n=40)
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full",
                                         train={"precision": "bf16", "max_steps": 6}))
    caveats = json.loads((run.path / "manifest.json").read_text())["reproducibility"]["may_not_reproduce"]
    assert any(c["what"] == "bf16 autocast" for c in caveats)
    assert any(c["what"] == "non-deterministic kernels allowed" for c in caveats)
    result = reproduce(run.path, output=str(tmp_path / "again"))
    assert result["expected"] == "within tolerance" and result["tolerance"]["rate_abs"] == 0.02
    assert result["ok"], result["metrics"]
    assert [c["what"] for c in result["why_it_may_differ"]] == [c["what"] for c in caveats]


def test_reproduce_reports_changed_data(fp32_run, tmp_path):
    from tuneforge.run.provenance import data_changes

    manifest = json.loads((fp32_run.path / "manifest.json").read_text())
    manifest["data"]["train"]["sha256"] = "0" * 64
    assert data_changes(manifest) and "changed" in data_changes(manifest)[0]
