"""Worker: TRL's SFTTrainer (+ PEFT for LoRA) as the contender of sft.py.

Run by sft.py in its own process: ``python benchmarks/trl_sft.py CONFIG.json``. Not an entry point.

How TRL is configured (TRL 1.16; read from its SFTConfig / SFTTrainer source), to match the
tuneforge run on everything that changes the work done or the result:

* data: ``datasets.Dataset.from_list`` of the same prompt/completion JSONL; TRL appends EOS to the
  completion and tokenises prompt and prompt+completion without special tokens;
  ``completion_only_loss=True`` (loss on the completion + EOS only, as tuneforge's
  ``train_on: completion``);
* ``packing=True`` with its default ``packing_strategy="bfd"`` (best-fit decreasing into rows
  of ``max_length``), which switches on ``padding_free``: the rows of a batch are concatenated
  into one sequence with restarting ``position_ids`` and no attention mask, from which
  transformers builds the block-diagonal causal mask (each example attends to itself only;
  tuneforge does the same per row). The first token of each example carries no loss (both);
* ``bf16=True`` with ``use_cpu=True`` (CPU autocast, as tuneforge's default on this CPU),
  ``optim="adamw_torch_fused"`` (tuneforge's fused AdamW), linear schedule with the same warmup
  fraction, weight decay 0.01, ``max_grad_norm=1.0``, same seed, epochs and rows per batch;
* ``gradient_checkpointing=False``: SFTConfig defaults it to True (recomputing activations,
  ~30% slower), which tuneforge does not do; left on it would be a different computation;
* no evaluation or checkpoints during training (``save_strategy="no"``), no reporting, no tqdm,
  no loader workers or pinned memory (the examples are pre-tokenised; 2 cores);
* LoRA: ``peft_config=LoraConfig(task_type=CAUSAL_LM, r, lora_alpha, lora_dropout,
  target_modules=<the same 7 projections>)``; embeddings and LM head frozen on both sides.

Timing: ``preprocess_s`` = building the SFTTrainer (tokenising + packing the data sets, which
TRL does in its constructor); ``train_s`` = ``trainer.train()`` only. ``eval_loss`` is computed
here, after training, the way tuneforge reports it: summed next-token cross-entropy over the
completion tokens of the held-out set divided by their count (bf16 autocast, unpacked).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def eval_loss(model, tok, records: list[dict], batch_size: int = 16) -> tuple[float, int]:
    """Token-weighted cross-entropy over completion + EOS tokens (what tuneforge's validation loss is)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            seqs, labels = [], []
            for r in chunk:
                p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
                ids = tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                seqs.append(ids)
                labels.append([-100] * len(p) + ids[len(p):])
            T = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), T), tok.pad_token_id)
            lab = torch.full((len(seqs), T), -100)
            mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for r, (s, y) in enumerate(zip(seqs, labels)):
                ids[r, :len(s)], lab[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), torch.tensor(y), 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            target = lab[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / max(count, 1), count


def main(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    t_start = time.perf_counter()
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    import_s = time.perf_counter() - t_start
    set_seed(cfg["seed"])

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"])
    peft_config = None
    if cfg["strategy"] == "lora":
        from peft import LoraConfig, TaskType

        lora = cfg["lora"]
        peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora["rank"], lora_alpha=lora["alpha"],
                                 lora_dropout=lora["dropout"], target_modules=lora["targets"])
    elif cfg["strategy"] != "full":
        raise SystemExit(f"unknown strategy {cfg['strategy']}")
    model_load_s = time.perf_counter() - t0
    train_records = read_jsonl(cfg["train_path"])
    dev_records = read_jsonl(cfg["dev_path"])

    args = SFTConfig(
        output_dir=cfg["output_dir"], num_train_epochs=cfg["epochs"], per_device_train_batch_size=cfg["batch_size"],
        learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=cfg["warmup"],  # < 1: a ratio (transformers 5)
        weight_decay=cfg["weight_decay"], max_grad_norm=1.0, seed=cfg["seed"], optim="adamw_torch_fused",
        bf16=True, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        max_length=cfg["max_length"], packing=True, packing_strategy="bfd", completion_only_loss=True,
        save_strategy="no", eval_strategy="no", report_to="none", logging_steps=10, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False)
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_records),
                         processing_class=tok, peft_config=peft_config)
    preprocess_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())

    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    loss, n = eval_loss(trainer.model, tok, dev_records)
    eval_s = time.perf_counter() - t0
    packed = trainer.train_dataset
    common.write_worker_result(cfg["result_path"], {
        "precision": "bf16",
        "trl_version": trl.__version__,
        "import_s": round(import_s, 2),
        "model_load_s": round(model_load_s, 2),
        "preprocess_s": round(preprocess_s, 2),
        "train_s": round(train_s, 2),
        "eval_s": round(eval_s, 2),
        "eval_loss": round(loss, 6),
        "eval_target_tokens": n,
        "steps": out.global_step,
        "train_loss_mean": out.training_loss,
        "packed_rows": len(packed),
        "padding_free": trainer.padding_free,
        "completion_only_loss": trainer.completion_only_loss,
        "trainable_params": trainable,
        "total_params": total,
        "training_arguments": {k: str(getattr(args, k, None)) for k in (
            "bf16", "optim", "gradient_checkpointing", "packing", "packing_strategy", "padding_free",
            "completion_only_loss", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
            "dataloader_num_workers", "use_cpu")},
        "log_history": [h for h in trainer.state.log_history if "loss" in h],
        "torch_threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main(sys.argv[1])
