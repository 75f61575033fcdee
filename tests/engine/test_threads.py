"""train.threads: a CPU run takes only the free cores (auto) or the count it is given, respects
OMP_NUM_THREADS, records the count in the manifest and restores torch's setting afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.engine import threads


@pytest.mark.parametrize("cores,busy,expected", [
    (2, 0.0, 2), (2, 0.1, 2), (2, 0.3, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 5.0, 1),
    (8, 0.0, 8), (8, 2.9, 5), (8, 2.7, 5), (8, 2.8, 5), (8, 2.0, 6), (1, 0.0, 1),
])
def test_choose_takes_the_free_cores(cores, busy, expected):
    assert threads.choose(cores, busy) == expected


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"), reason="Linux /proc")
def test_other_busy_cores_counts_another_process_and_not_this_one():
    if threads.other_busy_cores(0.01) is None:
        pytest.skip("a CPU set smaller than the machine: the measure says None there")
    spin = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        other = threads.other_busy_cores(0.5)
    finally:
        proc.kill()
        proc.wait()
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])  # busy in this process
    spinner.start()
    try:
        mine = threads.other_busy_cores(0.5)
    finally:
        stop.set()
        spinner.join()
    assert other >= 0.6  # one spinning process is about one core
    assert mine < other - 0.4  # our own busy thread is not "other"


def test_auto_takes_one_thread_when_a_core_is_busy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "other_busy_cores", lambda seconds=0.25: 1.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    said = []
    try:
        with threads.intra_op_threads("auto", torch.device("cpu"), said.append) as n:
            assert n == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored
        assert said and "other processes keep 1.0 cores busy" in said[0] and "train.threads" in said[0]
        monkeypatch.setattr(threads, "other_busy_cores", lambda seconds=0.25: 0.0)
        with threads.intra_op_threads("auto", torch.device("cpu"), said.append) as n:
            assert n == 2  # a quiet machine: all of it
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(threads, "other_busy_cores", lambda seconds=0.25: 1.0)
        with threads.intra_op_threads("auto", torch.device("cpu"), said.append) as n:
            assert n == 2  # the user's environment wins
        with threads.intra_op_threads(1, torch.device("cpu"), said.append) as n:
            assert n == 1  # and so does a number in the recipe
        with threads.intra_op_threads(1, torch.device("cuda"), said.append) as n:
            assert n == 2  # CPU threads are not the GPU's business
        assert len(said) == 1
    finally:
        torch.set_num_threads(before)


def test_a_run_records_the_count_it_used_and_restores_torch(tiny_bert_dir, tmp_path):
    before = torch.get_num_threads()
    train = write_text_csv(tmp_path / "train.csv", n=16)
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"epochs": 1, "threads": 2}))
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert '"torch_threads": 2' in json.dumps(manifest)
    assert torch.get_num_threads() == before


def test_a_bad_count_is_a_recipe_error(tiny_bert_dir, tmp_path):
    from tuneforge.errors import TuneforgeError

    train = write_text_csv(tmp_path / "train.csv", n=16)
    with pytest.raises((TuneforgeError, ValueError), match="threads"):
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"threads": 0}))
