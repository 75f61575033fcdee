"""What a run prints while it trains, on a terminal and in a log file (issue 22): the evaluation
lines never vanish, and a log never holds bar glyphs."""

from __future__ import annotations

import io
import re
import warnings

import pytest
from rich.console import Console

from helpers import text_recipe, write_text_csv
from tuneforge import finetune


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory):
    return write_text_csv(tmp_path_factory.mktemp("progress") / "train.csv", n=24)


def _run(tiny_bert_dir, train_csv, tmp_path, progress: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, width=120)  # a file: not a terminal, as under nohup, CI or `2> log`
    assert not console.is_terminal
    finetune(text_recipe(tiny_bert_dir, train_csv, tmp_path / "run", train={
        "max_steps": 4, "eval_every": 2, "log_every": 1, "progress": progress}), console=console)
    return out.getvalue()


def test_evaluation_lines_are_printed_with_progress_off(tiny_bert_dir, train_csv, tmp_path):
    text = _run(tiny_bert_dir, train_csv, tmp_path, progress=False)
    lines = re.findall(r"^step (\d+) validation: accuracy [0-9.]+, loss [0-9.]+, f1_macro [0-9.]+( \*)?$", text, re.M)
    assert [step for step, _ in lines] == ["2", "4"], text
    assert lines[0][1] == " *"  # the first evaluation is the best so far
    assert not re.search(r"^step \d+/\d+", text, re.M)  # no training lines: progress is off


def test_a_log_gets_plain_lines_never_bar_glyphs(tiny_bert_dir, train_csv, tmp_path):
    text = _run(tiny_bert_dir, train_csv, tmp_path, progress=True)
    training = re.findall(r"^step (\d+)/4 \(epoch [0-9.]+\): loss [0-9.]+, lr [0-9.e+-]+, [0-9.]+ samples/s.*$",
                          text, re.M)
    assert training == ["1", "2", "3", "4"], text  # one line per log interval (train.log_every: 1)
    assert "eta 0:" in text and len(re.findall(r"^step \d+ validation:", text, re.M)) == 2
    assert not any(glyph in text for glyph in "━…█"), text


def test_a_terminal_gets_the_bar():
    from tuneforge.engine.progress import PlainProgress, RichProgress, progress_callback

    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress_callback(terminal, print, True), RichProgress)
    off = progress_callback(terminal, print, False)
    assert isinstance(off, PlainProgress) and not off.every_log
    assert isinstance(progress_callback(None, print, True), PlainProgress)


def test_library_bars_stay_out_of_a_log(tiny_bert_dir, train_csv, tmp_path, capfd):
    """transformers draws its own tqdm bars on stderr (loading, writing weights): not in a log."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings():  # as outside the test suite (conftest turns them off)
        warnings.simplefilter("ignore")
        hub.enable_progress_bars()
        hf_logging.enable_progress_bar()
    try:
        _run(tiny_bert_dir, train_csv, tmp_path, progress=True)
        err = capfd.readouterr().err
        assert not any(glyph in err for glyph in "█━"), err
        assert hf_logging.is_progress_bar_enabled()  # given back when the run ended
    finally:
        hub.disable_progress_bars()
        hf_logging.disable_progress_bar()
