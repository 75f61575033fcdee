"""Worker: one Hugging Face Trainer contender for text classification.

Run by text.py and frozen.py in its own process: ``python benchmarks/hf_text.py CONFIG.json``.
Not an entry point of its own. Config keys: see ``text.py``/``frozen.py`` (``hf_config``).

Modes
-----
``default``  what most users run: TrainingArguments defaults except output_dir, epochs,
             batch sizes, learning rate, warmup 10%, linear schedule, seed, one evaluation at
             the end, no checkpoints, no reporting, logging every 50 steps, no tqdm. fp32.
``expert``   the same plus bf16 autocast, length-grouped batches, fused AdamW, no pinned
             memory and no loader workers (the data are pre-tokenised; a worker would only
             steal one of two cores), weight decay 0.01 as tuneforge uses.

Strategies: ``full``; ``lora`` (PEFT LoraConfig, task SEQ_CLS, so the classifier is in
modules_to_save and trains in full); ``linear-probe`` (only ``classifier`` trains: embeddings,
encoder *and the pooler* are frozen); ``partial`` (embeddings and the lower encoder layers frozen;
the top ``partial_layers`` encoder layers, the pooler and the classifier train).

Timing: ``preprocess_s`` = tokenising train + dev (fast tokenizer, truncation=True,
max_length, no padding); ``model_load_s`` = tokenizer + model load (+ PEFT wrap / freezing);
``trainer_init_s`` = building TrainingArguments + Trainer; ``train_s`` = ``trainer.train()``
only (perf_counter around the call); ``eval_s`` = ``trainer.evaluate()`` on dev.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    t_start = time.perf_counter()
    import numpy as np
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    import_s = time.perf_counter() - t_start
    set_seed(cfg["seed"])

    # -- data: read (not timed as preprocessing: the parent reads the same files too)
    train_texts, train_raw = common.read_tsv(cfg["train_path"], cfg["train_text_column"], cfg["label_column"],
                                             cfg["rows"])
    dev_texts, dev_raw = common.read_tsv(cfg["dev_path"], cfg["dev_text_column"], cfg["label_column"])
    names = sorted(set(train_raw))
    label_id = {n: i for i, n in enumerate(names)}

    # -- model (+ strategy)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(cfg["model_dir"], num_labels=len(names))
    strategy = cfg["strategy"]
    if strategy == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = cfg["lora"]
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=lora["rank"], lora_alpha=lora["alpha"],
                                                 lora_dropout=lora["dropout"], target_modules=lora["targets"]))
    elif strategy in ("linear-probe", "partial"):
        freeze(model, strategy, cfg.get("partial_layers", 2))
    elif strategy != "full":
        raise SystemExit(f"unknown strategy {strategy}")
    model_load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    trainable_names = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad})

    # -- preprocessing: tokenise once, no padding (the collator pads per batch)
    t0 = time.perf_counter()
    train_ds = Encoded(tokenizer(train_texts, truncation=True, max_length=cfg["max_length"]),
                       [label_id[x] for x in train_raw])
    dev_ds = Encoded(tokenizer(dev_texts, truncation=True, max_length=cfg["max_length"]),
                     [label_id[x] for x in dev_raw])
    preprocess_s = time.perf_counter() - t0
    collator = CountingCollator(DataCollatorWithPadding(tokenizer))

    def compute_metrics(pred):
        y = np.asarray(pred.label_ids)
        p = np.asarray(pred.predictions).argmax(-1)
        return {"accuracy": accuracy_score(y, p), "f1_macro": f1_score(y, p, average="macro")}

    # -- trainer
    t0 = time.perf_counter()
    args = TrainingArguments(**training_kwargs(cfg, TrainingArguments))
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds, data_collator=collator,
                      compute_metrics=compute_metrics)
    trainer_init_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_output = trainer.train()
    train_s = time.perf_counter() - t0

    collator.active = False
    t0 = time.perf_counter()
    metrics = trainer.evaluate()
    eval_s = time.perf_counter() - t0

    settings = {k: getattr(args, k, None) for k in ("bf16", "optim", "train_sampling_strategy", "group_by_length",
                                                    "weight_decay", "warmup_steps", "warmup_ratio",
                                                    "lr_scheduler_type", "dataloader_num_workers",
                                                    "dataloader_pin_memory", "max_grad_norm")}
    common.write_worker_result(cfg["result_path"], {
        "precision": "bf16" if cfg["mode"] == "expert" else "fp32",
        "import_s": round(import_s, 2),
        "model_load_s": round(model_load_s, 2),
        "preprocess_s": round(preprocess_s, 2),
        "trainer_init_s": round(trainer_init_s, 2),
        "train_s": round(train_s, 2),
        "eval_s": round(eval_s, 2),
        "accuracy": metrics.get("eval_accuracy"),
        "f1_macro": metrics.get("eval_f1_macro"),
        "eval_loss": metrics.get("eval_loss"),
        "steps": train_output.global_step,
        "train_loss_mean": train_output.training_loss,
        "trainer_samples_per_s": train_output.metrics.get("train_samples_per_second"),
        "padding_fraction": collator.padding_fraction(),
        "real_tokens_seen": collator.real,
        "padded_tokens_seen": collator.total,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_modules": trainable_names if len(trainable_names) <= 40 else trainable_names[:40] + ["..."],
        "training_arguments": {k: str(v) if not isinstance(v, (int, float, bool, type(None))) else v
                               for k, v in settings.items()},
        "log_history": [h for h in trainer.state.log_history if "loss" in h],
        "torch_threads": torch.get_num_threads(),
    })


def training_kwargs(cfg: dict, training_arguments) -> dict:
    """TrainingArguments for ``cfg['mode']``, using whichever field names this transformers has."""
    fields = {f.name for f in dataclasses.fields(training_arguments)}
    kw = dict(output_dir=cfg["output_dir"], num_train_epochs=cfg["epochs"],
              per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["eval_batch_size"],
              learning_rate=cfg["lr"], lr_scheduler_type="linear", seed=cfg["seed"], save_strategy="no",
              report_to="none", logging_steps=50, disable_tqdm=True)
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio).
    if "warmup_ratio" in fields:
        kw["warmup_ratio"] = cfg["warmup"]
    else:
        kw["warmup_steps"] = cfg["warmup"]
    # ... and renamed evaluation_strategy to eval_strategy earlier; evaluate once, at the end, by hand.
    kw["eval_strategy" if "eval_strategy" in fields else "evaluation_strategy"] = "no"
    if cfg["mode"] == "expert":
        import torch

        kw.update(bf16=True, optim="adamw_torch_fused", dataloader_num_workers=0, dataloader_pin_memory=False,
                  weight_decay=cfg.get("weight_decay", 0.01))
        # transformers 5 refuses bf16 without a GPU ("Your setup doesn't support bf16/gpu")
        # unless use_cpu=True is set explicitly; with it, bf16 means CPU autocast.
        if not torch.cuda.is_available():
            kw["use_cpu"] = True
        if "train_sampling_strategy" in fields:
            kw["train_sampling_strategy"] = "group_by_length"
        else:
            kw["group_by_length"] = True
    return kw


def freeze(model, strategy: str, top_layers: int) -> None:
    """requires_grad=False on the frozen part (BertForSequenceClassification layout)."""
    base = model.base_model  # .bert
    for p in model.parameters():
        p.requires_grad = False
    if strategy == "linear-probe":
        for p in model.classifier.parameters():
            p.requires_grad = True
        return
    layers = base.encoder.layer
    for layer in list(layers)[len(layers) - top_layers:]:
        for p in layer.parameters():
            p.requires_grad = True
    for part in (getattr(base, "pooler", None), model.classifier):
        if part is not None:
            for p in part.parameters():
                p.requires_grad = True


class Encoded:
    """Pre-tokenised examples (a plain map-style dataset, no ``datasets``)."""

    def __init__(self, encoding, labels: list[int]):
        self.columns = {k: list(v) for k, v in encoding.items()}
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.columns.items()}
        item["labels"] = self.labels[i]
        return item


class CountingCollator:
    """DataCollatorWithPadding, counting real vs padded tokens of the training batches."""

    def __init__(self, inner):
        self.inner, self.active, self.real, self.total = inner, True, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        if self.active:
            mask = batch["attention_mask"]
            self.real += int(mask.sum())
            self.total += mask.numel()
        return batch

    def padding_fraction(self) -> float | None:
        return round(1 - self.real / self.total, 4) if self.total else None


if __name__ == "__main__":
    main(sys.argv[1])
