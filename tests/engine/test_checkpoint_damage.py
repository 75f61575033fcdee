"""Issue 22, data damage inside a run: a damaged checkpoint is never loaded silently, and a
full disk ends the run with one line that names the fix, no partial copy left behind and the
manifest saying what happened."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.cli import main


def _recipe(tiny_bert_dir, train, out, **train_extra):
    return text_recipe(tiny_bert_dir, train, out, "full",
                       train={"epochs": 3, "batch_size": 4, "lr": 1e-2, "eval_every": 2, "save_every": 2,
                              "keep_checkpoints": 50, "deterministic": True, **train_extra})


def _damage(path: Path) -> None:
    """Flip the last bytes of a safetensors file: it still parses, its weights are wrong."""
    data = bytearray(path.read_bytes())
    data[-32:] = bytes(b ^ 0xFF for b in data[-32:])
    path.write_bytes(bytes(data))


def test_a_damaged_best_checkpoint_is_detected_and_replaced_by_its_intact_twin(tiny_bert_dir, tmp_path,
                                                                                monkeypatch):
    import io

    from rich.console import Console

    import tuneforge.engine.callbacks as callbacks

    train = write_text_csv(tmp_path / "train.csv", n=40)
    reference = finetune(_recipe(tiny_bert_dir, train, tmp_path / "reference"))
    real = callbacks.save_checkpoint

    def save_then_rot(directory, *args, **kwargs):
        out = real(directory, *args, **kwargs)
        if Path(directory).name == "best":
            _damage(Path(directory) / "trainable.safetensors")  # the disk rots it right after the write
        return out

    monkeypatch.setattr(callbacks, "save_checkpoint", save_then_rot)
    log = io.StringIO()
    damaged = finetune(_recipe(tiny_bert_dir, train, tmp_path / "damaged"), console=Console(file=log, width=300))
    assert "checkpoints/best is damaged" in log.getvalue() and "does not match its recorded sha256" in log.getvalue()
    # the final model is the real best step's, from the periodic checkpoint of the same step
    ref_eval = json.loads((reference.path / "eval.json").read_text())
    got_eval = json.loads((damaged.path / "eval.json").read_text())
    assert got_eval["best_step"] == ref_eval["best_step"]
    assert got_eval["validation"]["accuracy"] == ref_eval["validation"]["accuracy"]
    ref = load_file(str(reference.path / "model" / "head.safetensors"))
    got = load_file(str(damaged.path / "model" / "head.safetensors"))
    assert all(ref[k].equal(got[k]) for k in ref)


def test_a_damaged_checkpoint_without_a_twin_fails_loudly(tmp_path):
    from tuneforge.engine.checkpoint import CheckpointCorrupt, load_best_weights, load_checkpoint_weights, save_checkpoint

    model = torch.nn.Linear(4, 2)
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts / "best", model, meta={"step": 6})
    _damage(ckpts / "best" / "trainable.safetensors")
    with pytest.raises(CheckpointCorrupt, match="sha256"):
        load_checkpoint_weights(ckpts / "best", model)
    with pytest.raises(CheckpointCorrupt, match="no intact checkpoint of the same step.*train again"):
        load_best_weights(ckpts, model, report=lambda *_: None)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_disk_full_while_saving_a_checkpoint(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    """torch.save reports a full disk as its own RuntimeError, after writing part of the file;
    while that partial folder exists, the disk is full for the manifest too."""
    import tuneforge.engine.checkpoint as ckpt
    from tuneforge.run.rundir import RunDir

    train = write_text_csv(tmp_path / "train.csv", n=40)
    run = tmp_path / "run"
    calls = {"n": 0}
    real_save = ckpt.torch.save

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # a few checkpoints into the run
            Path(f).write_bytes(b"\0" * (4 << 20))
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                               "file data/2: file write failed")
        return real_save(obj, f, *args, **kwargs)

    real_write = RunDir.write_json

    def write_json(self, name, data):
        if list((self.path / "checkpoints").glob(".*.tmp")):  # the partial copy fills the disk
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / f".{name}.tmp"))
        return real_write(self, name, data)

    monkeypatch.setattr(ckpt.torch, "save", save)
    monkeypatch.setattr(RunDir, "write_json", write_json)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_bert_dir, train, run)))
    assert main(["train", str(recipe)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "disk full" in line and "free disk space" in line and f"--resume {run}" in line
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")]  # nothing left to keep the disk full
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "disk full" in manifest["error"]


def test_disk_full_while_saving_the_model(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    import tuneforge.run.artifact as artifact

    def save_file(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * (1 << 20))
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(artifact, "save_file", save_file)
    train = write_text_csv(tmp_path / "train.csv", n=40)
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_bert_dir, train, run, epochs=1)))
    assert main(["train", str(recipe)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "disk full" in line and "head.safetensors" in line and "free disk space" in line
    assert not (run / "model").exists() and not (run / ".model.tmp").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]
    monkeypatch.undo()  # space freed: the failed run resumes from its own record and completes
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "model" / "head.safetensors").exists()
