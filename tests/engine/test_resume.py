"""Crash-safe runs: SIGKILL at a random step, resume, and end bit-identical to an
uninterrupted run (CPU, fp32, deterministic); corrupt and half-written
checkpoints are skipped; a failed write leaves the previous checkpoint usable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.cli import main
from tuneforge.engine.checkpoint import newest_valid, verify_checkpoint
from tuneforge.errors import TuneforgeError

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tiny_bert_dir, train, out, strategy, precision="fp32", epochs=4):
    # dropout stays on (BERT's hidden dropout and the head's), so the RNG state must resume too;
    # denormals are flushed (the default, stated here): a resumed run flushes exactly as the first did
    return text_recipe(tiny_bert_dir, train, out, strategy,
                       train={"epochs": epochs, "batch_size": 4, "lr": 1e-3, "save_every": 1, "eval_every": 7,
                              "deterministic": True, "log_every": 3, "keep_checkpoints": 3,
                              "precision": precision, "flush_denormal": True},
                       output={"keep_resumable": True})  # the tests look at the periodic checkpoints afterwards


def _final_weights(run: Path) -> dict:
    files = sorted((run / "model").rglob("*.safetensors"))
    assert files
    return {str(f.relative_to(run)): load_file(str(f)) for f in files}


def _events(run: Path) -> list[dict]:
    drop = {"samples_per_s", "elapsed_s", "eval_seconds", "tokens_per_s", "padding_fraction", "mfu", "peak_rss_mb"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# fp32 must be bit-identical. bf16 autocast is held to a stated tolerance: max |difference|
# of any final weight <= BF16_TOLERANCE (CPU bf16 kernels are deterministic too, and on this
# machine the bf16 runs also came out bit-identical; the tolerance covers other backends).
BF16_TOLERANCE = 1e-3


@pytest.mark.parametrize("strategy,precision", [
    ("full", "fp32"),
    # the same kill and resume with LoRA's adapter state and with bf16 autocast: ~13 s each
    pytest.param("lora", "fp32", marks=pytest.mark.slow),
    pytest.param("full", "bf16", marks=pytest.mark.slow),
])
def test_sigkill_then_resume_is_bit_identical(strategy, precision, tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    reference = finetune(_recipe(tiny_bert_dir, train, tmp_path / "reference", strategy, precision))
    total = int(reference.recipe.train.epochs) * 8  # 30 train rows / batch 4 -> 8 steps per epoch (last holds 2)
    assert total == 32

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(_recipe(tiny_bert_dir, train, tmp_path / "killed", strategy, precision)))
    run = tmp_path / "killed"
    kill_after = random.Random().randint(3, total // 2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(recipe_path)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoints" / f"step-{kill_after:08d}").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)  # from this (second) process, at an arbitrary point of the loop
    proc.wait()
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"  # killed, not finished

    assert main(["train", str(recipe_path), "--resume", str(run)]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed"]

    ref, got = _final_weights(reference.path), _final_weights(run)
    assert ref.keys() == got.keys()
    worst = max((tensor.float() - got[name][key].float()).abs().max().item()
                for name in ref for key, tensor in ref[name].items())
    if precision == "fp32":
        assert worst == 0.0
        assert _events(run) == _events(reference.path)
    else:
        print(f"bf16 resume: max |weight difference| = {worst:.3g}")
        assert worst <= BF16_TOLERANCE
        return
    ref_eval = json.loads((reference.path / "eval.json").read_text())
    got_eval = json.loads((run / "eval.json").read_text())
    for split in ("validation",):
        ref_eval[split].pop("eval_seconds"), got_eval[split].pop("eval_seconds")
    assert got_eval == ref_eval


def test_corrupt_newest_checkpoint_is_skipped(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    run = finetune(_recipe(tiny_bert_dir, train, tmp_path / "run", "full", epochs=1)).path
    steps = sorted((run / "checkpoints").glob("step-*"))
    assert len(steps) == 3
    newest = steps[-1] / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncate
    assert "sha256" in verify_checkpoint(steps[-1])
    reports = []
    assert newest_valid(run / "checkpoints", report=reports.append) == steps[-2]
    assert steps[-1].name in reports[0]


def test_failed_write_keeps_previous_checkpoint(tiny_bert_dir, tmp_path, monkeypatch):
    """A disk that fills up mid-write: the error says so, the previous checkpoint still verifies."""
    import errno

    import tuneforge.engine.checkpoint as ckpt

    train = write_text_csv(tmp_path / "train.csv", n=40)
    real_save = ckpt.torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # some way into the run: write half a file, then the disk is full
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(TuneforgeError, match="No space left on device.*intact.*--resume"):
        finetune(_recipe(tiny_bert_dir, train, tmp_path / "run", "full", epochs=2))
    run = tmp_path / "run"
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    valid = newest_valid(run / "checkpoints")
    assert valid is not None and verify_checkpoint(valid) is None
    assert not list((run / "checkpoints").glob(".*tmp"))  # no half-written leftovers
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_bert_dir, train, run, "full", epochs=2)))
    assert main(["train", str(recipe), "--resume", str(run)]) == 0


@pytest.mark.slow  # the same handler as SIGTERM, which the fast test below sends
def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    recipe = _recipe(tiny_bert_dir, train, tmp_path / "run", "full", epochs=12)  # ends long after the signal
    recipe["train"]["save_every"] = None
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(recipe_path)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count('"train"') >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "checkpoint saved" in err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert newest_valid(tmp_path / "run" / "checkpoints") is not None


def test_resume_refuses_a_changed_recipe(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    recipe = _recipe(tiny_bert_dir, train, tmp_path / "run", "full", epochs=1)
    finetune(recipe)
    recipe["train"]["lr"] = 5e-3
    with pytest.raises(TuneforgeError, match="train.lr.*--init-from"):
        finetune(recipe, resume=str(tmp_path / "run"))


def test_warm_start_is_a_new_run_from_saved_weights(tiny_bert_dir, tmp_path, capsys):
    train = write_text_csv(tmp_path / "train.csv", n=40)
    first = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "a", "full", train={"epochs": 2, "lr": 3e-3}))
    from rich.console import Console

    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    second = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "b", "linear-probe", train={"epochs": 1}),
                      init_from=str(first.path), console=console)
    console.file.close()
    assert "warm start" in (tmp_path / "log.txt").read_text()
    before = load_file(str(first.path / "model" / "backbone" / "model.safetensors"))
    after = load_file(str(second.path / "model" / "backbone" / "model.safetensors"))
    assert all(before[k].equal(after[k]) for k in before)  # frozen backbone = the first run's weights
    assert json.loads((second.path / "manifest.json").read_text())["init_from"] == str(first.path)


def test_recover_after_kill_between_renames(tmp_path):
    import torch

    from tuneforge.engine.checkpoint import recover, save_checkpoint

    model = torch.nn.Linear(3, 2)
    ckpts = tmp_path / "checkpoints"
    for step in (4, 6, 8):
        save_checkpoint(ckpts / f"step-{step:08d}", model, meta={"step": step})
    save_checkpoint(ckpts / "best", model, meta={"step": 6})
    (ckpts / "best").rename(ckpts / ".best.old")  # killed after moving the old copy aside
    (ckpts / ".step-00000010.tmp").mkdir()  # and a partial write
    notes = []
    recover(ckpts, ckpts / "step-00000006", report=notes.append)
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-00000004", "step-00000006"]
    assert verify_checkpoint(ckpts / "best") is None and len(notes) == 2


def test_image_run_with_augmentation_resumes_exactly(tiny_timm_weights, tmp_path):
    """Random crops and flips are seeded per (seed, epoch, index): a resumed run with a
    loader worker sees the same images as an uninterrupted one."""
    from helpers import image_recipe, simulate_crash, write_image_folder

    train = write_image_folder(tmp_path / "images", n_per_class=8)  # 12 train images: 3 steps an epoch
    recipe = image_recipe(tiny_timm_weights, train, tmp_path / "reference", "full",
                          data={"augment": True, "hflip": 0.5, "num_workers": 1},
                          train={"epochs": 3, "save_every": 1, "deterministic": True, "keep_checkpoints": 50,
                                 "flush_denormal": True}, output={"keep_resumable": True})
    reference = finetune(recipe)
    recipe["output"]["dir"] = str(tmp_path / "crashed")
    crashed = finetune(recipe).path
    simulate_crash(crashed, after_step=5)  # mid-epoch 2
    assert newest_valid(crashed / "checkpoints").name == "step-00000005"
    finetune(recipe, resume=str(crashed))
    ref, got = _final_weights(reference.path), _final_weights(crashed)
    for name in ref:
        for key, tensor in ref[name].items():
            assert tensor.equal(got[name][key]), (name, key)
    assert _events(crashed) == _events(reference.path)


def test_sigterm_to_the_process_group_with_loader_workers(tiny_timm_weights, tmp_path):
    """A scheduler or `timeout` signals every process of the group, loader workers included."""
    from helpers import image_recipe, write_image_folder

    train = write_image_folder(tmp_path / "images", n_per_class=10)
    recipe = image_recipe(tiny_timm_weights, train, tmp_path / "run", "full",
                          data={"num_workers": 1}, train={"epochs": 40, "log_every": 1})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(recipe_path)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count('"train"') >= 3):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # what `timeout` and many schedulers send to the group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "checkpoint saved" in err  # no periodic checkpoints: the handler saved one
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "interrupted"
    assert newest_valid(tmp_path / "run" / "checkpoints") is not None
