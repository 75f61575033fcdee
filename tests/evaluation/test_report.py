"""Every run ends with a self-contained report.html; `tuneforge report` redraws and compares."""

from __future__ import annotations

import io
import json
import re
import time
from html.parser import HTMLParser

import pytest
from PIL import Image

import tuneforge
from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge.cli import main

SECTIONS = ["summary", "curves", "learning-rates", "confusion-matrix", "per-class", "calibration",
            "confidently-wrong", "parameters", "throughput", "reproducibility", "recipe", "manifest"]
FIGURES = ["curves", "learning_rates", "confusion_matrix", "calibration", "throughput_memory"]


class _Page(HTMLParser):
    """Collects each <section>'s content and every reference to something outside the page."""

    def __init__(self):
        super().__init__()
        self.sections, self.current, self.external, self.tags = {}, None, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.current = attrs["id"]
            self.sections[self.current] = {"imgs": 0, "rows": 0, "text": ""}
        for key in ("src", "href", "data", "poster"):
            value = attrs.get(key)
            if value is not None and not value.startswith(("data:image/png;base64,", "#")):
                self.external.append(value)
        if self.current and tag == "img":
            self.sections[self.current]["imgs"] += 1
        if self.current and tag == "tr":
            self.sections[self.current]["rows"] += 1

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.current:
            self.sections[self.current]["text"] += data


def _parse(path):
    page = _Page()
    text = path.read_text()
    page.feed(text)
    assert "script" not in page.tags and "link" not in page.tags and "url(" not in text and "@import" not in text
    assert not page.external, page.external  # nothing outside the file
    return page


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    train = write_text_csv(tmp / "train.csv", n=48)
    return tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp / "run", "lora",
                                          train={"epochs": 3, "eval_every": 2, "log_every": 1, "warmup": 4},
                                          output={"report": True}))


def test_report_has_every_figure_and_table(text_run):
    page = _parse(text_run.path / "report.html")
    assert list(page.sections) == SECTIONS
    for sid in ("curves", "learning-rates", "confusion-matrix", "calibration"):
        assert page.sections[sid]["imgs"] == 1, sid
    assert page.sections["throughput"]["imgs"] == 1 and page.sections["throughput"]["rows"] > 3
    assert page.sections["per-class"]["rows"] == 1 + 2  # header + two classes
    assert page.sections["parameters"]["rows"] > 2 and "adapter parameters" in page.sections["parameters"]["text"]
    assert page.sections["summary"]["rows"] > 10
    assert "strategy:" in page.sections["recipe"]["text"] and "lock" in page.sections["manifest"]["text"]
    assert any(caveat in page.sections["reproducibility"]["text"] for caveat in (
        "torch threads", "autocast", "non-deterministic kernels", "nothing known"))  # one thread in tests
    wrong = json.loads((text_run.path / "eval.json").read_text())["validation"]["confidently_wrong"]
    assert page.sections["confidently-wrong"]["rows"] == 1 + len(wrong)
    for name in FIGURES:  # the same figures as PNG files, each a real non-blank image
        im = Image.open(io.BytesIO((text_run.path / "report" / f"{name}.png").read_bytes()))
        lo, hi = im.convert("L").getextrema()
        assert im.size[0] > 200 and hi - lo > 50, name


def test_lr_figure_has_one_line_per_param_group(text_run):
    events = [json.loads(x) for x in (text_run.path / "metrics.jsonl").read_text().splitlines()]
    groups = {k for e in events if e["event"] == "train" for k in e["lr"]}
    assert len(groups) >= 2  # backbone adapters and head, at their own rates


def _section_html(path, sid: str) -> str:
    text = path.read_text()
    start = text.index(f"<section id='{sid}'>")
    return text[start:text.index("</section>", start)]


