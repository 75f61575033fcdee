"""`auto`: choose linear-probe, partial, lora or full from the facts of the run.

The facts: labelled training examples (and per class), classes, the model's
parameter count, the device, and the recipe's optional time and memory budgets.
The rules follow the `tuneforge compare` tables in docs/auto-evidence.md; each
rule below names the rows it rests on. The decision, its reasons and the
estimates behind them are printed as one paragraph and recorded in the run
manifest (``strategy_decision``).

Estimates are deliberately simple and stated as such: training time scales
with (examples x epochs x parameters) at the throughput measured in the
evidence runs; memory with the bytes each strategy keeps per parameter plus the
process's fixed cost, also from those runs.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from ..errors import TuneforgeError
from ..recipe import NAME_DOC, StrategyOptions
from .base import register

CANDIDATES = ("linear-probe", "partial", "lora", "full")
EVIDENCE = "docs/auto-evidence.md"

# Seconds per training example per million backbone parameters for `full` on the evidence
# machine (2-core CPU), by modality: MiniLM-L6 (22.7M) and EfficientNet-Lite0 (3.4M, 64 px)
# full fine-tuning throughput in docs/auto-evidence.md. Other strategies relative to full.
CPU_SECONDS_PER_SAMPLE_PER_MPARAM = {"text": 1 / (140 * 22.7), "image": 1 / (80 * 3.4)}
RELATIVE_COST = {"full": 1.0, "lora": 1.0, "partial": 0.5, "linear-probe": 0.35}
# No GPU was lent for the evidence runs: a GPU is assumed this many times faster than the
# 2-core CPU (a conservative figure for small models, where launch overheads dominate).
GPU_SPEEDUP = 10.0
# Peak process memory: fixed cost (Python, torch, the loaders) plus bytes per parameter
# (fp32 weights 4; full adds gradient + two AdamW moments = 16; frozen strategies keep
# ~weights only, and activations scale with the model too).
FIXED_MB = {"text": 900.0, "image": 700.0}
BYTES_PER_PARAM = {"full": 20.0, "lora": 12.0, "partial": 10.0, "linear-probe": 6.0}

# Examples per class below which fine-tuning the backbone did not pay (see EVIDENCE), and
# above which full fine-tuning was clearly best.
FEW_PER_CLASS = 60
MANY_PER_CLASS = 2000
LARGE_MODEL = 300e6  # parameters; beyond this on a CPU, full fine-tuning is not a practical default


class AutoOptions(StrategyOptions):
    """Chooses linear-probe, partial, lora or full from the number of labelled examples (per class), the number of classes, the model's size, the device and the optional budgets below; prints the decision with its reasons and records it in the run manifest. Rules: docs/auto-evidence.md."""

    name: str = Field("auto", description=NAME_DOC)
    time_budget_s: Optional[float] = Field(None, gt=0, description="Training-time budget in seconds; strategies estimated to take longer are ruled out.")
    memory_budget_mb: Optional[float] = Field(None, gt=0, description="Peak-memory budget in MB (process memory on CPU, GPU memory on a GPU); strategies estimated to need more are ruled out.")
    candidates: list[str] = Field(list(CANDIDATES), description="Strategies auto may choose from (a subset of linear-probe, partial, lora, full).")


def estimate_seconds(strategy: str, facts: dict) -> float:
    train = facts.get("train", {})
    examples = facts["train_examples"] * float(train.get("epochs", 1))
    if train.get("max_steps"):
        examples = min(examples, train["max_steps"] * train.get("batch_size", 32) * train.get("grad_accum", 1))
    per = CPU_SECONDS_PER_SAMPLE_PER_MPARAM.get(facts.get("modality", "text"), CPU_SECONDS_PER_SAMPLE_PER_MPARAM["text"])
    seconds = examples * per * facts["parameters"] / 1e6 * RELATIVE_COST[strategy]
    return seconds / (GPU_SPEEDUP if str(facts.get("device", "cpu")).startswith("cuda") else 1.0)


def estimate_memory_mb(strategy: str, facts: dict) -> float:
    fixed = FIXED_MB.get(facts.get("modality", "text"), FIXED_MB["text"])
    if str(facts.get("device", "cpu")).startswith("cuda"):
        fixed = 300.0  # CUDA context and allocator slack, not the host process
    return fixed + facts["parameters"] * BYTES_PER_PARAM[strategy] / 2**20


