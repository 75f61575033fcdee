"""SFT -> DPO / SimPO on real weights (SmolLM2-135M-Instruct): the data and the figures of
docs/preference.md ("On real weights").

    # 1. the data: ShareGPT pairs -> prompt/chosen/rejected JSONL, the last 50 pairs held out;
    #    alpaca rows, the last 100 held out (written into OUT, never into the project)
    python benchmarks/preference_smollm2.py prepare --dpo ../shared/data/instruct/dpo_en_demo.json \\
        --alpaca ../shared/data/instruct/alpaca_en_demo.json --out /tmp/pref --held-pairs 24 \\
        --tokenizer /work/models/smollm2-135m-hf --max-prompt-tokens 112
    # 2. the runs (tuneforge train; commands in docs/preference.md)
    # 3. the figures: held-out NLL per reply token of alpaca replies and of the chosen replies, for
    #    the base model and every run, beside each preference run's eval.json and its reference's scores
    python benchmarks/preference_smollm2.py measure --base /work/models/smollm2-135m-hf --alpaca-heldout \\
        /tmp/pref/alpaca-heldout.json --runs /tmp/pref/sft /tmp/pref/dpo /tmp/pref/simpo

The NLL here is computed independently of the task code: the tokenizer's own chat template
(``apply_chat_template``) renders prompt and reply, and the loss is read from the full logits of
the model loaded from the run (adapters merged), so a bug in the task's masking would show as a
disagreement with the run's own ``chosen_nll``.

The ShareGPT conversion is here only until ShareGPT detection lands in ``llm/formats.py``
(branch alias): ``from``: human/gpt/system -> ``role``: user/assistant/system.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def prepare(dpo: Path, alpaca: Path, out: Path, held_pairs: int, held_alpaca: int, tokenizer: str | None,
            max_prompt_tokens: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = json.loads(dpo.read_text())

    def turns(messages):
        return [{"role": ROLE[m["from"]], "content": m["value"]} for m in messages]

    pairs = [{"prompt": turns(r["conversations"]), "chosen": turns([r["chosen"]]), "rejected": turns([r["rejected"]])}
             for r in rows]
    if max_prompt_tokens:  # prompts that leave room for the replies within a short task.max_length
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        n = len(pairs)
        pairs = [p for p in pairs if len(tok(tok.apply_chat_template(p["prompt"], tokenize=False,
                                                                     add_generation_prompt=True))["input_ids"])
                 <= max_prompt_tokens]
        print(f"pairs whose templated prompt is at most {max_prompt_tokens} tokens: {len(pairs)} of {n}")
    for name, part in (("train", pairs[:-held_pairs]), ("heldout", pairs[-held_pairs:])):
        (out / f"dpo-{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
    records = json.loads(alpaca.read_text())
    for name, part in (("train", records[:-held_alpaca]), ("heldout", records[-held_alpaca:])):
        (out / f"alpaca-{name}.json").write_text(json.dumps(part))
    print(f"pairs: train {len(pairs) - held_pairs}, held out {held_pairs}; alpaca: train {len(records) - held_alpaca}, "
          f"held out {held_alpaca} -> {out}")


def _model(path: str):
    """(CausalLM in eval mode, tokenizer): a run (adapters merged) or a plain model directory."""
    from tuneforge.llm.model import CausalLM
    from tuneforge.models import load_model
    from tuneforge.run.artifact import _model_dir, load_model_dir
    from tuneforge.strategies.base import merged_module

    if (_model_dir(Path(path)) / "tuneforge.json").exists():
        model, task, _, _ = load_model_dir(Path(path))
        return merged_module(model).eval(), task.tokenizer
    loaded = load_model(path, causal_lm=True)
    return CausalLM(loaded.backbone, loaded.lm_head, loaded.lm).eval(), loaded.tokenizer


def reply_nll(model, tokenizer, conversations: list[list[dict]], max_length: int) -> dict:
    """NLL per token of each conversation's last (assistant) message, end-of-turn token included,
    the sequence cut at ``max_length`` as the runs cut theirs."""
    import torch
    from torch.nn import functional as F

    total, tokens = 0.0, 0
    with torch.inference_mode():
        for messages in conversations:
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
            if start >= len(ids):
                continue
            logits = model(torch.tensor([ids]))[0].float()  # (T, V)
            target = torch.tensor(ids[start:])
            total += float(F.cross_entropy(logits[start - 1:-1], target, reduction="sum"))
            tokens += len(target)
    return {"nll": round(total / max(tokens, 1), 4), "ppl": round(math.exp(total / max(tokens, 1)), 2),
            "tokens": tokens}


def pair_scores(model, tokenizer, pairs: list[dict], max_length: int) -> dict:
    """Per held-out pair, the summed log-prob and token count of each reply (cut at ``max_length``
    as the runs cut them): how often the chosen reply gets more log-prob (``logp_accuracy``, the
    raw preference) and more log-prob per token (``norm_accuracy``: SimPO's reward before training)."""
    import torch
    from torch.nn import functional as F

    raw = norm = kept = 0
    with torch.inference_mode():
        for p in pairs:
            prompt = tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=False)
            start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            scores = []
            for side in ("chosen", "rejected"):
                full = tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=False)
                ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
                if start >= len(ids):
                    break
                logits = model(torch.tensor([ids]))[0].float()
                logp = -float(F.cross_entropy(logits[start - 1:-1], torch.tensor(ids[start:]), reduction="sum"))
                scores.append((logp, len(ids) - start))
            if len(scores) < 2:
                continue  # a prompt that leaves no reply token (the runs drop these pairs too)
            kept += 1
            raw += scores[0][0] > scores[1][0]
            norm += scores[0][0] / scores[0][1] > scores[1][0] / scores[1][1]
    return {"pairs": kept, "logp_accuracy": round(raw / max(kept, 1), 4), "norm_accuracy": round(norm / max(kept, 1), 4)}


