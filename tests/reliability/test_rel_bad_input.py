"""Issue 3 -- bad input never costs work: one row per kind of bad input.

Every case runs the real entry point (``tuneforge.finetune(recipe_dict)``, or the CLI
where the mistake is a command-line one) and checks three things:

1. the outcome: a ``TuneforgeError`` -- or, for inputs that must work (odd image
   modes, ``truncate``, ``on_bad_record: skip``), a completed run that reports what it
   cut or skipped in its manifest;
2. the message names the place (file + line/row, or the recipe key) *and* a fix;
3. nothing written before was touched: an unrelated file and a previous completed run
   next to the output directory stay byte-identical, and the new run directory is
   either absent or marked ``failed`` -- never ``completed`` or left ``running``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import tuneforge
from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge.cli import main
from tuneforge.errors import TuneforgeError

FAST_TRAIN = {"epochs": 1, "batch_size": 4}


@dataclass
class Env:
    """What a case builds on: a scratch folder, the tiny models, and where the run goes."""

    tmp: Path
    bert: Path
    timm: tuple
    runs: Path  # parent of the output dir: holds unrelated.txt and previous/ (a completed run)

    @property
    def out(self) -> Path:
        return self.runs / "new"

    def text(self, data_file: Path, **extra) -> dict:
        extra["train"] = {**FAST_TRAIN, **extra.get("train", {})}
        return text_recipe(self.bert, data_file, self.out, **extra)

    def image(self, data_path: Path, **extra) -> dict:
        extra["train"] = {**FAST_TRAIN, **extra.get("train", {})}
        return image_recipe(self.timm, data_path, self.out, **extra)

    def csv(self, name: str, body: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        return path

    def folder(self, n_per_class: int = 4) -> Path:
        return write_image_folder(self.tmp / "train", n_per_class=n_per_class)

    def manifest(self, extra_lines: str = "", n: int = 6) -> Path:
        """data/m.csv listing n good images in data/imgs/ (relative paths), then extra_lines."""
        folder = write_image_folder(self.tmp / "data" / "imgs", n_per_class=n // 2)
        lines = ["image,label"] + [f"imgs/{p.parent.name}/{p.name},{p.parent.name}"
                                   for p in sorted(folder.rglob("*.png"))]
        return self.csv("data/m.csv", "\n".join(lines) + "\n" + extra_lines)


@dataclass
class Case:
    id: str
    build: Callable[[Env], dict]  # -> recipe dict (or {"argv": [...]} for a CLI case)
    where: tuple[str, ...] = ()  # every one must appear in the message
    fix: str = ""  # a key phrase of the fix
    ok: bool = False  # the run must succeed
    check: Callable[[dict], None] | None = None  # extra checks on a successful run's manifest
    cli: bool = False
    out_is_previous: bool = False


def _lines(*rows: str, header: str = "text,label") -> str:
    return "\n".join((header, *rows)) + "\n"


GOOD = [f"{w} film,{lab}" for w, lab in (("good", "pos"), ("bad", "neg"), ("great", "pos"), ("awful", "neg"),
                                         ("fun", "pos"), ("boring", "neg"), ("loved", "pos"), ("hated", "neg"))]


def _png(path: Path, size=(24, 24), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path, **save)
    return path


# ------------------------------------------------------------------ case builders

def malformed_csv(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*GOOD[:2], '"good film" fun,pos', *GOOD[2:])))


def csv_field_count(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*GOOD[:3], "good, fun film,pos", *GOOD[3:])))


def malformed_jsonl(env: Env) -> dict:
    rows = [json.dumps({"text": t.split(",")[0], "label": t.split(",")[1]}) for t in GOOD]
    rows.insert(2, '{"text": "good film", "label": ')
    return env.text(env.csv("train.jsonl", "\n".join(rows) + "\n"))


def wrong_encoding(env: Env) -> dict:
    body = _lines(*GOOD[:3], "caf\u00e9 film,pos", *GOOD[3:]).encode("latin-1")
    return env.text(env.csv("train.csv", body))


def missing_column(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*GOOD, header="sentence,label")))


def empty_value(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(GOOD[0], "   ,neg", *GOOD[1:])))


def empty_file(env: Env) -> dict:
    return env.text(env.csv("train.csv", b""))


def header_only(env: Env) -> dict:
    return env.text(env.csv("train.csv", "text,label\n"))


def duplicate_ids(env: Env) -> dict:
    rows = [f"{i if i != 5 else 'abc'},{row}" for i, row in enumerate(GOOD)]
    rows[1] = "abc," + GOOD[1]
    return env.text(env.csv("train.csv", _lines(*rows, header="id,text,label")), data={"id_column": "id"})


def validation_label_unknown(env: Env) -> dict:
    val = env.csv("val.csv", _lines("good film,pos", "meh film,neutral", "bad film,neg"))
    return env.text(env.csv("train.csv", _lines(*GOOD)), data={"validation": str(val)})


def unknown_test_label(env: Env) -> dict:
    test = env.csv("test.csv", _lines("good film,pos", "bad film,neg", "meh film,neutral"))
    return env.text(env.csv("train.csv", _lines(*GOOD)), data={"test": str(test)})


def single_class(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*(f"film {i},pos" for i in range(10)))))


LONG = "the movie was really very good and the plot was fun"  # 11 words -> 13 tokens with [CLS]/[SEP]


def _too_long(env: Env, mode: str) -> dict:
    rows = GOOD[:4] + [f"{LONG},pos", f"{LONG} not,neg", f"{LONG} this,pos"] + GOOD[4:]
    return env.text(env.csv("train.csv", _lines(*rows)), task={"max_length": 8, "truncation": mode})


def _truncated_count(manifest: dict) -> None:
    assert sum(manifest["task_settings"]["truncated"].values()) == 3, manifest["task_settings"]


def unreadable_image(env: Env) -> dict:
    train = env.folder()
    (train / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return env.image(train)


def truncated_image(env: Env) -> dict:
    train = env.folder()
    whole = _png(env.tmp / "whole.png", size=(64, 64)).read_bytes()
    (train / "red" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return env.image(train)


def zero_byte_image(env: Env) -> dict:
    train = env.folder()
    (train / "blue" / "empty.png").write_bytes(b"")
    return env.image(train)


ODD_MODES = {"cmyk.jpg": "CMYK", "sixteen.png": "I;16", "palette.png": "P", "grey_alpha.png": "LA"}


def odd_modes(env: Env) -> dict:
    train = env.folder()
    Image.new("CMYK", (24, 24), (0, 220, 220, 10)).save(train / "red" / "cmyk.jpg")
    Image.fromarray(np.full((24, 24), 9000, dtype=np.uint16)).save(train / "blue" / "sixteen.png")
    pal = Image.new("P", (24, 24), 1)
    pal.putpalette([255, 255, 255, 200, 20, 20] + [0] * 762)
    pal.paste(0, (0, 0, 12, 24))
    pal.save(train / "red" / "palette.png", transparency=0)
    Image.new("LA", (24, 24), (40, 128)).save(train / "blue" / "grey_alpha.png")
    for name, mode in ODD_MODES.items():  # the files really are in the awkward modes
        file = next(train.rglob(name))
        with Image.open(file) as im:
            assert im.mode == mode and (mode != "P" or "transparency" in im.info)
    return env.image(train)


def _odd_modes_used(manifest: dict) -> None:
    assert manifest["examples"]["train"] + manifest["examples"]["validation"] == 8 + len(ODD_MODES)


def huge_image(env: Env) -> dict:
    train = env.folder()
    _png(train / "red" / "huge.png", size=(64, 64))  # 4,096 pixels; the 24x24 ones have 576
    return env.image(train, data={"max_image_pixels": 1000})


def recipe_typo(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*GOOD)), train={"bach_size": 4})


def wrong_type(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*GOOD)), train={"lr": "fast"})


def missing_train(env: Env) -> dict:
    return env.text(env.tmp / "nope.csv")


def missing_validation(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*GOOD)), data={"validation": str(env.tmp / "nope_val.csv")})


def missing_weights(env: Env) -> dict:
    recipe = env.image(env.folder())
    recipe["model"]["weights"] = str(env.tmp / "nope.safetensors")
    return recipe


def model_dir_without_weights(env: Env) -> dict:
    model = env.tmp / "model_no_weights"
    shutil.copytree(env.bert, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    recipe = env.text(env.csv("train.csv", _lines(*GOOD)))
    recipe["model"]["name"] = str(model)
    return recipe


def output_holds_run(env: Env) -> dict:
    recipe = env.text(env.csv("train.csv", _lines(*GOOD)))
    path = env.tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return {"argv": ["train", str(path), "--output", str(env.runs / "previous")]}


def manifest_escape(env: Env) -> dict:
    _png(env.tmp / "outside" / "secret.png")
    return env.image(env.manifest("../outside/secret.png,red\n"))


def manifest_symlink_escape(env: Env) -> dict:
    _png(env.tmp / "outside" / "secret.png")
    (env.tmp / "data").mkdir()
    (env.tmp / "data" / "linked").symlink_to(env.tmp / "outside", target_is_directory=True)
    return env.image(env.manifest("linked/secret.png,blue\n"))


def skip_bad_row_and_image(env: Env) -> dict:
    (env.tmp / "data" / "bad").mkdir(parents=True)
    (env.tmp / "data" / "bad" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    m = env.manifest("imgs/red/0.png,red,extra-field\nbad/corrupt.png,blue\n")
    return env.image(m, data={"on_bad_record": "skip"})


def _both_skipped(manifest: dict) -> None:
    skipped = manifest["skipped"]["train"]
    assert len(skipped) == 2, skipped
    assert any("m.csv line 8" in s and "expected 2 fields" in s for s in skipped), skipped
    assert any("m.csv line 9" in s and "corrupt.png" in s and "cannot read image" in s for s in skipped), skipped


# -- issue 22: data that used to train silently wrong

def duplicate_columns(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*(f"{row},x" for row in GOOD), header="text,label,text")))


def nan_label(env: Env) -> dict:
    return env.text(env.csv("train.csv", _lines(*GOOD[:3], "meh film,nan", *GOOD[3:])))


def _jsonl(env: Env, name: str, rows: list) -> Path:
    return env.csv(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _good_jsonl(**changes) -> list:
    rows = [{"text": t.split(",")[0], "label": 1 if t.endswith("pos") else 0} for t in GOOD]
    for i, row in changes.items():
        rows[int(i[1:])] = row
    return rows


def jsonl_mixed_label_types(env: Env) -> dict:
    val = _jsonl(env, "val.jsonl", [{"text": "nice film", "label": 1}, {"text": "poor film", "label": 0}])
    return env.text(_jsonl(env, "train.jsonl", _good_jsonl(r4={"text": "fun film", "label": True})),
                    data={"validation": str(val)})


def jsonl_list_as_text(env: Env) -> dict:
    return env.text(_jsonl(env, "train.jsonl", _good_jsonl(r2={"text": ["great", "film"], "label": 1})))


def jsonl_first_line_lacks_key(env: Env) -> dict:
    return env.text(_jsonl(env, "train.jsonl", _good_jsonl(r0={"sentence": "good film", "label": 1})))


def overlap_not_allowed(env: Env) -> dict:
    train = env.csv("train.csv", _lines(*GOOD))
    return env.text(train, data={"validation": str(train), "allow_overlap": False})


def folder_link_escapes(env: Env) -> dict:
    train = env.folder()
    (train / "red" / "passwd.png").symlink_to(_png(env.tmp / "outside" / "secret.png"))
    return env.image(train)


def dpo_chosen_is_rejected(env: Env) -> dict:
    pairs = [{"prompt": f"reverse {w} =", "chosen": f" {w[::-1]}", "rejected": f" {w}"} for w in ("abc", "dge", "fab")]
    pairs.insert(1, {"prompt": "reverse cab =", "chosen": " bac", "rejected": " bac "})
    recipe = env.text(_jsonl(env, "train.jsonl", pairs))
    recipe["task"] = {"type": "preference"}  # the model is never loaded: the data is refused first
    return recipe


CASES = [
    Case("malformed-csv-line", malformed_csv, ("train.csv line 4",), "check the quoting"),
    Case("csv-wrong-field-count", csv_field_count, ("train.csv line 5", "expected 2 fields"),
         "data.on_bad_record: skip"),
    Case("malformed-jsonl-line", malformed_jsonl, ("train.jsonl line 3", "invalid JSON"), "fix or delete that line"),
    Case("wrong-encoding", wrong_encoding, ("train.csv line 5", "not valid UTF-8"), "re-save the file as UTF-8"),
    Case("missing-column", missing_column, ("train.csv", "'text'", "sentence"), "set data.text_column"),
    Case("empty-column-value", empty_value, ("train.csv line 3", "empty value in column 'text'"),
         "data.on_bad_record: skip"),
    Case("empty-file", empty_file, ("train.csv", "the file is empty"), "add data rows"),
    Case("header-only-file", header_only, ("train.csv", "only a header line"), "add data rows"),
    Case("duplicate-ids", duplicate_ids, ("train.csv line 7 repeats id 'abc' first seen on line 3",
                                          "data.id_column"), "must be unique"),
    Case("validation-label-not-in-training", validation_label_unknown, ("val.csv line 3", "'neutral'"),
         "add examples of it to the training data"),
    Case("test-label-not-in-training", unknown_test_label, ("test.csv line 4", "'neutral'"),
         "add examples of it to the training data"),
    Case("single-class-training-set", single_class, ("train.csv line", "data.label_column"), "at least two"),
    Case("text-too-long-truncation-error", lambda env: _too_long(env, "error"),
         ("train.csv line", " tokens)", "task.max_length = 8"), "task.truncation: truncate"),
    Case("text-too-long-truncate-reports", lambda env: _too_long(env, "truncate"), ok=True, check=_truncated_count),
    Case("unreadable-image", unreadable_image, ("broken.png",), "data.on_bad_record: skip"),
    Case("truncated-image", truncated_image, ("truncated.png",), "data.on_bad_record: skip"),
    Case("zero-byte-image", zero_byte_image, ("empty.png", "0 bytes"), "remove or replace the file"),
    Case("odd-image-modes-succeed", odd_modes, ok=True, check=_odd_modes_used),
    Case("huge-image-beyond-max-pixels", huge_image, ("huge.png", "64x64", "1,000 pixels"),
         "raise data.max_image_pixels"),
    Case("recipe-typo", recipe_typo, ("train.bach_size",), "did you mean 'batch_size'"),
    Case("recipe-wrong-type", wrong_type, ("train.lr", "'fast'"), "valid number"),
    Case("missing-data-train", missing_train, ("data.train", "nope.csv"), "does not exist"),
    Case("missing-data-validation", missing_validation, ("data.validation", "nope_val.csv"), "does not exist"),
    Case("missing-model-weights", missing_weights, ("nope.safetensors",), "set model.weights"),
    Case("model-dir-without-weights", model_dir_without_weights, ("model_no_weights", "no weight files"),
         "Copy the weights next to config.json"),
    Case("output-dir-holds-another-run", output_holds_run, ("previous", "already holds a run"), "--overwrite",
         cli=True, out_is_previous=True),
    Case("manifest-path-escapes-folder", manifest_escape, ("m.csv line 8", "../outside/secret.png"),
         "use an absolute path"),
    Case("manifest-symlink-escapes-folder", manifest_symlink_escape, ("m.csv line 8", "linked/secret.png"),
         "move the manifest up"),
    Case("skip-malformed-row-and-bad-image", skip_bad_row_and_image, ok=True, check=_both_skipped),
    Case("duplicate-column-names", duplicate_columns, ("train.csv line 1", "'text' (2 times)"),
         "rename the duplicate columns"),
    Case("nan-label", nan_label, ("train.csv line 5", "'nan', a missing-value marker"), "data.on_bad_record: skip"),
    Case("jsonl-mixed-label-types", jsonl_mixed_label_types, ("train.jsonl line 5", "a boolean", "train.jsonl line 1"),
         "write every label the same way"),
    Case("jsonl-list-as-text", jsonl_list_as_text, ("train.jsonl line 3", "column 'text' holds a list"),
         "data.on_bad_record: skip"),
    Case("jsonl-first-line-lacks-key", jsonl_first_line_lacks_key, ("train.jsonl line 1", "no 'text' key"),
         "fix or delete that line"),
    Case("train-is-validation-overlap-refused", overlap_not_allowed,
         ("validation shares 8 of its 8 rows with train", "same file"), "set data.allow_overlap: true"),
    Case("image-folder-link-escapes", folder_link_escapes, ("train/red/passwd.png", "outside the image folder"),
         "copy the file"),
    Case("dpo-chosen-equals-rejected", dpo_chosen_is_rejected, ("train.jsonl line 2", "the same reply"),
         "data.on_bad_record: skip"),
]


# ------------------------------------------------------------------ the invariant

def _snapshot(root: Path, exclude: Path | None) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and (exclude is None or exclude not in p.parents)}


@pytest.fixture(scope="module")
def previous_run(tiny_bert_dir, tmp_path_factory) -> Path:
    """One real completed run, copied next to every case's output directory."""
    tmp = tmp_path_factory.mktemp("previous")
    train = write_text_csv(tmp / "train.csv", n=16)
    run = tuneforge.finetune(text_recipe(tiny_bert_dir, train, tmp / "run", train=FAST_TRAIN))
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "completed"
    return run.path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, tiny_bert_dir, tiny_timm_weights, previous_run, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder, if any, lands in the scratch dir
    env = Env(tmp=tmp_path, bert=tiny_bert_dir, timm=tiny_timm_weights, runs=tmp_path / "runs")
    env.runs.mkdir()
    (env.runs / "unrelated.txt").write_text("someone else's notes\n")
    shutil.copytree(previous_run, env.runs / "previous")
    before = _snapshot(env.runs, exclude=env.out)
    recipe = case.build(env)

    message = None
    if case.cli:
        capsys.readouterr()
        code = main(recipe["argv"])
        err = capsys.readouterr().err
        assert code == 2 and "\nerror: " in "\n" + err and "Traceback" not in err, err
        message = err.split("error: ", 1)[1]
    elif case.ok:
        run = tuneforge.finetune(recipe)
        manifest = json.loads((run.path / "manifest.json").read_text())
        assert manifest["status"] == "completed"
        if case.check:
            case.check(manifest)
    else:
        with pytest.raises(TuneforgeError) as info:
            tuneforge.finetune(recipe)
        message = str(info.value)

    if message is not None:
        for place in case.where:
            assert place in message, f"{place!r} not named in: {message}"
        assert case.fix in message, f"fix {case.fix!r} not in: {message}"

    # Nothing written before was touched ...
    assert _snapshot(env.runs, exclude=env.out) == before
    # ... and a run that did not finish never looks finished (or still running).
    if not case.ok and not case.out_is_previous and env.out.exists():
        status = json.loads((env.out / "manifest.json").read_text())["status"]
        assert status == "failed", status
    assert {p.name for p in env.runs.iterdir()} <= {"unrelated.txt", "previous", "new"}