def preference(facts: dict) -> tuple[list[str], str]:
    """Strategies in order of expected quality for this data size and model, and why."""
    n, c, params = facts["train_examples"], max(1, facts["classes"]), facts["parameters"]
    per_class = n / c
    on_cpu = not str(facts.get("device", "cpu")).startswith("cuda")
    if per_class < FEW_PER_CLASS:
        return (["linear-probe", "partial", "lora", "full"],
                f"with about {per_class:.0f} examples per class (< {FEW_PER_CLASS}) fine-tuning the backbone "
                "did not beat a linear probe in the evidence runs, and a frozen backbone cannot overfit it")
    if on_cpu and params > LARGE_MODEL:
        return (["lora", "partial", "linear-probe", "full"],
                f"a {params / 1e6:.0f}M-parameter model on a CPU is too slow and memory-hungry to fine-tune in full; "
                "LoRA trains a small fraction of it at close to full quality")
    if per_class < MANY_PER_CLASS:
        return (["full", "lora", "partial", "linear-probe"],
                f"with {per_class:.0f} examples per class ({FEW_PER_CLASS}-{MANY_PER_CLASS}) full fine-tuning "
                "gave the best validation accuracy in the evidence runs")
    return (["full", "lora", "partial", "linear-probe"],
            f"with {per_class:.0f} examples per class (>= {MANY_PER_CLASS}) full fine-tuning was clearly best")


def decide(options: AutoOptions, facts: dict) -> dict:
    """The chosen strategy, the reasons (a list and one paragraph) and the estimates."""
    from . import options_class

    unknown = [c for c in options.candidates if c not in CANDIDATES]
    if unknown or not options.candidates:
        raise TuneforgeError(f"strategy.candidates {options.candidates}: auto chooses among {', '.join(CANDIDATES)}; "
                             "list one or more of those (or name a strategy directly in strategy.name)")
    order, why = preference(facts)
    order = [s for s in order if s in options.candidates]
    est = {s: {"seconds": round(estimate_seconds(s, facts), 1), "memory_mb": round(estimate_memory_mb(s, facts))}
           for s in order}
    ruled_out = {}
    for s in order:
        if options.time_budget_s and est[s]["seconds"] > options.time_budget_s:
            ruled_out[s] = f"estimated {est[s]['seconds']:.0f} s > time budget {options.time_budget_s:g} s"
        elif options.memory_budget_mb and est[s]["memory_mb"] > options.memory_budget_mb:
            ruled_out[s] = f"estimated {est[s]['memory_mb']:.0f} MB > memory budget {options.memory_budget_mb:g} MB"
    fitting = [s for s in order if s not in ruled_out]
    if fitting:
        chosen = fitting[0]
    else:  # nothing fits: the cheapest, and say so
        chosen = min(order, key=lambda s: (est[s]["memory_mb"], est[s]["seconds"]))
    reasons = [f"{facts['train_examples']:,} labelled training examples in {facts['classes']} classes",
               f"a {facts['parameters'] / 1e6:.1f}M-parameter {facts.get('modality', '')} model on {facts.get('device')}",
               why]
    reasons += [f"{s} ruled out: {r}" for s, r in ruled_out.items()]
    if not fitting:
        reasons.append(f"no candidate fits the budgets, so the cheapest ({chosen}) was taken")
    paragraph = (
        f"chose {chosen}. The run has {reasons[0]}, and {reasons[1]}; {why}. "
        + (f"Budgets: " + "; ".join(f"{s} {r}" for s, r in ruled_out.items()) + ". " if ruled_out else "")
        + ("No candidate fits the budgets, so the cheapest was taken. " if not fitting else "")
        + f"Estimates for {chosen}: about {est[chosen]['seconds']:.0f} s of training and "
        f"{est[chosen]['memory_mb']:.0f} MB peak (from the throughput and memory in {EVIDENCE}). "
        f"Order considered: {', '.join(order)}. Set strategy.name to override.")
    return {"chosen": chosen, "options": options_class(chosen)(name=chosen), "reasons": reasons,
            "paragraph": paragraph, "facts": {k: v for k, v in facts.items() if k != "train"},
            "estimates": est, "ruled_out": ruled_out, "evidence": EVIDENCE}


@register("auto", AutoOptions)
class Auto:
    """Never trains itself: the pipeline calls ``decide`` and uses the chosen strategy."""

    def __init__(self, options: AutoOptions):
        self.options = options

    def decide(self, facts: dict) -> dict:
        return decide(self.options, facts)

    def apply(self, model, info):  # pragma: no cover - the pipeline always decides first
        raise TuneforgeError("strategy auto must decide before it is applied (use tuneforge.finetune)")

    def set_train_mode(self, model) -> None:  # pragma: no cover
        model.train()