def test_parameters_are_summarised_by_module_group_with_the_detail_collapsed(text_run):
    """Issue 22: one row per tensor (~220 for MiniLM) made the page 9,000 px tall."""
    section = _section_html(text_run.path / "report.html", "parameters")
    summary, detail = section.split("<details>", 1)
    groups = [g["group"] for g in json.loads((text_run.path / "manifest.json").read_text())["parameters"]["groups"]]
    assert groups == ["0: embeddings", "1: encoder.layer.0", "2: encoder.layer.1 (+1)", "head"]
    assert summary.count("<tr>") == 1 + len(groups) and "module group" in summary
    assert detail.startswith("<summary>every module (") and detail.count("<tr>") > 30
    assert "base_model.model" not in section and "lora_A.default.weight" not in section  # modules, not tensors
    assert "7,234" in summary  # counts read with separators


def test_throughput_figures_are_read_as_units_not_raw_floats(text_run):
    page = _Page()
    page.feed((text_run.path / "report.html").read_text())
    text = page.sections["throughput"]["text"]
    assert re.search(r"matmul_peak_flops[\d.]+ [kMGT]FLOP/s", text), text
    assert re.search(r"train_s\d+\.\d{1,2} s", text) and re.search(r"peak_rss_mb[\d,]+ MB", text)
    assert re.search(r"train_flops_per_token[\d.]+ [kMG]?FLOP per token", text)
    assert not re.search(r"\d\.\d{5,}", text)  # no 45599742341.9762


def test_lr_figure_draws_the_warmup_of_every_step(text_run):
    """Issue 22: the figure drew only the logged steps, so a warmup between two logs vanished."""
    from tuneforge.evaluation.figures import lr_lines

    manifest = json.loads((text_run.path / "manifest.json").read_text())
    schedule = manifest["lr_schedule"]
    assert schedule["step"] == list(range(1, manifest["steps"] + 1))  # 15 steps: every one kept
    assert schedule["multiplier"][:4] == [0.25, 0.5, 0.75, 1.0]  # train.warmup: 4 steps
    events = [json.loads(x) for x in (text_run.path / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert train[0]["lr"]["backbone"] == pytest.approx(0.25e-3)  # the rate step 1 used, not step 2's
    lines = lr_lines(train[::5], schedule)  # logged rarely: the curve still has every step
    assert set(lines) == {"backbone", "head"}  # head.no_decay at the head's rates is drawn once
    steps, lrs = lines["backbone"]["curve"]
    assert steps[:4] == [1, 2, 3, 4] and lrs[:4] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    # the logged rates lie on the curve (its multipliers are kept to 6 significant digits)
    assert all(lr == pytest.approx(lrs[steps.index(s)], rel=1e-5) for s, lr in zip(*lines["backbone"]["logged"]))


def test_report_command_regenerates_fast_and_compares(text_run, tmp_path, capsys):
    (text_run.path / "report.html").unlink()
    t0 = time.perf_counter()
    assert main(["report", str(text_run.path)]) == 0
    assert time.perf_counter() - t0 < 10  # a couple of seconds on a free core; generous for a shared CI box
    _parse(text_run.path / "report.html")
    out = tmp_path / "cmp.html"
    assert main(["report", str(text_run.path), str(text_run.path), "--out", str(out)]) == 0
    page = _parse(out)
    assert page.sections["metrics-validation"]["rows"] > 5 and page.sections["curves"]["imgs"] == 1


def test_image_report_shows_thumbnails(tiny_timm_weights, tmp_path):
    train = write_image_folder(tmp_path / "imgs", n_per_class=6)
    recipe = image_recipe(tiny_timm_weights, train, tmp_path / "run", "full", train={"epochs": 1, "lr": 1e-6})
    del recipe["output"]["report"]  # on by default
    run = tuneforge.finetune(recipe)
    wrong = json.loads((run.path / "eval.json").read_text())["validation"]["confidently_wrong"]
    page = _parse(run.path / "report.html")
    assert page.sections["confidently-wrong"]["imgs"] == len(wrong)
    if wrong:
        assert (run.path / "report" / "confidently_wrong.png").stat().st_size > 100
    # and directly, whatever this run got wrong
    from tuneforge.evaluation.report import _wrong_examples

    table, grid = _wrong_examples([{"index": 0, "label": "red", "predicted": "blue", "confidence": 0.9,
                                    "image": str(next((train / "red").iterdir())), "where": "red/0.png"}])
    assert "data:image/png;base64," in table and Image.open(io.BytesIO(grid)).size == (100, 100)


def test_a_failing_report_keeps_the_run(tiny_bert_dir, tmp_path, monkeypatch):
    import tuneforge.evaluation.report as report
    from rich.console import Console

    def broken(path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "write_report", broken)
    console = Console(file=io.StringIO(), width=200)
    train = write_text_csv(tmp_path / "train.csv", n=24)
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full", train={"max_steps": 2},
                                         output={"report": True}), console=console)
    assert "report could not be written" in console.file.getvalue() and "disk on fire" in console.file.getvalue()
    assert (run.path / "eval.json").exists() and (run.path / "model").is_dir()
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "completed"