# ------------------------------------------------------------------ the same rules, one level down

def test_manifest_paths_absolute_allowed_relative_escape_refused_even_when_skipping(tmp_path):
    from tuneforge.data.images import read_image_records

    outside = _png(tmp_path / "outside" / "a.png")
    inside = _png(tmp_path / "data" / "imgs" / "b.png")
    m = tmp_path / "data" / "m.csv"
    m.write_text(f"image,label\n{outside},x\nimgs/../imgs/b.png,y\n")  # absolute: explicit; '..' staying inside
    assert [r.values["image"] for r in read_image_records(m)] == [str(outside.resolve()), str(inside.resolve())]
    m.write_text("image,label\nimgs/b.png,y\n../outside/a.png,x\n")
    with pytest.raises(TuneforgeError, match=r"m\.csv line 3: .*outside the manifest's folder.*absolute path"):
        read_image_records(m, on_bad_record="skip", skipped=[])


def test_ids_in_image_manifests_and_folders(tmp_path):
    from tuneforge.data.images import read_image_records

    _png(tmp_path / "imgs" / "a.png")
    m = tmp_path / "m.jsonl"
    rows = [{"image": "imgs/a.png", "label": "x", "key": k} for k in (7, 8, 7)]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TuneforgeError, match="m.jsonl line 3 repeats id '7' first seen on line 1 — ids in "
                                             "data.id_column"):
        read_image_records(m, id_column="key", hints={"id": "data.id_column"})
    assert [r.values["id"] for r in read_image_records(m, id_column="key", limit=2)] == [7, 8]
    with pytest.raises(TuneforgeError, match="image folder.*remove data.id_column"):
        read_image_records(write_image_folder(tmp_path / "folder", n_per_class=1), id_column="key")
