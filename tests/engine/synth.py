"""A synthetic Trainer, fastai's ``synth_learner`` for tuneforge: y = a*x + b with two
parameters, on data generated in memory. No Hugging Face, no files, no tuneforge task:
the whole loop runs in milliseconds, so its bookkeeping can be tested exactly.

    trainer = synth_trainer(n=10, batch_size=3, grad_accum=2)
    trainer.fit()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tuneforge.data.batching import EpochBatchSampler
from tuneforge.engine.trainer import Trainer

TRUE_A, TRUE_B = 2.0, -1.0


@dataclass
class SynthConfig:
    """The fields the loop reads (engine.plan.TrainConfig), with small defaults."""

    epochs: float = 1
    max_steps: Optional[int] = None
    grad_accum: int = 1
    max_grad_norm: Optional[float] = None
    on_nonfinite: str = "error"
    eval_every: Optional[int] = None
    eval_before: bool = False
    log_every: int = 1


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x + self.b  # (B,)


class SynthData(Dataset):
    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, generator=g)  # (N,)
        self.y = TRUE_A * self.x + TRUE_B + 0.1 * torch.randn(n, generator=g)  # (N,)
        self.where = [f"row {i + 1}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i], "index": i}


def collate(items: list[dict]) -> dict:
    return {"x": torch.stack([it["x"] for it in items]), "labels": torch.stack([it["labels"] for it in items]),
            "index": torch.tensor([it["index"] for it in items])}


class SquaredError:
    """A task: the squared error summed over the batch's examples, and their number."""

    def forward(self, model, batch: dict) -> dict:
        pred = model(batch["x"])  # (B,)
        return {"loss_sum": ((pred - batch["labels"]) ** 2).sum(), "count": len(pred), "logits": pred[:, None]}


class MeanSquaredError:
    def __init__(self):
        self.loss_sum, self.count = 0.0, 0

    def update(self, logits, labels, *, loss_sum, count, index=None) -> None:
        self.loss_sum += float(loss_sum)
        self.count += int(count)

    def compute(self) -> dict:
        return {"loss": self.loss_sum / max(self.count, 1)}


def synth_loader(n: int = 10, batch_size: int = 3, seed: int = 0, shuffle: bool = True) -> DataLoader:
    sampler = EpochBatchSampler(n, batch_size, shuffle=shuffle, seed=seed)
    return DataLoader(SynthData(n, seed), batch_sampler=sampler, collate_fn=collate)


def synth_trainer(n: int = 10, batch_size: int = 3, lr: float = 0.1, momentum: float = 0.0, callbacks=(),
                  task=None, seed: int = 0, scheduler=None, **cfg) -> Trainer:
    """``cfg``: SynthConfig fields. ``scheduler(optimizer, plan)`` builds a schedule."""
    from tuneforge.engine.plan import TrainPlan

    model = Line()
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "lr": lr, "name": "all"}], lr=lr,
                                momentum=momentum)
    train = synth_loader(n, batch_size, seed)
    config = SynthConfig(**cfg)
    plan = TrainPlan.of(train, config)
    return Trainer(model=model, task=task or SquaredError(), optimizer=optimizer, train_loader=train,
                   val_loader=synth_loader(n, 4, seed + 1, shuffle=False), cfg=config, device=torch.device("cpu"),
                   amp_dtype=None, metrics_factory=MeanSquaredError, callbacks=callbacks, plan=plan,
                   scheduler=scheduler(optimizer, plan) if scheduler else None)


def params(trainer: Trainer) -> tuple[float, float]:
    return float(trainer.model.a.detach()), float(trainer.model.b.detach())
