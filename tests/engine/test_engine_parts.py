from __future__ import annotations

import pytest
import torch

from tuneforge.data.batching import EpochBatchSampler
from tuneforge.engine.checkpoint import load_checkpoint_weights, save_checkpoint
from tuneforge.engine.optim import schedule_fn
from tuneforge.engine.precision import resolve_precision
from tuneforge.errors import TuneforgeError


def test_schedules_warm_up_then_decay():
    lin = schedule_fn("linear", total_steps=100, warmup_steps=10)
    assert lin(0) == pytest.approx(0.1) and lin(9) == pytest.approx(1.0)
    assert lin(55) == pytest.approx(0.5) and lin(100) == pytest.approx(0.0)
    cos = schedule_fn("cosine", 100, 0)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-9)
    assert schedule_fn("constant", 100, 5)(80) == 1.0


def test_sampler_is_seeded_per_epoch_and_covers_everything():
    s = EpochBatchSampler(103, 10, shuffle=True, seed=1)
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    s.set_epoch(0)
    assert list(s) == a and a != b
    assert sorted(i for batch in a for i in batch) == list(range(103))


def test_sampler_never_yields_a_batch_of_one():
    for group in (False, True):
        s = EpochBatchSampler(21, 4, shuffle=True, seed=0, lengths=list(range(21)), group_by_length=group)
        batches = list(s)
        assert min(map(len, batches)) > 1 and len(batches) == len(s)
        assert sorted(i for b in batches for i in b) == list(range(21))


def test_length_grouping_cuts_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 60, (2000,), generator=g).tolist()

    def padded(group: bool) -> int:
        s = EpochBatchSampler(2000, 32, shuffle=True, seed=0, lengths=lengths, group_by_length=group)
        return sum(len(b) * max(lengths[i] for i in b) for b in s)

    assert padded(True) < 0.7 * padded(False)


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(TuneforgeError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)


def test_checkpoint_is_atomic_and_round_trips(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model[0].weight.requires_grad_(False)
    save_checkpoint(tmp_path / "best", model, meta={"step": 3})
    saved = set(__import__("safetensors.torch").torch.load_file(str(tmp_path / "best" / "trainable.safetensors")))
    assert "0.weight" not in saved and {"0.bias", "1.running_mean"} <= saved  # trainable + buffers only
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].bias.add_(1.0)
    assert load_checkpoint_weights(tmp_path / "best", model)["step"] == 3
    assert all(original[k].equal(v) for k, v in model.state_dict().items())
    save_checkpoint(tmp_path / "best", model, meta={"step": 4})  # replacing leaves no temp dirs behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_gradient_accumulation_matches_one_big_batch(tiny_bert_dir, tmp_path):
    """bs 8 x accum 1 and bs 4 x accum 2 see the same 8 examples and take the same step."""
    from safetensors.torch import load_file

    from helpers import text_recipe, write_text_csv
    from tuneforge import finetune

    train = write_text_csv(tmp_path / "train.csv", n=40)
    heads = []
    for bs, accum in ((8, 1), (4, 2)):
        run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / f"run{accum}", "linear-probe",
                                   task={"head_dropout": 0.0},
                                   train={"batch_size": bs, "grad_accum": accum, "max_steps": 1, "warmup": 0,
                                          "group_by_length": False, "max_grad_norm": None, "lr": 1e-2}))
        heads.append(load_file(str(run.path / "model" / "trainable.safetensors")))  # linear-probe: the head
    for k in heads[0]:
        torch.testing.assert_close(heads[0][k], heads[1][k], rtol=1e-5, atol=1e-6)


def test_speed_figures_are_measured(tiny_bert_dir, tmp_path, real_matmul_peak):
    import json

    from helpers import text_recipe, write_text_csv
    from tuneforge import finetune

    train = write_text_csv(tmp_path / "train.csv", n=40)
    flops = {}
    for name in ("full", "linear-probe"):
        run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / name, name,
                                   train={"log_every": 2, "cache_activations": "off"}))
        timings = json.loads((run.path / "manifest.json").read_text())["timings"]
        assert timings["tokens_per_s"] > 0 and 0 <= timings["padding_fraction"] < 1
        assert 0 < timings["mfu"] < 1 and timings["peak_rss_mb"] > 100
        events = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
        assert all("tokens_per_s" in e and "mfu" in e for e in events if e["event"] == "train")
        flops[name] = timings["train_flops_per_token"]
    # counted, not estimated: a frozen backbone does no backward work, so far fewer FLOPs
    assert flops["linear-probe"] < 0.6 * flops["full"]


def test_measuring_the_matmul_peak_leaves_the_training_rng_alone(tmp_path, monkeypatch):
    from tuneforge.engine.throughput import measure_matmul_peak

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))  # force a fresh measurement
    before = torch.get_rng_state()
    assert measure_matmul_peak(torch.device("cpu"), torch.float32, n=256, repeats=2) > 0
    assert torch.equal(before, torch.get_rng_state())


def test_depthwise_convolution_backward_flops_are_not_counted_as_dense():
    from torch.utils.flop_counter import FlopCounterMode

    from tuneforge.engine.throughput import count_train_flops

    class Task:
        def forward(self, model, batch):
            return {"loss_sum": model(batch["x"]).sum(), "count": 1}

    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False))
    x = torch.randn(2, 16, 8, 8)
    with FlopCounterMode(display=False) as fwd:
        model(x)
    train = count_train_flops(model, Task(), {"x": x}, __import__("contextlib").nullcontext)
    # dense conv: weight grad only (input needs none); depthwise: input + weight grads
    dense, depthwise = 2 * 16 * 16 * 9 * 64 * 2, 2 * 16 * 9 * 64 * 2
    assert fwd.get_total_flops() == dense + depthwise
    assert train == 2 * dense + 3 * depthwise


@pytest.mark.parametrize("first,second,kept", [(10.0, 30.0, 30.0), (30.0, 10.0, 30.0)])
def test_the_mfu_yardstick_keeps_the_higher_of_two_peak_measurements(monkeypatch, first, second, kept):
    # A peak caught while the machine was busy is too low and would flatter MFU; a second
    # look after training keeps the higher figure.
    from tuneforge.engine import throughput
    from tuneforge.engine.mfu import MFU

    monkeypatch.setattr(throughput, "measure_matmul_peak", lambda device, dtype: second)
    mfu = MFU(torch.device("cpu"))
    mfu.peak_flops = first
    mfu.remeasure_peak()
    assert mfu.peak_flops == kept
