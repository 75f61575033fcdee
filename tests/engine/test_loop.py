"""The loop's bookkeeping on the synthetic trainer (synth.py): accumulation, non-finite
steps, evaluation and logging schedules, exact resume, callback order and declared hooks.
Milliseconds each: no model, no files beyond tmp_path."""

from __future__ import annotations

import math

import pytest
import torch

from synth import SquaredError, SynthConfig, SynthData, params, synth_trainer
from tuneforge.data.batching import EpochBatchSampler
from tuneforge.engine.callbacks import CHECKPOINT, LOG, Callback, ResumeCheckpoint
from tuneforge.engine.checkpoint import load_resumable, restore_rng, verify_checkpoint
from tuneforge.engine.optim import build_scheduler
from tuneforge.engine.plan import TrainPlan
from tuneforge.errors import TuneforgeError


class Recorder(Callback):
    """What the loop reports: every log, evaluation step and record."""

    def __init__(self):
        self.logs, self.evals, self.records, self.events = [], [], [], []

    def on_log(self, trainer, logs):
        self.logs.append((logs["step"], logs["loss"]))

    def on_eval_end(self, trainer, metrics):
        self.evals.append((trainer.state.step, metrics["loss"]))

    def on_record(self, trainer, event):
        self.records.append(event)


