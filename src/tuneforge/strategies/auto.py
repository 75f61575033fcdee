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
from .options import NAME_DOC, StrategyOptions
from .base import register

CANDIDATES = ("linear-probe", "partial", "lora", "full")
EVIDENCE = "docs/auto-evidence.md"

# --- estimates (docs/auto-evidence.md, "Estimates") -------------------------------------------
# Seconds per training example per million parameters for `full` on the evidence machine
# (2-core CPU, quiet): MiniLM-L6 (22.7M) 140.9 samples/s and EfficientNet-Lite0 (3.4M, 64 px)
# 85.5 images/s, PERFORMANCE.md. Other strategies relative to full, from the samples/s of the
# sst2-1000 and digits-500 compare rows (same conditions within a set).
CPU_SECONDS_PER_SAMPLE_PER_MPARAM = {"text": 1 / (140.9 * 22.7), "image": 1 / (85.5 * 3.4)}
RELATIVE_COST = {"full": 1.0, "lora": 1.2, "partial": 0.65, "linear-probe": 0.25}
# No GPU was lent for the evidence runs: a GPU is *assumed* this many times faster than the
# 2-core CPU (conservative for small models, where launch overheads dominate).
GPU_SPEEDUP = 10.0
# Peak memory = fixed cost + bytes per parameter: the largest of each strategy's compare rows
# (sst2-10000 for text), so a budget errs on the safe side. LoRA measured *more* than full on
# these small models (peft keeps the base layer's activations and its own dropout copies);
# activations do not grow with the parameter count, so for large models this overestimates it.
FIXED_MB = {"text": 950.0, "image": 950.0}
BYTES_PER_PARAM = {"full": 52.0, "lora": 74.0, "partial": 27.0, "linear-probe": 6.0}

# --- rules (each cites its rows in docs/auto-evidence.md) ----------------------------------------
# Text encoders: below this many examples per class, `partial` matched or beat `full`
# (sst2-100: 0.762 vs 0.766; sst2-1000: 0.794 vs 0.778) at about twice its speed and a 6x
# smaller trained delta; at 5,000 per class (sst2-10000) full was the best of the four, though
# by little (0.852 vs partial 0.848, lora 0.844, linear-probe 0.808).
TEXT_MANY_PER_CLASS = 5000
# Image CNNs (BatchNorm): full fine-tuning needs optimizer steps. Below this many planned steps
# it lost to `partial` in every digits set (12/16/45 steps: full 0.32/0.35/0.90 vs partial
# 0.63/0.71/0.93; the linear probe 0.59/0.78/0.85), while 135 steps of full reached 0.99
# (PERFORMANCE.md image table). LoRA on 1x1 convolutions was the worst image strategy throughout.
IMAGE_FULL_MIN_STEPS = 135
# Parameters beyond which full fine-tuning on a CPU is ruled out by arithmetic rather than by a
# measured row: weights, gradients and two AdamW moments alone are 16 bytes per parameter
# (~5 GB at 300M) before activations, against LoRA's ~4, and hours per epoch.
LARGE_MODEL = 300e6


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
    """Strategies in order of expected quality for this data, model and device, and why."""
    n, c, params = facts["train_examples"], max(1, facts["classes"]), facts["parameters"]
    per_class = n / c
    steps = planned_steps(facts)
    on_cpu = not str(facts.get("device", "cpu")).startswith("cuda")
    if on_cpu and params > LARGE_MODEL:
        return (["lora", "partial", "linear-probe", "full"],
                f"a {params / 1e6:.0f}M-parameter model on a CPU is too slow and memory-hungry to fine-tune in "
                f"full (weights, gradients and AdamW state alone are about {16 * params / 2**30:.0f} GB), and LoRA "
                "trains a small fraction of it")
    if facts.get("modality") == "image":
        if steps < IMAGE_FULL_MIN_STEPS:
            return (["partial", "linear-probe", "full", "lora"],
                    f"about {steps} optimizer steps are too few to fine-tune a whole image backbone "
                    f"(< {IMAGE_FULL_MIN_STEPS}), and training its top layer groups was the best or second-best "
                    "strategy in every short digits run (digits-100/500/1437 rows)")
        return (["full", "partial", "linear-probe", "lora"],
                f"{steps} optimizer steps (>= {IMAGE_FULL_MIN_STEPS}) are enough for full fine-tuning of an image "
                "backbone, which reached 0.99 on digits (PERFORMANCE.md)")
    if per_class < TEXT_MANY_PER_CLASS:
        return (["partial", "full", "lora", "linear-probe"],
                f"with {per_class:.0f} examples per class (< {TEXT_MANY_PER_CLASS}) training the top layer groups "
                "matched full fine-tuning on SST-2 (sst2-100, sst2-1000 rows) at about half its cost")
    return (["full", "lora", "partial", "linear-probe"],
            f"with {per_class:.0f} examples per class (>= {TEXT_MANY_PER_CLASS}) full fine-tuning was the best "
            "strategy on SST-2 (sst2-10000 rows)")


def planned_steps(facts: dict) -> int:
    train = facts.get("train", {})
    per_step = train.get("batch_size", 32) * train.get("grad_accum", 1)
    steps = int(-(-facts["train_examples"] // per_step) * float(train.get("epochs", 1)))
    return min(steps, train["max_steps"]) if train.get("max_steps") else steps


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
            "paragraph": paragraph,
            "facts": {**{k: v for k, v in facts.items() if k != "train"}, "planned_steps": planned_steps(facts)},
            "estimates": est, "ruled_out": ruled_out, "evidence": EVIDENCE}


@register("auto", AutoOptions)
class Auto:
    """Never trains itself: the run calls ``decide`` and uses the chosen strategy."""

    chooses = True
    needs_task_head = True  # it chooses among classifier strategies
    frozen_scope = "none"
    adds_virtual_tokens = mergeable = plain_export = shares_base = quantized_base = False
    saved_layout = "plain"
    max_text_tokens = None
    frozen: list = []
    adapted: list = []

    def __init__(self, options: AutoOptions):
        self.options = options

    def decide(self, facts: dict) -> dict:
        return decide(self.options, facts)

    def apply(self, model, info):  # pragma: no cover - the pipeline always decides first
        raise TuneforgeError("strategy auto must decide before it is applied (use tuneforge.finetune)")

    def set_train_mode(self, model) -> None:  # pragma: no cover
        model.train()
