"""`report.html`: one self-contained page per run (and a side-by-side page for several).

Everything comes from the run directory (config.yaml, manifest.json, metrics.jsonl,
eval.json), so `tuneforge report RUN_DIR` can redraw it any time. The page opens
offline: inline CSS, no scripts, no fonts, every image a base64 PNG; the same
figures are written as PNG files in ``<run>/report/``.

A report replaces only a report: the pages carry a generator tag, an existing file without
it is never overwritten, and nothing is written inside a run directory except that run's
own ``report.html`` and ``report/`` (a comparison page goes outside every run).
"""

from __future__ import annotations

import base64
import html
import json
import os
from datetime import datetime
from pathlib import Path

from ..errors import TuneforgeError
from . import figures

GENERATOR = "<meta name='generator' content='tuneforge'>"  # how a report is told from any other file

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;
padding:.25em .6em;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em;max-height:40em}.warn{color:#a40}
.muted{color:#777}details{margin:.5em 0}
"""


# --------------------------------------------------------------------------- reading a run

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TuneforgeError(f"{path} is damaged ({type(err).__name__}: {str(err)[:120]}); restore it from a copy of "
                             "the run (the report reads it)") from None
    if not isinstance(data, dict):
        raise TuneforgeError(f"{path} is damaged (not a JSON object); restore it from a copy of the run")
    return data


def read_run(run_dir: Path) -> dict:
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise TuneforgeError(f"{run_dir} is not a tuneforge run directory (no manifest.json)")
    manifest = _read_json(run_dir / "manifest.json")
    events = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the rest still draws
    final = _read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else {}
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise TuneforgeError(f"{run_dir / 'config.yaml'} is damaged ({type(err).__name__}); restore it from a copy "
                             "of the run") from None
    return {"path": run_dir, "manifest": manifest, "config": config,
            "final": final, "train": [e for e in events if e.get("event") == "train"],
            "evals": [e for e in events if e.get("event") == "eval"]}


# --------------------------------------------------------------------------- html helpers

def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return "—" if v is None else _e(v)


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {round(s % 60):02d} s"
    return f"{int(s // 3600)} h {round(s % 3600 / 60):02d} min"


def figure_text(key: str, value) -> str:
    """A throughput or timing figure as a person reads it: ``matmul_peak_flops 45599742341.97``
    -> ``45.6 GFLOP/s``, ``train_s 94.31`` -> ``1 min 34 s``, ``peak_rss_mb 1028.4`` -> ``1,028 MB``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _fmt(value)
    if key.endswith("peak_flops"):
        return _si(value, "FLOP/s")
    if key.startswith("train_flops_per_"):
        return _si(value, "FLOP") + f" per {key.removeprefix('train_flops_per_')}"
    if key.endswith("_per_s"):
        return f"{value:,.1f} {key.removesuffix('_per_s')}/s"
    if key.endswith("_s"):
        return _seconds(value)
    if key.endswith("_mb"):
        return f"{value:,.0f} MB"
    if key in ("mfu", "padding_fraction"):
        return f"{100 * value:.3g}%"
    return _fmt(value)


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    th = "".join(f"<th class='l'>{_e(h)}</th>" if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='l'>{_fmt(c) if not isinstance(c, str) else _e(c)}</td>" if i < left
                                    else f"<td>{_fmt(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _page(title: str, sections: list[tuple[str, str, str]]) -> str:
    body = "".join(f"<section id='{sid}'><h2>{_e(name)}</h2>{content}</section>" for sid, name, content in sections)
    stamp = datetime.now().isoformat(timespec="seconds")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{GENERATOR}<title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class='muted'>written by tuneforge at {stamp}</p>{body}</body></html>")


def is_report(path: Path) -> bool:
    """Whether ``path`` is a page tuneforge wrote (the generator tag; older pages: their byline)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return head.startswith("<!DOCTYPE html>") and (GENERATOR in head or "written by tuneforge at" in head)


def _enclosing_run(path: Path) -> Path | None:
    here = Path(os.path.realpath(path))
    for directory in (here, *here.parents):
        if (directory / "manifest.json").is_file():
            return directory
    return None


def check_page_target(out: Path) -> None:
    """Refuse a comparison page that would replace a file that is not a report, or land in a run."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise TuneforgeError(f"--out {out}: a report is an HTML page; give a name ending in .html, "
                             f"e.g. --out {out.with_suffix('.html').name}")
    run = _enclosing_run(out.parent)
    if run is not None:
        raise TuneforgeError(f"--out {out} lies inside the run {run}; a comparison page goes outside every run "
                             "(`tuneforge report RUN` alone rewrites that run's own report.html) — e.g. --out "
                             "comparison.html")
    if out.is_dir() or (out.exists() and not is_report(out)):
        raise TuneforgeError(f"{out} exists and is not a tuneforge report; it was left as it is — choose another --out")
    figure = out.with_suffix(".png")
    if figure.exists() and not out.exists():
        raise TuneforgeError(f"{figure} exists and the comparison's figure would replace it; choose another --out")


def _write_page(path: Path, page: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _metrics_table(final: dict) -> str:
    splits = [s for s in ("validation", "test") if s in final]
    if not splits:
        return "<p class='warn'>no final evaluation (the run did not complete)</p>"
    keys = [k for k, v in final[splits[0]].items() if isinstance(v, (int, float)) or (v is None and k == "roc_auc")]
    columns = {s: final[s] for s in splits}
    if "before" in final:  # train.eval_before: the starting weights (step 0) beside the best ones
        columns = {"validation before (step 0)": final["before"], **columns}
    rows = [[k] + [c.get(k) for c in columns.values()] for k in keys if k not in ("eval_seconds",)]
    best = f"<p>best step {final.get('best_step')} by <b>{_e(final.get('metric_for_best'))}</b></p>"
    return best + _table(["metric", *columns], rows) + _generation_table(final.get("generation") or {})


def _generation_table(gen: dict) -> str:
    """causal-lm: generation scores on held-out prompts, after training and (train.eval_before) before it,
    overall and per group (task.generation.group_by)."""
    if not gen.get("greedy"):
        return ""
    parts = [("all", gen, gen.get("before") or {})]
    parts += [(name, g, ((gen.get("before") or {}).get("groups") or {}).get(name) or {})
              for name, g in (gen.get("groups") or {}).items()]
    rows = []
    for name, after, before in parts:
        for mode in ("greedy", "sampled"):
            for k, v in (after.get(mode) or {}).items():
                rows.append([name, after.get("prompts"), mode, k, (before.get(mode) or {}).get(k), v])
    return (f"<p>generation on held-out prompts (samples in generations.jsonl)</p>"
            + _table(["prompts of", "n", "decoding", "score", "before", "after"], rows))


def _wrong_examples(items: list[dict]) -> tuple[str, bytes | None]:
    if not items:
        return "<p>no wrong predictions on the validation split</p>", None
    rows, thumbs = [], []
    for it in items:
        shown = _e(it.get("text", ""))
        if it.get("image"):
            png = figures.thumbnail(it["image"])
            if png:
                thumbs.append((png, it))
                shown = _img(png, it.get("where", "image")) + f"<br><span class='muted'>{_e(Path(it['image']).name)}</span>"
        truth = it["label"] if "truth" not in it else f"{it['label']} = {it['truth']}"
        guess = it["predicted"] if "truth" not in it else f"{it['label']} = {it['predicted']}"
        rows.append(f"<tr><td class='l'>{shown}</td><td class='l'>{_e(truth)}</td><td class='l'>{_e(guess)}</td>"
                    f"<td>{it['confidence']:.4f}</td><td class='l muted'>{_e(it.get('where', it['index']))}</td></tr>")
    table = ("<table><tr><th class='l'>example</th><th class='l'>true</th><th class='l'>predicted</th>"
             "<th>confidence</th><th class='l'>where</th></tr>" + "".join(rows) + "</table>")
    grid = _thumb_grid([t[0] for t in thumbs]) if thumbs else None
    return table, grid


def _thumb_grid(pngs: list[bytes]) -> bytes | None:
    try:
        import io

        from PIL import Image

        ims = [Image.open(io.BytesIO(p)) for p in pngs]
        cols = min(len(ims), 8)
        rows = (len(ims) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * 100, rows * 100), "white")
        for i, im in enumerate(ims):
            sheet.paste(im, ((i % cols) * 100 + 2, (i // cols) * 100 + 2))
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        return buf.getvalue()
    except Exception:
        return None


def _forgetting(f: dict, fig) -> str:
    keys = [k for k in ("retain_cka", "retain_cosine", "retain_accuracy", "retain_accuracy_drop", "forgetting")
            if f.get("history") and k in f["history"][0]]
    best = f.get("at_best") or {}
    budget = (f"; budget retain.max_drop {f['max_drop']} {'met' if f.get('budget_met') else 'NOT met'}"
              if f.get("max_drop") is not None else "")
    return (f"<p>{_e(f.get('measure'))} on {f.get('examples')} examples; at the best step "
            f"{best.get('step')}: forgetting {_fmt(best.get('forgetting'))}{_e(budget)}</p>"
            + fig("forgetting", "forgetting", "")
            + _table(["step", *keys], [[h["step"], *[h.get(k) for k in keys]] for h in f.get("history", [])]))


def _parameters(params: dict) -> str:
    """The counts, one row per module group, and every module under a collapsed <details>."""
    total, trainable = params.get("total", 0), params.get("trainable", 0)

    def rows(items: list[dict], key: str) -> list[list]:
        return [[r[key], f"{r['params']:,}", f"{r['trainable']:,}",
                 f"{100 * r['trainable'] / r['params']:.3g}%" if r["params"] else "—"] for r in items]

    text = (f"<p>trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
            + (f"; adapter parameters {params['adapter_params']:,}" if params.get("adapter_params") else "") + "</p>")
    header = ["parameters", "trainable", "share trained"]
    if params.get("groups"):
        text += _table(["module group", *header], rows(params["groups"], "group"))
    modules = params.get("modules", [])
    if modules:  # runs from before the groups: the detail was their only table
        text += (f"<details><summary>every module ({len(modules)})</summary>"
                 + _table(["module", *header], rows(modules, "module")) + "</details>")
    return text


def _pre(data) -> str:
    text = data if isinstance(data, str) else json.dumps(data, indent=2, default=str)
    return f"<pre>{_e(text)}</pre>"


# --------------------------------------------------------------------------- one run

def write_report(run_dir, status: str | None = None) -> Path:
    """Write ``<run>/report.html`` and ``<run>/report/*.png``; return the HTML path. ``status``:
    what to show instead of the manifest's (a killed run's "interrupted (process gone)")."""
    import yaml

    run = read_run(Path(run_dir))
    path = run["path"] / "report.html"
    if path.is_dir() or (path.exists() and not is_report(path)):
        raise TuneforgeError(f"{path} exists and is not a tuneforge report; it was left as it is — move it away "
                             "and run `tuneforge report` again")
    m, final, cfg = run["manifest"], run["final"], run["config"]
    val = final.get("validation", {})
    metric = final.get("metric_for_best") or cfg.get("train", {}).get("metric_for_best", "accuracy")
    names = final.get("labels", [])
    pngs = {
        "curves": figures.curves(run["train"], run["evals"], metric),
        "learning_rates": figures.learning_rates(run["train"], run["manifest"].get("lr_schedule")),
        "confusion_matrix": figures.confusion(val.get("confusion_matrix"), names),
        "calibration": figures.calibration(val.get("calibration"), val.get("ece")),
        "throughput_memory": figures.speed(run["train"]),
    }
    forgot = final.get("forgetting")
    if forgot:
        pngs["forgetting"] = figures.forgetting(forgot.get("history", []), forgot.get("before"))
    wrong_html, wrong_png = _wrong_examples(val.get("confidently_wrong", []))
    pngs["confidently_wrong"] = wrong_png
    out_dir = run["path"] / "report"
    out_dir.mkdir(exist_ok=True)
    for name, png in pngs.items():
        if png:
            (out_dir / f"{name}.png").write_bytes(png)

    def fig(name, alt, missing):
        return _img(pngs[name], alt) if pngs.get(name) else f"<p class='muted'>{_e(missing)}</p>"

    params = m.get("parameters") or {}
    per_class = val.get("per_class", [])
    repro = m.get("reproducibility", {})
    timings = m.get("timings", {})
    status = status or m.get("status", "?")
    sections = [
        ("summary", "Summary", f"<p>status <b>{_e(status)}</b>; model <b>{_e(cfg.get('model', {}).get('name'))}</b>, "
         f"strategy <b>{_e(cfg.get('strategy', {}).get('name'))}</b>, {m.get('steps', '?')} steps, precision "
         f"{_e(m.get('precision'))}, device {_e(m.get('environment', {}).get('device'))}</p>" + _metrics_table(final)),
        ("curves", "Loss and metric curves", fig("curves", "loss and metric curves", "no training events logged")),
        ("learning-rates", "Learning rate per parameter group",
         fig("learning_rates", "learning rates", "no learning-rate events logged")),
        ("confusion-matrix", "Confusion matrix (validation)",
         fig("confusion_matrix", "confusion matrix", "no confusion matrix (multi-label task, or no evaluation)")),
        ("per-class", "Per-class metrics (validation)", _table(
            ["label", "precision", "recall", "f1", "support"],
            [[r["label"], r["precision"], r["recall"], r["f1"], r["support"]] for r in per_class])
         if per_class else "<p class='muted'>no per-class metrics</p>"),
        ("calibration", "Calibration (validation)", fig("calibration", "reliability diagram", "no calibration data")),
        ("confidently-wrong", "Most confidently wrong validation examples", wrong_html),
        *([("forgetting", "Forgetting (retain data)", _forgetting(forgot, fig))] if forgot else []),
        ("parameters", "Trainable parameters", _parameters(params) if params else "<p class='muted'>not recorded</p>"),
        ("throughput", "Throughput and memory", fig("throughput_memory", "throughput", "no speed figures logged")
         + _table(["figure", "value"], [[k, figure_text(k, v)] for k, v in timings.items()])),
        ("reproducibility", "What may not reproduce, and why", (
            "<ul>" + "".join(f"<li><b>{_e(c['what'])}</b>: {_e(c['why'])}</li>"
                             for c in repro.get("may_not_reproduce", [])) + "</ul>")
         if repro.get("may_not_reproduce") else "<p>nothing known: fp32, deterministic, single-threaded</p>"),
        ("recipe", "Resolved recipe", _pre(yaml.safe_dump(cfg, sort_keys=False))),
        ("manifest", "Manifest", "<details><summary>manifest.json</summary>"
         + _pre({k: v for k, v in m.items() if k != "reproducibility"})
         + "</details><details><summary>reproducibility record (package lock, environment, hashes)</summary>"
         + _pre(repro) + "</details>"),
    ]
    _write_page(path, _page(f"tuneforge run {run['path'].name}", sections))
    return path


# --------------------------------------------------------------------------- several runs

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_comparison(run_dirs: list, out: str | Path) -> Path:
    """Runs side by side: final metrics, the recipe keys that differ, timings, overlaid curves."""
    check_page_target(Path(out))
    runs = [read_run(Path(d)) for d in run_dirs]
    names = [r["path"].name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r["path"]) for r in runs]
    metric = runs[0]["final"].get("metric_for_best") or "accuracy"
    sections = []
    for split in ("validation", "test"):
        have = [r["final"].get(split, {}) for r in runs]
        keys = list(dict.fromkeys(k for h in have for k, v in h.items()
                                  if isinstance(v, (int, float)) and k != "eval_seconds"))
        if keys:
            sections.append((f"metrics-{split}", f"Final {split} metrics",
                             _table(["metric", *names], [[k] + [h.get(k) for h in have] for k in keys])))
    flat = [_flatten(r["config"]) for r in runs]
    keys = sorted({k for f in flat for k in f if k != "output.dir"})
    differ = [[k] + [json.dumps(f.get(k)) for f in flat] for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    sections.append(("recipe-differences", "Recipe differences",
                     _table(["key", *names], differ, left=len(names) + 1) if differ else "<p>identical recipes</p>"))
    timing_keys = list(dict.fromkeys(k for r in runs for k in r["manifest"].get("timings", {})))
    sections.append(("timings", "Timings and throughput",
                     _table(["figure", *names], [[k] + [r["manifest"].get("timings", {}).get(k) for r in runs]
                                                 for k in timing_keys])))
    png = figures.compare_curves({n: (r["train"], r["evals"]) for n, r in zip(names, runs)}, metric)
    sections.append(("curves", f"Training loss and validation {metric}", _img(png, "curves") if png else ""))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_page(out, _page(f"tuneforge: {len(runs)} runs compared", sections))
    if png:
        out.with_suffix(".png").write_bytes(png)
    return out