class StopAt(Callback):
    """Stops as an interrupt does (no final evaluation) after ``step`` steps."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            trainer.state.should_stop = trainer.state.interrupted = True


def reference_params(n, batch_size, grad_accum, lr, epochs) -> tuple[float, float]:
    """SGD on the mean squared error over every example of each accumulated group."""
    data, sampler = SynthData(n), EpochBatchSampler(n, batch_size, shuffle=True, seed=0)
    a, b = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        for g in range(0, len(batches), grad_accum):
            idx = [i for batch in batches[g:g + grad_accum] for i in batch]
            loss = ((a * data.x[idx] + b - data.y[idx]) ** 2).mean()
            ga, gb = torch.autograd.grad(loss, [a, b])
            with torch.no_grad():
                a -= lr * ga
                b -= lr * gb
    return float(a.detach()), float(b.detach())


def test_plan_counts_micro_batches_steps_and_total():
    assert TrainPlan.of(10, SynthConfig(grad_accum=3, epochs=2)) == TrainPlan(10, 4, 8)
    assert TrainPlan.of(10, SynthConfig(grad_accum=3, epochs=0.5)) == TrainPlan(10, 4, 2)
    assert TrainPlan.of(10, SynthConfig(max_steps=7)).total_steps == 7
    trainer = synth_trainer(n=10, batch_size=3, grad_accum=2)  # batches of 3, 3, 4
    assert trainer.plan == TrainPlan(3, 2, 2)


# batches of 3, 3, 4 (n=10) or 3, 3, 3, 2 (n=11): groups of unequal size, and a short last group
@pytest.mark.parametrize("n,grad_accum", [(10, 1), (10, 2), (10, 3), (11, 2), (11, 3)])
def test_accumulation_is_the_mean_over_every_example_of_the_step(n, grad_accum):
    trainer = synth_trainer(n=n, batch_size=3, grad_accum=grad_accum, lr=0.1, epochs=3)
    state = trainer.fit()
    assert state.step == trainer.plan.total_steps == 3 * math.ceil(len(trainer.train_loader) / grad_accum)
    assert state.examples == 3 * n
    ref = reference_params(n, 3, grad_accum, 0.1, 3)
    assert params(trainer) == pytest.approx(ref, rel=1e-6, abs=1e-7)


def test_the_logged_loss_is_the_mean_over_the_examples_of_the_interval():
    rec = Recorder()
    trainer = synth_trainer(n=10, batch_size=3, lr=0.0, epochs=2, log_every=2, callbacks=[rec])  # lr 0: a, b stay 0
    trainer.fit()
    assert [step for step, _ in rec.logs] == [2, 4, 6]  # every log_every steps, and the last step
    data, sampler = SynthData(10), EpochBatchSampler(10, 3, shuffle=True, seed=0)
    batches = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches += list(sampler)  # sizes 3, 3, 4 per epoch
    for k, (_, loss) in enumerate(rec.logs):
        idx = [i for batch in batches[2 * k:2 * k + 2] for i in batch]
        assert loss == pytest.approx(float((data.y[idx] ** 2).mean()), rel=1e-6)  # not a mean of batch means


def _poisoned(grad: bool = False):
    """Non-finite on every training batch holding example 0: its loss, or (``grad``) only its gradient."""

    class Poisoned(SquaredError):
        def forward(self, model, batch):
            out = super().forward(model, batch)
            if model.training and (batch["index"] == 0).any():
                if grad:  # d/da sqrt(|a - a|) at 0 is not finite; the value is 0
                    out["loss_sum"] = out["loss_sum"] + (model.a - model.a.detach()).abs().sqrt()
                else:
                    out["loss_sum"] = out["loss_sum"] * float("nan")
            return out

    return Poisoned()


def test_a_nonfinite_loss_stops_with_the_batch_records():
    trainer = synth_trainer(task=_poisoned(), epochs=2)
    with pytest.raises(TuneforgeError, match=r"non-finite loss at step \d \(batch records: .*row 1\b.*on_nonfinite: skip"):
        trainer.fit()


def test_a_nonfinite_gradient_norm_stops_too():
    trainer = synth_trainer(task=_poisoned(grad=True), max_grad_norm=1.0)
    with pytest.raises(TuneforgeError, match="non-finite gradient norm"):
        trainer.fit()


def test_nonfinite_steps_are_skipped_and_counted():
    trainer = synth_trainer(task=_poisoned(), epochs=2, on_nonfinite="skip", grad_accum=2)
    state = trainer.fit()
    # one poisoned group per epoch; skipped steps are not counted, so the run goes on into more epochs
    assert len(state.skipped_nonfinite) == state.epoch + (state.micro > 0) > 2
    assert all("row 1" in s["records"] for s in state.skipped_nonfinite)
    assert state.step == trainer.plan.total_steps and all(math.isfinite(v) for v in params(trainer))


@pytest.mark.parametrize("cfg,steps", [
    ({"epochs": 3}, [3, 6, 9]),                     # once per epoch; no second look at the last step
    ({"epochs": 1.5}, [3, 5]),                      # an epoch's end, then the final weights
    ({"epochs": 3, "eval_every": 2}, [2, 4, 6, 8, 9]),
    ({"max_steps": 4, "eval_every": 2}, [2, 4]),
    ({"max_steps": 4, "eval_every": 3}, [3, 4]),
])
def test_evaluations_follow_the_schedule_and_always_judge_the_final_weights(cfg, steps):
    rec = Recorder()
    state = synth_trainer(n=10, batch_size=3, callbacks=[rec], **cfg).fit()  # 3 steps per epoch
    assert [e["step"] for e in state.evals] == [step for step, _ in rec.evals] == steps


@pytest.mark.parametrize("stop", [1, 2, 3, 5])  # mid-epoch, at an epoch's end, mid-interval of the loss log
def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_does(stop, tmp_path):
    def schedule(optimizer, plan):
        return build_scheduler(optimizer, "linear", plan.total_steps, 0.2)

    kw = {"n": 10, "batch_size": 3, "momentum": 0.9, "epochs": 3, "grad_accum": 2, "log_every": 2,
          "scheduler": schedule}  # 2 steps per epoch (groups of 6 and 4 examples), 6 in all
    full_rec = Recorder()
    full = synth_trainer(callbacks=[full_rec], **kw)
    full.fit()

    first_rec = Recorder()
    first = synth_trainer(callbacks=[first_rec, StopAt(stop), ResumeCheckpoint(tmp_path)], **kw)
    first.fit()
    assert first.state.step == stop
    if first.state.last_checkpoint_step != stop:  # an epoch's evaluation saved one; else, as the run does:
        first.save_resumable()  # a checkpoint now, after the interrupt
    path = tmp_path / f"step-{stop:08d}"
    assert verify_checkpoint(path) is None

    rec = Recorder()
    second = synth_trainer(callbacks=[rec, ResumeCheckpoint(tmp_path)], **kw)
    second.restore(load_resumable(path, second.model, second.optimizer, second.scheduler, second.scaler))
    restore_rng(path)
    second.fit()
    assert params(second) == params(full)  # exactly
    assert first_rec.logs + rec.logs == full_rec.logs  # the pending training loss came back too
    assert [(e["step"], e["loss"]) for e in second.state.evals] == [(e["step"], e["loss"]) for e in full.state.evals]
    assert second.state.examples == full.state.examples


def test_callbacks_run_in_declared_order_and_keep_their_state_by_class_name():
    seen = []

    class Late(Callback):
        order = CHECKPOINT

        def on_step_end(self, trainer):
            seen.append("late")

    class Early(Callback):
        order = LOG

        steps = 0

        def on_step_end(self, trainer):
            seen.append("early")
            self.steps += 1

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.restored = state

    class Observer(Callback):  # the default order, between the two
        def on_step_end(self, trainer):
            seen.append("observer")

        def track(self, iterable, total, description):
            seen.append(f"track {description} {total}")
            return iterable

    trainer = synth_trainer(callbacks=[Late(), Observer(), Early()], max_steps=1)
    trainer.fit()
    assert seen[:4] == ["early", "observer", "late", "track validation 3"]
    meta = trainer.checkpoint_meta()
    assert meta["callbacks"] == {"Early": {"steps": 1}}  # only callbacks with state, keyed by class name
    again = synth_trainer(callbacks=[Early()], max_steps=1)
    again.restore(meta)
    assert again.callbacks[0].restored == {"steps": 1}


def test_a_recorded_event_reaches_the_callbacks():
    rec = Recorder()
    trainer = synth_trainer(callbacks=[rec])
    trainer.record({"event": "unfreeze", "step": 0})
    assert rec.records == [{"event": "unfreeze", "step": 0}]
