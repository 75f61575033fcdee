"""Token-weighted accumulation through the real tasks: grad_accum=2 over two micro-batches
that hold different numbers of targets (reply tokens, pairs, examples) gives the gradient of
one batch holding both, i.e. the mean over every target of the step, not a mean of the two
micro-batch means. Each test also checks that a mean of means would differ here, so it
fails on a loop that averaged per micro-batch (the engine before token weighting)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import text_recipe
from tuneforge.llm.tiny import corpus_text, make_lm, make_tokenizer, write_jsonl
from synth import SynthConfig
from tuneforge.engine.trainer import Trainer
from tuneforge.models import load_model
from tuneforge.recipe import load_recipe
from tuneforge.tasks import get_task

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, width 64) and its tokenizer."""
    d = tmp_path_factory.mktemp("lm")
    make_lm(d, make_tokenizer(d, corpus_text()))
    return d


class GradCapture(torch.optim.Optimizer):
    """Takes no step; keeps the gradients it was asked to step with."""

    def __init__(self, named: list):
        self.names = [n for n, _ in named]
        self.grads: dict | None = None
        super().__init__([p for _, p in named], {"lr": 0.0})

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.grads = {n: p.grad.clone() for n, p in zip(self.names, params) if p.grad is not None}


def _trainable(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainer_grads(model, task, loader, metrics) -> dict:
    """The gradient of the first optimizer step of grad_accum=2 (dropout off: eval mode)."""
    optimizer = GradCapture(_trainable(model))
    trainer = Trainer(model=model, task=task, optimizer=optimizer, train_loader=loader, val_loader=loader,
                      cfg=SynthConfig(grad_accum=2, max_steps=1), device=CPU, amp_dtype=None,
                      metrics_factory=metrics, train_mode=lambda m: m.eval())
    assert len(loader) == 2  # two micro-batches: one step
    trainer.fit()
    return optimizer.grads


def batch_grads(model, task, batches: list[dict], mean_of_means: bool = False) -> dict:
    """The gradient of the mean over every target of ``batches`` (one batch holding them all),
    or, with ``mean_of_means``, of the mean of the per-batch means (what must differ)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    outs = [task.forward(model, b) for b in batches]
    if mean_of_means:
        loss = sum(o["loss_sum"] / o["count"] for o in outs) / len(outs)
    else:
        loss = sum(o["loss_sum"] for o in outs) / sum(o["count"] for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in _trainable(model) if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def check(model, task, loader, collate, metrics) -> None:
    loader.batch_sampler.set_epoch(0)
    micro = list(loader)
    counts = [int(task.forward(model, b)["count"]) for b in micro]
    assert counts[0] != counts[1], counts  # unequal micro-batches: where weighting matters
    items = [loader.dataset[i] for b in micro for i in b["index"].tolist()]
    whole = batch_grads(model, task, [collate(items)])  # one batch holding both
    got = trainer_grads(model, task, loader, metrics)
    assert whole.keys() == got.keys() and whole
    for name in whole:
        torch.testing.assert_close(got[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    old = batch_grads(model, task, micro, mean_of_means=True)
    assert any(not torch.allclose(old[n], whole[n], rtol=1e-3, atol=1e-5) for n in whole)


def _lm_task(lm_dir, tmp_path, task: dict, rows: list[dict]):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    recipe = load_recipe({"model": {"name": str(lm_dir)},
                          "task": {"max_length": 64, "generation": {"eval_prompts": 0}, **task},
                          "data": {"train": str(path), "validation": str(path)},
                          "train": {"precision": "fp32", "group_by_length": False},
                          "output": {"dir": str(tmp_path / "run")}})
    t = get_task(recipe)
    loaded = load_model(str(lm_dir), causal_lm=True)
    t.attach(loaded)
    model = t.build_model(loaded, None)
    dataset = t.dataset(t.read("train", str(path), limit=None, skipped=[]), None, "train")
    return t, model, dataset


def test_causal_lm_weighs_every_reply_token_once(lm_dir, tmp_path):
    # replies of 1 to ~20 tokens: any split of the four into two batches holds unequal token counts
    rows = [{"prompt": f"reverse {w} =", "completion": c} for w, c in
            [("ab", " b"), ("abc", " cba"), ("abcd", " dcba dcba"), ("fgh", " hgf hgf hgf hgf hgf hgf")]]
    task, model, dataset = _lm_task(lm_dir, tmp_path, {"type": "causal-lm", "packing": False}, rows)
    loader = task.loader(dataset, 2, train=True, seed=0)
    check(model, task, loader, task.collate, task.metrics)


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_preference_weighs_every_pair_once(loss, lm_dir, tmp_path):
    words = ["ab", "abc", "abcd", "fgh", "hgfe"]
    rows = [{"prompt": f"reverse {w} =", "chosen": " " + w[::-1], "rejected": (" " + w[::-1]) * (i + 2)}
            for i, w in enumerate(words)]
    task, model, dataset = _lm_task(lm_dir, tmp_path, {"type": "preference", "loss": loss}, rows)
    task.prepare_reference(model, {"train": dataset}, CPU, contextlib.nullcontext, tmp_path, lambda msg: None)
    with torch.no_grad():  # away from the reference, so DPO's rewards are not all zero
        for p in model.lm_head.parameters():
            p.mul_(1.5)
    loader = task.loader(dataset, 3, train=True, seed=0)  # five pairs: micro-batches of 3 and 2
    check(model, task, loader, task.collate, task.metrics)


@pytest.mark.parametrize("multi_label", [False, True])
def test_classification_weighs_every_example_once_with_a_short_last_micro_batch(multi_label, tiny_bert_dir, tmp_path):
    train = tmp_path / "train.csv"
    labels = ["pos", "neg", "pos", "neg", "pos"] if not multi_label else ['"pos,fun"', "neg", "pos", '"neg,fun"', "fun"]
    texts = ["good fun movie", "bad plot", "great film", "awful boring", "loved it"]
    train.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    recipe = load_recipe(text_recipe(tiny_bert_dir, train, tmp_path / "run", task={"multi_label": multi_label},
                                     train={"group_by_length": False}))
    task = get_task(recipe)
    loaded = load_model(str(tiny_bert_dir))
    task.attach(loaded)
    records = task.read("train", str(train), limit=None, skipped=[])
    label_map = task.label_map(records)
    model = task.build_model(loaded, label_map)
    dataset = task.dataset(records, label_map, "train")
    loader = task.loader(dataset, 2, train=True, seed=0)  # five examples: micro-batches of 2 and 3
    check(model, task, loader, task.collate, lambda: task.metrics(label_map))