def measure(base: str, alpaca_heldout: Path, pairs_heldout: Path | None, runs: list[str], max_length: int,
            alpaca_rows: int | None) -> None:
    import torch

    from tuneforge.llm.formats import read_lm_records

    # as the runs do (train.flush_denormal): denormal floats in a trained model's activations made
    # CPU matmuls many times slower
    torch.set_flush_denormal(True)

    alpaca = [r.values["messages"] for r in read_lm_records(alpaca_heldout, limit=alpaca_rows)]
    chosen, pairs = [], []
    if pairs_heldout:
        pairs = [json.loads(line) for line in pairs_heldout.read_text().splitlines()]
        chosen = [p["prompt"] + p["chosen"] for p in pairs]
    rows = []
    for path in ([base] if base else []) + list(runs):
        t0 = time.perf_counter()
        model, tokenizer = _model(path)
        row = {"model": path, "alpaca_heldout": reply_nll(model, tokenizer, alpaca, max_length)}
        if chosen:
            row["chosen_heldout"] = reply_nll(model, tokenizer, chosen, max_length)
            row["pairs_heldout"] = pair_scores(model, tokenizer, pairs, max_length)
        evaluation = Path(path) / "eval.json"
        if evaluation.exists():
            val = json.loads(evaluation.read_text())["validation"]
            row["validation"] = {k: val[k] for k in ("loss", "reward_accuracy", "reward_margin", "logp_accuracy",
                                                     "chosen_nll") if k in val}
            settings = json.loads((Path(path) / "manifest.json").read_text()).get("task_settings", {})
            if settings.get("reference", {}).get("scores"):
                row["reference_scores"] = settings["reference"]["scores"].get("validation")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dpo", type=Path, required=True)
    p.add_argument("--alpaca", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--held-pairs", type=int, default=50)
    p.add_argument("--held-alpaca", type=int, default=100)
    p.add_argument("--tokenizer", default=None, help="with --max-prompt-tokens: the model directory whose chat "
                                                      "template and tokenizer count the prompt")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="keep only pairs with prompts this short")
    m = sub.add_parser("measure")
    m.add_argument("--base", required=True, help="the model before SFT (a model directory or alias)")
    m.add_argument("--alpaca-heldout", type=Path, required=True)
    m.add_argument("--pairs-heldout", type=Path, default=None, help="held-out pairs: NLL of their chosen replies")
    m.add_argument("--runs", nargs="*", default=[])
    m.add_argument("--max-length", type=int, default=256)
    m.add_argument("--alpaca-rows", type=int, default=None, help="only the first N held-out alpaca rows")
    m.add_argument("--skip-base", action="store_true", help="measure the runs only")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.dpo, args.alpaca, args.out, args.held_pairs, args.held_alpaca, args.tokenizer,
                args.max_prompt_tokens)
    else:
        measure(None if args.skip_base else args.base, args.alpaca_heldout, args.pairs_heldout, args.runs,
                args.max_length, args.alpaca_rows)


if __name__ == "__main__":
    main()
