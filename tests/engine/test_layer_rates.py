"""Discriminative learning rates (layer_decay, lr_range) for every strategy, read back from the
optimizer itself; and the gradual-unfreeze schedule: stages, eval modes, re-warmup, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import simulate_crash, text_recipe, write_text_csv
from tuneforge import finetune
from tuneforge.engine.checkpoint import newest_valid
from tuneforge.engine.optim import build_optimizer
from tuneforge.engine.plan import TrainPlan
from tuneforge.errors import TuneforgeError
from tuneforge.models import load_model
from tuneforge.models.info import group_param_names
from tuneforge.recipe import load_recipe
from tuneforge.strategies import get_strategy
from tuneforge.strategies.base import param_groups
from tuneforge.tasks.base import Classifier


def _setup(tiny_bert_dir, strategy: dict, train: dict):
    loaded = load_model(str(tiny_bert_dir))
    torch.manual_seed(0)
    model = Classifier(loaded.backbone, loaded.info.feature_dim, 2, "text")
    recipe = load_recipe({"strategy": strategy, "train": train})
    s = get_strategy(recipe.strategy)
    model = s.apply(model, loaded.info)
    will = getattr(s, "will_train", None)
    groups = param_groups(model, loaded.info, recipe.train, will(model) if will else None)
    return model, loaded, build_optimizer(groups, torch.device("cpu"))


def _lr_of(optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def _expected(loaded, name: str, per_group: list[float], head: float) -> float:
    """The rate a parameter must get, from ModelInfo layer groups (independently of param_groups)."""
    if "task_head" in name:
        return head
    path = name.split("backbone.", 1)[1]
    for i, names in enumerate(group_param_names(loaded.backbone, loaded.info.layer_groups)):
        base = path.replace(".base_layer", "")
        if any(base == n or base.startswith(n.rsplit(".", 1)[0] + ".") for n in names):
            return per_group[i]
    raise AssertionError(f"{name} is in no layer group")


@pytest.mark.parametrize("strategy", [{"name": "full"}, {"name": "partial", "layers": 2}, {"name": "lora", "rank": 2}])
def test_layer_decay_reaches_the_optimizer(strategy, tiny_bert_dir):
    model, loaded, opt = _setup(tiny_bert_dir, strategy, {"lr": 1e-3, "head_lr": 5e-3, "layer_decay": 0.5})
    n = len(loaded.info.layer_groups)
    assert n == 3  # embeddings, layer 0, layer 1 (+pooler)
    per_group = [1e-3 * 0.5 ** (n - i) for i in range(n)]  # BEiT: group i of n gets lr * decay^(n-i)
    lrs = _lr_of(opt)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert {id(p) for _, p in trainable} == set(lrs)  # every trainable parameter is held, nothing else
    for name, p in trainable:
        assert lrs[id(p)] == pytest.approx(_expected(loaded, name, per_group, 5e-3)), name
    assert len({round(v, 12) for v in lrs.values()}) > 2  # really different rates, not one per side


def test_lr_range_is_geometric_from_stem_to_top(tiny_bert_dir):
    model, loaded, opt = _setup(tiny_bert_dir, {"name": "full"}, {"lr_range": [1e-5, 1e-3]})
    lrs = _lr_of(opt)
    emb = model.backbone.embeddings.word_embeddings.weight
    top = model.backbone.encoder.layer[1].output.dense.weight
    mid = model.backbone.encoder.layer[0].output.dense.weight
    assert lrs[id(emb)] == pytest.approx(1e-5) and lrs[id(top)] == pytest.approx(1e-3)
    assert lrs[id(mid)] == pytest.approx(1e-4)  # geometric midpoint of three groups
    assert lrs[id(model.task_head.weight)] == pytest.approx(1e-3)  # head defaults to hi


def test_conflicting_rate_options_are_refused():
    with pytest.raises(TuneforgeError, match="layer_decay and train.lr_range"):
        load_recipe({"train": {"layer_decay": 0.8, "lr_range": [1e-5, 1e-4]}})
    with pytest.raises(TuneforgeError, match="lo <= hi"):
        load_recipe({"train": {"lr_range": [1e-3, 1e-5]}})


def test_run_logs_and_records_each_groups_rate(tiny_bert_dir, tmp_path):
    from rich.console import Console

    train = write_text_csv(tmp_path / "train.csv", n=24)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=300)
    run = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", "full",
                               train={"epochs": 1, "layer_decay": 0.5, "lr": 1e-3, "log_every": 1}), console=console)
    console.file.close()
    log = (tmp_path / "log.txt").read_text()
    assert "learning rates:" in log and "0:embeddings" in log and "head 0.001" in log
    manifest = json.loads((run.path / "manifest.json").read_text())
    rates = {g["name"]: g["lr"] for g in manifest["param_groups"]}
    assert rates["backbone.0"] == pytest.approx(1e-3 * 0.5 ** 3) and rates["backbone.2"] == pytest.approx(5e-4)
    first = next(json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in line)
    assert {"backbone.0", "backbone.1", "backbone.2", "head"} <= set(first["lr"])
    assert first["lr"]["backbone.0"] < first["lr"]["backbone.2"] < first["lr"]["head"]


# --------------------------------------------------------------------------- gradual unfreeze

def _gradual(tiny_bert_dir, train, out, **options):
    return text_recipe(tiny_bert_dir, train, out, "gradual-unfreeze",
                       strategy={"steps_per_stage": 3, **options},
                       train={"epochs": 3, "batch_size": 6, "lr": 1e-3, "save_every": 1, "log_every": 2,
                              "deterministic": True, "keep_checkpoints": 50, "warmup": 0},
                       output={"keep_resumable": True})  # the tests read the periodic checkpoints afterwards


def test_gradual_unfreeze_schedule_and_frozen_weights(tiny_bert_dir, tmp_path):
    train = write_text_csv(tmp_path / "train.csv", n=32)  # 24 train rows, batch 6 -> 4 steps/epoch, 12 steps
    run = finetune(_gradual(tiny_bert_dir, train, tmp_path / "run", layers=2)).path
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    unfreezes = [(e["step"], e["groups"]) for e in events if e["event"] == "unfreeze"]
    assert unfreezes == [(3, [["encoder.layer.1", "pooler"]]), (6, [["encoder.layer.0"]])]
    # layers=2: the embeddings never unfreeze and stay bit-identical to the pretrained ones
    pretrained = load_file(str(tiny_bert_dir / "model.safetensors"))
    final = load_file(str(run / "model" / "backbone" / "model.safetensors"))
    assert final["embeddings.word_embeddings.weight"].equal(pretrained["embeddings.word_embeddings.weight"])
    # the last checkpoint (the final model is the best one, which may predate stage 2): layer 0 trained
    last = load_file(str(run / "checkpoints" / "step-00000012" / "trainable.safetensors"))
    key = "encoder.layer.0.output.dense.weight"
    assert not last["backbone." + key].equal(pretrained[key])
    assert not any(k.startswith("backbone.embeddings.") and "weight" in k and "LayerNorm" not in k for k in last)


def test_gradual_unfreeze_stage_modes_and_rewarmup(tiny_bert_dir):
    loaded = load_model(str(tiny_bert_dir))
    model = Classifier(loaded.backbone, loaded.info.feature_dim, 2, "text")
    s = get_strategy(load_recipe({"strategy": {"name": "gradual-unfreeze", "stage_warmup": 2}}).strategy)
    model = s.apply(model, loaded.info)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"task_head.weight", "task_head.bias"}
    s.set_train_mode(model)
    assert not model.backbone.encoder.layer[1].training
    new = s.set_stage(model, 1)
    assert new == [["backbone.encoder.layer.1", "backbone.pooler"]]
    s.set_train_mode(model)
    assert model.backbone.encoder.layer[1].training and not model.backbone.encoder.layer[0].training
    assert all(p.requires_grad for p in model.backbone.encoder.layer[1].parameters())
    assert not any(p.requires_grad for p in model.backbone.encoder.layer[0].parameters())

    plan = TrainPlan(micro_per_epoch=5, steps_per_epoch=5, total_steps=15)
    fn = s.wrap_schedule(lambda step: 1.0, plan)  # stages of 5 steps (epochs_per_stage defaults to 1)
    assert [fn(i) for i in range(12)] == [1, 1, 1, 1, 1, 0.5, 1, 1, 1, 1, 0.5, 1]


def test_gradual_unfreeze_resumes_in_the_right_stage(tiny_bert_dir, tmp_path):
    """Crash inside stage 1 (after layer 1 unfroze, before layer 0 does): the resumed run must
    unfreeze layer 1 again at once, layer 0 on time, and end bit-identical."""
    train = write_text_csv(tmp_path / "train.csv", n=32)
    recipe = _gradual(tiny_bert_dir, train, tmp_path / "reference", stage_warmup=2)
    reference = finetune(recipe).path
    recipe["output"]["dir"] = str(tmp_path / "crashed")
    crashed = finetune(recipe).path
    simulate_crash(crashed, after_step=5)
    assert newest_valid(crashed / "checkpoints").name == "step-00000005"
    finetune(recipe, resume=str(crashed))
    ref = load_file(str(reference / "model" / "backbone" / "model.safetensors"))
    got = load_file(str(crashed / "model" / "backbone" / "model.safetensors"))
    assert all(ref[k].equal(got[k]) for k in ref)
    drop = {"samples_per_s", "elapsed_s", "eval_seconds", "tokens_per_s", "padding_fraction", "mfu", "peak_rss_mb"}
    events = [[{k: v for k, v in json.loads(line).items() if k not in drop}
               for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (reference, crashed)]
    assert events[0] == events[1]
    assert sum(e["event"] == "unfreeze" for e in events[1]) == 3


def test_layer_decay_on_an_image_backbone(tiny_timm_weights):
    """timm groups (stem, blocks, head conv) drive the rates the same way; gradual-unfreeze's
    optimizer holds every group from the start, frozen ones included."""
    arch, weights = tiny_timm_weights
    loaded = load_model(arch, weights=str(weights))
    model = Classifier(loaded.backbone, loaded.info.feature_dim, 2, "image")
    recipe = load_recipe({"task": {"type": "image-classification"}, "model": {"name": arch},
                          "strategy": {"name": "gradual-unfreeze"}, "train": {"lr": 1e-2, "layer_decay": 0.5}})
    s = get_strategy(recipe.strategy)
    model = s.apply(model, loaded.info)
    opt = build_optimizer(param_groups(model, loaded.info, recipe.train, s.will_train(model)), torch.device("cpu"))
    n = len(loaded.info.layer_groups)
    rates = sorted({round(g["lr"], 12) for g in opt.param_groups if g["name"] != "head"
                    and not g["name"].startswith("head.")})
    assert rates == sorted(round(1e-2 * 0.5 ** (n - i), 12) for i in range(n))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}  # every parameter, though only the head trains yet
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"task_head.weight", "task_head.bias"}
