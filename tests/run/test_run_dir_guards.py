"""Issue 22: a run directory is never damaged by another run. One process at a time holds it
(a lock with its pid and host, taken for new runs and resumes alike, released however the
process ends); --overwrite keeps the old run until the new one has a checkpoint; a killed
run says so on the next look and resumes from its own directory; refusals come before the
model loads; a completed run keeps no optimizer state and has nothing to resume."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.cli import main
from tuneforge.errors import TuneforgeError

ROOT = Path(__file__).resolve().parents[2]


def _tree(root: Path, skip=(".tuneforge-previous",)) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name not in skip}


def _start(recipe_path: Path, cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(recipe_path), *args], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.002)


def _manifest(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- the lock

def _contender(path: str, start, done, results) -> None:
    from tuneforge.recipe import load_recipe
    from tuneforge.run.job import Job

    job = Job(load_recipe({"output": {"dir": path}}), log=lambda *_: None)
    start.wait()
    try:
        from tuneforge.run.build import check_run_dir

        check_run_dir(job)
    except Exception as err:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(err).__name__}: {err}")
        return
    results.put(f"ok {os.getpid()}")
    done.wait(60)
    job.close()


def test_runs_started_at_the_same_instant_get_the_directory_one_at_a_time(tmp_path):
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(4), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(tmp_path / "run"), start, done, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    done.set()
    for p in procs:
        p.join(60)
    winners = [g for g in got if g.startswith("ok")]
    assert len(winners) == 1, got
    pid = winners[0].split()[1]
    for loser in (g for g in got if not g.startswith("ok")):
        assert loser.startswith("RunBusy") and f"in use by another tuneforge process (pid {pid} on " in loser, loser
    left = tmp_path / "run"
    assert not left.exists() or not list(left.iterdir())  # the winner's lock went with it; no half-made run


def test_without_output_dir_two_runs_in_the_same_second_get_two_directories(tmp_path, monkeypatch):
    from tuneforge.recipe import load_recipe
    from tuneforge.run.build import check_run_dir
    from tuneforge.run.job import Job

    monkeypatch.chdir(tmp_path)
    jobs = [Job(load_recipe({"output": {"name": "same"}}), log=lambda *_: None) for _ in range(3)]
    try:
        for job in jobs:
            check_run_dir(job)  # the same runs/same-<stamp> unless the clock ticks over
        assert len({job.run.path for job in jobs}) == 3
    finally:
        for job in jobs:
            job.close()


def _hold(path: str, ready) -> None:
    from tuneforge.run.rundir import RunLock

    RunLock(Path(path)).acquire()
    ready.set()
    time.sleep(120)


def test_a_dead_holders_lock_is_taken_over_and_named(tmp_path):
    from tuneforge.run.rundir import RunBusy, RunLock, lock_holder

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready))
    holder.start()
    assert ready.wait(60)
    assert lock_holder(tmp_path)["pid"] == holder.pid
    with pytest.raises(RunBusy, match=f"pid {holder.pid} on "):
        RunLock(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)  # no chance to clean up: the lock file stays behind
    holder.join()
    assert (tmp_path / ".lock").exists() and lock_holder(tmp_path) is None
    lock = RunLock(tmp_path).acquire()
    assert lock.stale["pid"] == holder.pid  # the stale record, reported when taken over
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_live_run_is_locked_and_a_killed_one_says_so_and_resumes_from_its_directory(tiny_bert_dir, tmp_path,
                                                                                    monkeypatch):
    write_text_csv(tmp_path / "train.csv", n=40)
    run = tmp_path / "run"
    recipe = text_recipe(tiny_bert_dir, "train.csv", run, train={"epochs": 4, "batch_size": 4, "save_every": 2,
                                                                 "deterministic": True})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = _start(tmp_path / "recipe.yaml", tmp_path)
    _wait(proc, lambda: (run / "checkpoints" / "step-00000002").exists())
    os.kill(proc.pid, signal.SIGSTOP)  # alive, holding its run, but not going anywhere while we knock
    try:
        assert _manifest(run)["status"] == "running"
        before = _tree(run)
        monkeypatch.chdir(tmp_path)
        with pytest.raises(TuneforgeError, match=f"in use by another tuneforge process \\(pid {proc.pid} on "):
            finetune(recipe, overrides=["output.overwrite=true"])
        with pytest.raises(TuneforgeError, match=f"pid {proc.pid}.*then `tuneforge train --resume {run}`"):
            finetune(recipe, resume=str(run))
        with pytest.raises(TuneforgeError, match="no unfinished run .*not running now"):
            finetune(recipe, resume="auto")  # auto passes a live run by
        assert _tree(run) == before  # the live run's files, untouched by all three
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    from tuneforge.run.rundir import run_status

    assert _manifest(run)["status"] == "running"  # what the file says, forever
    assert run_status(run) == "interrupted (process gone)"  # what a look says
    assert main(["report", str(run)]) == 0 and "interrupted (process gone)" in (run / "report.html").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no recipe, no --output, another directory: the run knows itself
    assert main(["train", "--resume", str(run)]) == 0
    manifest = _manifest(run)
    assert manifest["status"] == "completed" and manifest["resumed"] and manifest["pid"] == os.getpid()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps))  # one writer: nothing interleaved, nothing twice


# --------------------------------------------------------------------------- --overwrite

def test_overwrite_killed_before_its_first_checkpoint_keeps_the_old_run(tiny_bert_dir, tmp_path):
    from tuneforge.run.rundir import run_status

    train = write_text_csv(tmp_path / "train.csv", n=40)
    run = tmp_path / "run"
    finetune(text_recipe(tiny_bert_dir, train, run, train={"epochs": 1}))
    before = _tree(run)
    # the replacement's first checkpoint is far away: its first evaluation, after 150 steps
    slow = text_recipe(tiny_bert_dir, write_text_csv(tmp_path / "big.csv", n=800), run,
                       train={"epochs": 1, "batch_size": 4})
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(slow))
    proc = _start(tmp_path / "slow.yaml", tmp_path, "--overwrite")
    _wait(proc, lambda: _manifest(run).get("pid") == proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints").exists()  # killed before its first checkpoint
    backup = tmp_path / "run.previous"
    assert _tree(backup) == before  # every file of the old run, byte for byte
    assert run_status(run) == "interrupted (process gone)"
    with pytest.raises(TuneforgeError, match="no valid resumable checkpoint.*kept in .*run.previous"):
        finetune(slow, resume=str(run))
    # the next --overwrite replaces the dead replacement, and drops the copy once it has a checkpoint
    finetune(text_recipe(tiny_bert_dir, train, run, train={"epochs": 1}), overrides=["output.overwrite=true"])
    assert not backup.exists() and _manifest(run)["status"] == "completed"


def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(tiny_bert_dir, tmp_path,
                                                                               monkeypatch):
    from tuneforge.tasks.base import ClassificationTask

    train = write_text_csv(tmp_path / "train.csv", n=40)
    recipe = text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"epochs": 1})
    run = finetune(recipe).path
    (run / "notes.txt").write_text("the user's own file")
    before = _tree(run)

    def broken(self, model, batch):
        raise RuntimeError("a bug in step 1")

    monkeypatch.setattr(ClassificationTask, "forward", broken)
    with pytest.raises(RuntimeError, match="a bug in step 1"):
        finetune(recipe, overrides=["output.overwrite=true"])
    assert _tree(run) == before and not (tmp_path / "run.previous").exists()


# --------------------------------------------------------------------------- refusals and completion

@pytest.fixture(scope="module")
def done(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("done")
    train = write_text_csv(tmp / "train.csv", n=40)
    recipe = text_recipe(tiny_bert_dir, train, tmp / "run", train={"epochs": 1, "save_every": 1})
    return finetune(recipe).path, recipe


def test_refusals_come_before_the_model_loads(done, tmp_path, monkeypatch):
    import tuneforge.models as models

    run, recipe = done
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    (tmp_path / "a-file").write_text("x")
    cases = [({}, {}, "already holds a run \\(completed\\).*--overwrite"),
             ({"dir": str(run / "model")}, {}, "inside the run"),
             ({"dir": str(run / "checkpoints" / "new"), "overwrite": True}, {}, "inside the run"),
             ({"dir": str(tmp_path / "a-file")}, {}, "is a file"),
             ({}, {"resume": str(run)}, "nothing to resume"),
             ({}, {"resume": str(tmp_path)}, "not a tuneforge run directory")]
    for output, kwargs, message in cases:
        with pytest.raises(TuneforgeError, match=message):
            finetune({**recipe, "output": {**recipe["output"], **output}}, **kwargs)
    assert loads == []


def test_a_completed_run_drops_its_resumable_state_and_has_nothing_to_resume(done, capsys):
    run, recipe = done
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best"]  # no optimizer state left
    manifest = _manifest(run)
    assert manifest["status"] == "completed" and manifest["resumable"] is False
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "completed" in err and "nothing to resume" in err and "--init-from" in err
