"""Forgetting: how much of what the pretrained (or previously fine-tuned) model knew
survives this run, measured before training and at every evaluation.

* Representation drift, which needs no labels: pooled features of the ``retain.data``
  inputs from the current backbone against the same inputs through the starting
  backbone — linear CKA (Kornblith et al. 2019, "Similarity of Neural Network
  Representations Revisited", eq. 5) and the mean cosine similarity per example.
* Sequential fine-tuning (task A, then B): with ``retain.head_from: RUN_A`` and labelled
  retain data, A's head scores A's data on the current backbone; the drop from the
  value before training is A's forgetting.

``retain.max_drop`` makes an evaluation over budget ineligible as the best checkpoint.
CKA is five lines of linear algebra that no maintained metrics library ships, so it is ours.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TuneforgeError
from ..engine.callbacks import METRICS, Callback


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (N, D) feature matrices (rows: the same examples); 1 = same up to rotation/scale."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).norm() ** 2  # ||Y^T X||_F^2
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if denom > 0 else float("nan")


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean())


def read_retain(task, recipe) -> tuple[list, list | None]:
    """Inputs (texts or image paths) and, if a label column is set, their raw labels."""
    from ..modalities import modality_of

    r = recipe.retain
    d = recipe.data
    if not Path(r.data).exists():
        raise TuneforgeError(f"retain.data '{r.data}' does not exist (relative paths start at {Path.cwd()})")
    modality = modality_of(task.modality)
    key = modality.input  # "text" / "image": the record field, and the data/retain column role
    column = getattr(r, f"{key}_column") or getattr(d, f"{key}_column")
    records = modality.read_inputs(r.data, column=column, label_column=r.label_column, limit=r.max_rows, data=d,
                                   hints={key: f"retain.{key}_column", "label": "retain.label_column"})
    inputs = [rec.values[key] if modality.files else str(rec.values[key]) for rec in records]
    if not inputs:
        raise TuneforgeError(f"retain.data '{r.data}' holds no examples")
    labels = [(rec.values["label"], rec.where) for rec in records] if r.label_column and all(
        "label" in rec.values for rec in records) else None
    return inputs, labels


class RetainMonitor(Callback):
    """Adds ``retain_*`` figures to every evaluation's metrics, before anything reads them."""

    order = METRICS

    def __init__(self, task, recipe, reference_path: Path, head=None):
        """``head``: ``(module, LabelMap)`` of an earlier run (retain.head_from), loaded by the run."""
        self.task, self.recipe, self.reference_path = task, recipe, Path(reference_path)
        self.max_drop = recipe.retain.max_drop
        inputs, raw_labels = read_retain(task, recipe)
        bs = recipe.train.eval_batch_size or 64
        self.batches = [task.encode_inputs(inputs[i:i + bs]) for i in range(0, len(inputs), bs)]  # CPU tensors
        self.head = self.head_labels = self.targets = None
        if head is not None:
            self._use_head(head, raw_labels)
        self.reference: dict | None = None
        self.history: list[dict] = []

    def _use_head(self, head, raw_labels) -> None:
        if raw_labels is None:
            raise TuneforgeError("retain.head_from needs labelled retain data: set retain.label_column")
        module, labels = head
        self.head, self.head_labels = module.float().eval().requires_grad_(False), labels
        self.targets = torch.tensor([labels.id(v, f"retain.data {where}") for v, where in raw_labels])

    @torch.no_grad()  # not inference_mode: its tensors may not meet autograd-tracked ones later
    def features(self, trainer) -> torch.Tensor:
        model = trainer.model
        was_training = model.training
        model.eval()
        out = []
        for batch in self.batches:
            batch = trainer.to_device(batch)
            with trainer.autocast():
                out.append(model.features(**batch).float().cpu())  # (B, H)
        model.train(was_training)
        return torch.cat(out)  # (N, H)

    @torch.no_grad()
    def retained_task(self, feats: torch.Tensor) -> dict:
        from .metrics import ClassificationMetrics

        m = ClassificationMetrics(len(self.head_labels), names=self.head_labels.names)
        logits = self.head(feats)  # (N, C_A)
        m.update(logits, self.targets, loss_sum=torch.nn.functional.cross_entropy(logits, self.targets, reduction="sum"),
                 count=len(self.targets))
        out = m.compute()
        return {k: out[k] for k in ("accuracy", "f1_macro", "loss")}

    def on_fit_start(self, trainer) -> None:
        # The starting model is the reference; a resumed run reads the one its first part saved.
        if self.reference_path.exists():
            self.reference = torch.load(self.reference_path, weights_only=True)
            return
        feats = self.features(trainer)
        self.reference = {"features": feats}
        if self.head is not None:
            self.reference["task"] = self.retained_task(feats)
        torch.save(self.reference, self.reference_path)

    def measure(self, trainer) -> dict:
        feats = self.features(trainer)
        ref = self.reference["features"]
        cka = linear_cka(ref, feats)
        out = {"retain_cka": cka, "retain_cosine": mean_cosine(ref, feats), "retain_drift": 1.0 - cka}
        if self.head is not None:
            now, before = self.retained_task(feats), self.reference["task"]
            out.update({f"retain_{k}": v for k, v in now.items()})
            out["retain_accuracy_before"] = before["accuracy"]
            out["retain_accuracy_drop"] = before["accuracy"] - now["accuracy"]
            out["forgetting"] = out["retain_accuracy_drop"]
        else:
            out["forgetting"] = out["retain_drift"]
        if self.max_drop is not None:
            out["within_forgetting_budget"] = out["forgetting"] <= self.max_drop
        return out

    def on_eval_end(self, trainer, metrics: dict) -> None:
        found = self.measure(trainer)
        metrics.update(found)
        self.history.append({"step": trainer.state.step, **found})

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]

    def summary(self, best_step: int | None) -> dict:
        at_best = next((h for h in self.history if h["step"] == best_step), None)
        return {
            "measure": "retain accuracy drop with the earlier task's head" if self.head is not None
            else "representation drift, 1 - linear CKA against the starting backbone",
            "examples": sum(len(next(iter(b.values()))) for b in self.batches),
            "before": self.reference.get("task") if self.reference else None,
            "max_drop": self.max_drop, "at_best": at_best, "history": self.history,
            "budget_met": None if self.max_drop is None or at_best is None else at_best["forgetting"] <= self.max_drop,
        }
