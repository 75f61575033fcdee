"""Generating replies: greedy or sampled, with a KV cache, stopping at EOS / end-of-turn.

Our own short loop rather than ``transformers.generate``: it runs the same
:class:`~tuneforge.llm.model.CausalLM` that trained (peft adapters injected in
place included), needs no generation config on the model, and stays deterministic for a
given seed. Prompts are left-padded into one batch; position ids count real tokens only,
so a prompt's reply does not depend on the other prompts in its batch (up to float
rounding). Backbones wrapped by a strategy (prompt tuning) take no cache: they are run
one prompt at a time over the whole sequence.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, stop_ids=(), greedy: bool = True,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, device=None, autocast=None,
             batch_size: int = 16, on_token=None) -> list[str]:
    """Replies (decoded, stop token removed) for ``prompts`` (already templated texts).

    ``on_token(prompt_index, token_id) -> bool``: called with every token as it is chosen (the
    stop token too), in order; returning True ends that prompt's reply there (a stop string
    seen, a client gone). Streaming is built on it (``deploy/generator.py``)."""
    import contextlib

    from .model import _wrapped, core_model

    core = core_model(model)
    model.eval()
    device = device or next(core.parameters()).device
    autocast = autocast or contextlib.nullcontext
    generator = torch.Generator(device="cpu").manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_ids) | {tokenizer.eos_token_id}), device=device)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    step = 1 if _wrapped(core.backbone) else batch_size
    out: list[str] = []
    for i in range(0, len(encoded), step):
        chunk = encoded[i:i + step]
        with autocast():
            ids = _generate_batch(core, chunk, max_new_tokens, stop, greedy, temperature, top_p, generator, device,
                                  tokenizer.pad_token_id or 0,
                                  on_token=None if on_token is None else (lambda r, t, i=i: on_token(i + r, t)))
        out += [tokenizer.decode(x, skip_special_tokens=False) for x in ids]
    return out


@torch.inference_mode()
def generate_ids(core, prompts: list[list[int]], *, max_new_tokens: int, stop_ids, greedy: bool, temperature: float,
                 top_p: float, generator: torch.Generator, device, pad_id: int) -> list[list[int]]:
    """Token ids of the replies to tokenised ``prompts``, one batch, KV-cached; a reply that
    stopped keeps its stop token (an RL loss trains the model to stop, so the token is part of
    what was sampled). ``core``: the :class:`CausalLM` (``core_model(model)``); the caller puts
    the model in eval mode and owns the ``generator`` (its state is the sampling's)."""
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    return _generate_batch(core, prompts, max_new_tokens, stop, greedy, temperature, top_p, generator, device, pad_id,
                           keep_stop=True)


def _generate_batch(core, prompts: list[list[int]], max_new: int, stop, greedy, temperature, top_p, generator, device,
                    pad_id: int, keep_stop: bool = False, on_token=None) -> list[list[int]]:
    from .model import _wrapped

    B, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, longest), pad_id, dtype=torch.long, device=device)  # (B, T) left-padded
    mask = torch.zeros((B, longest), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = torch.tensor(p, device=device)
        mask[r, longest - len(p):] = 1
    cached = not _wrapped(core.backbone)
    past, done = None, torch.zeros(B, dtype=torch.bool, device=device)
    replies = [[] for _ in range(B)]
    step_ids, step_mask = ids, mask
    for _ in range(max_new):
        if cached:
            positions = (step_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            out = core.backbone(input_ids=step_ids, attention_mask=step_mask, position_ids=positions,
                                use_cache=True, **{_cache_kwarg(core.backbone): past})
            past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            hidden = out.last_hidden_state[:, -1]  # (B, H)
        else:
            hidden = core.hidden(step_ids, step_mask)[:, -1]
        logits = core.lm_head(hidden).float()  # (B, V)
        nxt = _choose(logits, greedy, temperature, top_p, generator)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        ended = torch.isin(nxt, stop)
        for r in range(B):
            if not done[r]:
                replies[r].append(int(nxt[r]))
                if on_token is not None and on_token(r, int(nxt[r])):
                    ended[r] = True  # the caller ends this reply here
        done |= ended
        if bool(done.all()):
            break
        step_mask = torch.cat([step_mask, torch.ones((B, 1), dtype=step_mask.dtype, device=device)], 1)
        step_ids = nxt[:, None] if cached else torch.cat([step_ids, nxt[:, None]], 1)
    if keep_stop:
        return replies
    stops = set(stop.tolist())
    return [r[:-1] if r and r[-1] in stops else r for r in replies]


def _cache_kwarg(backbone) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; take whichever this model has."""
    import inspect

    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def _choose(logits, greedy: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1).cpu()
    sorted_p, order = probs.sort(-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p (always the top token)
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)  # (B, 1)
    return order.gather(-1, pick).squeeze(-1).to(logits.device)


# --------------------------------------------------------------------------- evaluation

def _normalise(text: str) -> str:
    return " ".join(text.strip().split())


def text_scores(predictions: list[str], references: list[str]) -> dict:
    """Exact match (whitespace-normalised), ROUGE-L F1 (``rouge-score``) and corpus BLEU (``sacrebleu``)."""
    out = {"exact_match": round(sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references))
                                / max(len(references), 1), 4)}
    try:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        out["rougeL"] = round(sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
                              / max(len(references), 1), 4)
    except ImportError:
        pass
    try:
        import sacrebleu

        out["bleu"] = round(sacrebleu.corpus_bleu(predictions, [references]).score, 2)
    except ImportError:
        pass
    return out


def evaluate_generation(model, task, records, path: Path, device, autocast, gen, *, seed: int, log,
                        when: str = "") -> dict:
    """Answer held-out prompts greedily (and sampled), score against the references, write the samples.

    Records whose ``values`` hold a ``group`` (``task.generation.group_by``) are also scored per
    group (``result["groups"]``). ``when`` names the weights in the log line ("before training")."""
    t0 = time.perf_counter()
    template = task.template
    prompts = [template.prompt(r.values["messages"]) for r in records]
    references = [r.values["messages"][-1]["content"] for r in records]
    groups = [r.values.get("group") for r in records]
    # One batch for up to 64 prompts: a decoding step reads every weight once whatever the batch
    # (memory-bound on CPU: SmolLM2's 0.54 GB of fp32 weights per token step), so batching is nearly free.
    common = dict(max_new_tokens=gen.max_new_tokens, stop_ids=template.stop_ids(), device=device, autocast=autocast,
                  batch_size=64)
    greedy = generate(model, task.tokenizer, prompts, greedy=True, **common)
    clean = [strip_reply(g, task.tokenizer) for g in greedy]
    result = {"prompts": len(prompts), "greedy": text_scores(clean, references)}
    sampled = None
    if gen.sampled:
        sampled = [strip_reply(s, task.tokenizer) for s in generate(
            model, task.tokenizer, prompts, greedy=False, temperature=gen.temperature, top_p=gen.top_p, seed=seed,
            **common)]
        result["sampled"] = text_scores(sampled, references)
    if any(g is not None for g in groups):
        result["groups"] = {}
        for name in sorted({g for g in groups if g is not None}):
            rows = [i for i, g in enumerate(groups) if g == name]
            scores = {"prompts": len(rows), "greedy": text_scores([clean[i] for i in rows], [references[i] for i in rows])}
            if sampled is not None:
                scores["sampled"] = text_scores([sampled[i] for i in rows], [references[i] for i in rows])
            result["groups"][name] = scores
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            row = {"where": r.where, "prompt": prompts[i], "reference": references[i], "greedy": clean[i]}
            if sampled is not None:
                row["sampled"] = sampled[i]
            if groups[i] is not None:
                row["group"] = groups[i]
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)  # atomic: never half a file
    result["seconds"] = round(time.perf_counter() - t0, 2)
    by_group = "; ".join(f"{name} exact_match {g['greedy']['exact_match']}"
                         for name, g in result.get("groups", {}).items())
    log(f"generation{' ' + when if when else ''} on {len(prompts)} validation prompts: greedy " + ", ".join(
        f"{k} {v}" for k, v in result["greedy"].items()) + (
        "; sampled " + ", ".join(f"{k} {v}" for k, v in result["sampled"].items()) if sampled is not None else "")
        + (f"; greedy by group: {by_group}" if by_group else "") + f" ({path.name}, {result['seconds']}s)")
    return result


def strip_reply(text: str, tokenizer) -> str:
    """A reply without trailing end-of-turn markers the tokenizer does not treat as special."""
    for marker in ("<|im_end|>", tokenizer.eos_token or ""):
        if marker and marker in text:
            text = text.split(marker)[0]
    return text.strip()


# ``Generator`` (a saved run, ready to answer) moved to tuneforge.deploy.generator in 0.2; the old
# path keeps working until 0.3 (CHANGELOG.md).
from .._compat import forward as _forward  # noqa: E402

__getattr__ = _forward(__name__, ("tuneforge.deploy.generator",))