def test_tensorboard_logger_writes_the_same_numbers(tiny_bert_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = write_text_csv(tmp_path / "train.csv", n=24)
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full",
                                         train={"max_steps": 4, "eval_every": 2, "log_every": 1},
                                         output={"loggers": ["tensorboard"], "report": False}))
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "validation/accuracy", "validation/f1_macro", "lr/head"} <= set(tags)
    evals = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    logged = {e.step: e.value for e in acc.Scalars("validation/loss")}
    assert logged == {e["step"]: pytest.approx(e["loss"], rel=1e-6) for e in evals}
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_mlflow_logger_writes_the_same_numbers_to_a_local_store(tiny_bert_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the store back, as the logger writes it

    train = write_text_csv(tmp_path / "train.csv", n=24)
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full",
                                         train={"max_steps": 4, "eval_every": 2, "log_every": 1},
                                         output={"loggers": ["mlflow"], "report": False}))
    client = MlflowClient(tracking_uri=(run.path / "mlruns").resolve().as_uri())
    (logged_run,) = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id])
    assert logged_run.info.status == "FINISHED" and logged_run.data.params["train.max_steps"] == "4"
    evals = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    history = {m.step: m.value for m in client.get_metric_history(logged_run.info.run_id, "validation/loss")}
    assert history == {e["step"]: pytest.approx(e["loss"], rel=1e-6) for e in evals}
    steps = [m.step for m in client.get_metric_history(logged_run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_report_out_overwrites_only_reports_and_never_writes_into_a_run(text_run, tmp_path, capsys):
    """Issue 22: `report RUN --out <any file>` replaced it, a run's manifest.json included."""
    run = text_run.path
    victims = [run / "manifest.json", run / "eval.json", tmp_path / "notes.html", tmp_path / "data.csv"]
    victims[2].write_text("<!DOCTYPE html><html><body>my own page</body></html>")
    victims[3].write_text("text,label\ngood,pos\n")
    before = {v: _sha(v) for v in victims}
    for out in [*victims, run / "comparison.html", run / "model" / "cmp.html"]:
        assert main(["report", str(run), "--out", str(out)]) == 2, out
        assert "error:" in capsys.readouterr().err
    assert {v: _sha(v) for v in victims} == before
    assert not (run / "comparison.html").exists() and not (run / "model" / "cmp.html").exists()
    # a comparison page replaces an earlier one (its own kind), written outside every run
    page = tmp_path / "cmp.html"
    assert main(["report", str(run), str(run), "--out", str(page)]) == 0
    assert main(["report", str(run), str(run), "--out", str(page)]) == 0
    _parse(page)
    assert main(["report", str(run)]) == 0 and (run / "report.html").exists()  # its own report path


def test_a_damaged_manifest_is_an_error_that_names_the_fix(text_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(text_run.path, copy)
    (copy / "manifest.json").write_text("<!DOCTYPE html><html>not json")
    for command in (["report", str(copy)], ["reproduce", str(copy)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "manifest.json is damaged" in err and "restore it" in err and "Traceback" not in err
