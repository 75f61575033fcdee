"""The report's figures, drawn with matplotlib's Agg backend (no display needed).

Each function takes plain data read from the run directory and returns PNG bytes,
or None when there is nothing to draw (e.g. no learning-rate events).
"""

from __future__ import annotations

import io

_DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)  # never a GUI backend: reports are written on headless machines
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    return buf.getvalue()


def curves(train: list[dict], evals: list[dict], metric: str) -> bytes | None:
    """Training and validation loss (left), validation metrics (right) against the step."""
    if not train and not evals:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    pts = [(e["step"], e["loss"]) for e in train if e.get("loss") is not None]
    if pts:
        ax1.plot(*zip(*pts), label="train loss", color="#1f77b4")
    val = [(e["step"], e["loss"]) for e in evals if e.get("loss") is not None]  # grpo evaluates rewards, no loss
    if val:
        ax1.plot(*zip(*val), "o-", label="validation loss", color="#d62728")
    ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    shown = [m for m in dict.fromkeys([metric, "accuracy", "f1_macro"]) if m != "loss" and evals and m in evals[0]]
    for m in shown:
        pts = [(e["step"], e[m]) for e in evals if e.get(m) is not None]
        if pts:
            ax2.plot(*zip(*pts), "o-", label=m + (" (selects best)" if m == metric else ""))
    ax2.set_xlabel("step"), ax2.set_ylabel("validation metric"), ax2.grid(alpha=0.3)
    if shown:
        ax2.legend()
    return _png(fig)


def lr_lines(train: list[dict], schedule: dict | None = None) -> dict[str, dict]:
    """Per parameter group: ``{"curve": (steps, lrs) or None, "logged": (steps, lrs)}``. The
    curve is the schedule of every step (``manifest.json`` ``lr_schedule``: warmup included,
    however rarely the run logged); the logged points are ``metrics.jsonl``'s. A group
    ``X.no_decay`` at the same rates as ``X`` is drawn once, as ``X``."""
    events = [e for e in train if isinstance(e.get("lr"), dict)]
    base = (schedule or {}).get("base_lr") or {}
    names = list(dict.fromkeys([*base, *(k for e in events for k in e["lr"])]))
    lines = {}
    for group in names:
        parent = group.removesuffix(".no_decay")
        if parent != group and parent in names and base.get(parent) == base.get(group):
            continue
        curve = None
        if group in base and schedule.get("step"):
            curve = (schedule["step"], [base[group] * m for m in schedule["multiplier"]])
        logged = [(e["step"], e["lr"][group]) for e in events if group in e["lr"]]
        lines[group] = {"curve": curve, "logged": tuple(zip(*logged)) if logged else None}
    return {k: v for k, v in lines.items() if v["curve"] or v["logged"]}


def learning_rates(train: list[dict], schedule: dict | None = None) -> bytes | None:
    """One line per optimizer parameter group: the schedule of every step, the logged steps as dots."""
    lines = lr_lines(train, schedule)
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for group, line in lines.items():
        if line["curve"]:
            (drawn,) = ax.plot(*line["curve"], "-", label=str(group))
            if line["logged"]:
                ax.plot(*line["logged"], ".", color=drawn.get_color())
        else:  # a run from before the schedule was recorded: its logged steps only
            ax.plot(*line["logged"], ".-", label=str(group))
    ax.set_xlabel("step"), ax.set_ylabel("learning rate"), ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _png(fig)


def confusion(matrix: list[list[int]], names: list[str]) -> bytes | None:
    if not matrix:
        return None
    import numpy as np

    plt = _plt()
    m = np.asarray(matrix)
    n = len(m)
    size = min(3 + 0.45 * n, 14)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = range(n)
    ax.set_xticks(ticks, [str(x)[:16] for x in names], rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(ticks, [str(x)[:16] for x in names])
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    if n <= 30:  # counts stay readable up to about 30 classes
        top = m.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > top / 2 else "black")
    return _png(fig)


def calibration(bins: list[dict], ece: float | None) -> bytes | None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with counts below."""
    if not bins or not sum(b["count"] for b in bins):
        return None
    plt = _plt()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"]
    filled = [b["count"] > 0 for b in bins]
    ax.bar([c for c, f in zip(centres, filled) if f], [b["accuracy"] for b in bins if b["count"]], width=width * 0.95,
           edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar([c for c, f in zip(centres, filled) if f],
           [b["confidence"] - b["accuracy"] for b in bins if b["count"]], bottom=[b["accuracy"] for b in bins if b["count"]],
           width=width * 0.95, color="#dd8452", alpha=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy"), ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"reliability (ECE {ece:.4f})" if ece is not None else "reliability")
    axc.bar(centres, [b["count"] for b in bins], width=width * 0.95, color="grey")
    axc.set_xlabel("confidence"), axc.set_ylabel("examples")
    return _png(fig)


def forgetting(history: list[dict], before: dict | None) -> bytes | None:
    """Retain figures against the step: similarity to the starting backbone, and the earlier task's accuracy."""
    if not history:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    steps = [h["step"] for h in history]
    for key, label in (("retain_cka", "linear CKA"), ("retain_cosine", "mean cosine"),
                       ("retain_accuracy", "earlier task's accuracy")):
        if key in history[0]:
            ax.plot(steps, [h[key] for h in history], "o-", label=label)
    if before and "accuracy" in before:
        ax.axhline(before["accuracy"], color="grey", ls="--", lw=1, label="its accuracy before")
    ax.set_xlabel("step"), ax.set_ylabel("retained"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    return _png(fig)


def speed(train: list[dict]) -> bytes | None:
    """Throughput and peak memory over the run, from the training log lines."""
    pts = [e for e in train if e.get("samples_per_s") is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([e["step"] for e in pts], [e["samples_per_s"] for e in pts], ".-", color="#2ca02c")
    ax.set_xlabel("step"), ax.set_ylabel("samples/s", color="#2ca02c"), ax.grid(alpha=0.3)
    mem_key = next((k for k in ("peak_gpu_mb", "peak_cuda_mb", "peak_rss_mb") if k in pts[-1]), None)
    if mem_key:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in pts], [e.get(mem_key) for e in pts], ".--", color="#9467bd")
        ax2.set_ylabel(mem_key.replace("_", " "), color="#9467bd")
    return _png(fig)


def compare_curves(runs: dict[str, tuple[list[dict], list[dict]]], metric: str) -> bytes | None:
    """Several runs overlaid: train loss and the validation metric against the step."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, (train, evals) in runs.items():
        pts = [(e["step"], e["loss"]) for e in train if e.get("loss") is not None]
        if pts:
            ax1.plot(*zip(*pts), label=name)
        pts = [(e["step"], e[metric]) for e in evals if e.get(metric) is not None]
        if pts:
            ax2.plot(*zip(*pts), "o-", label=name)
    ax1.set_xlabel("step"), ax1.set_ylabel("train loss"), ax1.grid(alpha=0.3), ax1.legend(fontsize=8)
    ax2.set_xlabel("step"), ax2.set_ylabel(f"validation {metric}"), ax2.grid(alpha=0.3), ax2.legend(fontsize=8)
    return _png(fig)


def thumbnail(path: str, size: int = 96) -> bytes | None:
    """A small PNG of an image file, or None if it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except Exception:  # a moved or unreadable file only loses its thumbnail
        return None
