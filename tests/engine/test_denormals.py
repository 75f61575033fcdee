"""train.flush_denormal: subnormal floats are flushed to zero on CPU while a run trains and
evaluates, in every intra-op thread, and the previous setting is back afterwards."""

from __future__ import annotations

import pytest
import sklearn.metrics  # noqa: F401 - loaded as in a run: a second libgomp, with threads of its own
import torch

from helpers import text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.engine.denormals import flush_denormals, flushed, set_flush_denormal
from tuneforge.engine.trainer import Trainer

CPU = torch.device("cpu")
SUPPORTED = torch.set_flush_denormal(False)  # False where the CPU cannot flush (the setting stays off)
needs_support = pytest.mark.skipif(not SUPPORTED, reason="this CPU cannot flush denormals")


def subnormal_survives() -> bool:
    return bool(torch.tensor(1e-40) * 1 != 0)


def flushed_share() -> float:
    """Share of products that underflow to subnormals and come out zero, in an operation
    large enough to be split across the intra-op threads: 1.0 only if every thread flushes,
    0.0 only if none does."""
    a = torch.full((1 << 20,), 1e-20)
    return float(((a * a) == 0).float().mean())


@pytest.fixture(autouse=True)
def _two_threads_and_off_around_each_test():
    threads = torch.get_num_threads()  # one in this suite (conftest)
    torch.set_num_threads(2)  # an intra-op thread besides this one, whatever the machine
    set_flush_denormal(False)
    yield
    set_flush_denormal(False)  # every thread, as the rest of the suite expects
    torch.set_num_threads(threads)


@needs_support
def test_context_flushes_everywhere_and_restores():
    assert subnormal_survives() and flushed_share() == 0.0
    with flush_denormals(CPU) as on:
        assert on and flushed() and not subnormal_survives()
        assert flushed_share() == 1.0  # the intra-op threads too, not only this one
        with flush_denormals(CPU):  # nested (evaluation inside fit): the outer block owns the setting
            pass
        assert flushed() and flushed_share() == 1.0
    assert subnormal_survives() and not flushed() and flushed_share() == 0.0


def test_context_off_or_on_gpu_changes_nothing():
    with flush_denormals(CPU, on=False) as on:
        assert on is False and subnormal_survives()
    with flush_denormals(torch.device("cuda"), on=True) as on:
        assert on is False and subnormal_survives()


@needs_support
def test_a_setting_already_on_is_left_on():
    torch.set_flush_denormal(True)
    with flush_denormals(CPU):
        assert flushed()
    assert flushed()  # the caller's own setting: not ours to turn off


@pytest.mark.parametrize("flush", [True, False])
def test_the_run_flushes_training_and_the_final_evaluation_and_restores(flush, tiny_bert_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """The run enters the setting (run/finetune.py), around Trainer.fit and the final evaluation."""
    from tuneforge.engine import trainer as trainer_module

    seen, evaluations = [], []
    fire, evaluate = Trainer.fire, trainer_module.evaluate_loader

    def recording_fire(self, event, *args):
        if event in ("on_step_end", "on_eval_end"):
            seen.append((flushed(), flushed_share()))
        return fire(self, event, *args)

    def recording_evaluate(*args, **kwargs):
        evaluations.append((flushed(), flushed_share()))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(Trainer, "fire", recording_fire)
    monkeypatch.setattr(trainer_module, "evaluate_loader", recording_evaluate)
    train = write_text_csv(tmp_path / "train.csv", n=16)
    assert subnormal_survives()  # off before the run
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", train={"epochs": 1, "flush_denormal": flush}))
    assert seen and len(evaluations) == len(run.history) + 1  # the evaluations in training, then the final one
    on = flush and SUPPORTED
    assert all(s == (on, float(on)) for s in seen + evaluations), (seen, evaluations)
    assert subnormal_survives() and flushed_share() == 0.0  # restored after the run
    assert ("denormals: flushed to zero" in capsys.readouterr().err) == flush


@needs_support
def test_the_trainer_itself_leaves_the_setting_alone():
    """Flushing is the run's to enter: a Trainer used on its own trains as the caller set things."""
    from synth import synth_trainer

    from tuneforge.engine.callbacks import Callback

    seen = []

    class Look(Callback):
        def on_step_end(self, trainer):
            seen.append(flushed())

    synth_trainer(callbacks=[Look()]).fit()
    assert seen == [False] * len(seen) and seen
