"""GRPO (``task.type: grpo``) on the tiny random Llama: the math (group-normalised advantages,
the k3 KL, the loss's gradient), the rewards (built-ins, the user's own file and only from a
named path, errors that name the function), and whole runs: the held-out reward rises, KL is 0
before the first update, LoRA and full both run, a run is reproducible from its seed, resumes
after a crash, and answers through `tuneforge generate`. One slow test on SmolLM2 when present."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from helpers import simulate_crash
from tuneforge import finetune
from tuneforge.errors import TuneforgeError
from tuneforge.llm.rewards import build_rewards, extract
from tuneforge.llm.tiny import make_tiny_lm
from tuneforge.recipe import load_recipe
from tuneforge.llm.policy import group_advantages, k3_kl, token_loss
from tuneforge.llm.verifiable import addition_problems, write_addition_data
from tuneforge.tasks.grpo import RewardSpec

SMOLLM2 = "smollm2-135m"  # the built-in alias (make install installs it)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


# The toy verifiable task a random model can learn by sampling: the completion contains an "e".
# Its greedy completions (seed 0) contain none: the held-out reward starts at 0.
HAS_E = {"type": "regex", "pattern": "e", "name": "has_e"}


def _recipe(tiny, out, strategy="full", task=None, train=None, **sections):
    return {"model": {"name": str(tiny)},
            "task": {"type": "grpo", "group_size": 8, "max_new_tokens": 4, "max_length": 64, "beta": 0.04,
                     "rewards": [HAS_E], "eval_samples": 4, **(task or {})},
            "data": {"train": str(tiny / "grpo-train.jsonl"), "validation": str(tiny / "grpo-val.jsonl")},
            "strategy": {"name": strategy},
            "train": {"max_steps": 8, "eval_every": 8, "batch_size": 4, "lr": 1e-2, "warmup": 0.0, "log_every": 1,
                      "precision": "fp32", "progress": False, **(train or {})},
            "output": {"dir": str(out), "report": False}, **sections}


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


# --------------------------------------------------------------------------- the math

def test_advantages_are_group_normalised():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 1.0, 2.0, 6.0]])
    adv = group_advantages(rewards, scale=True, eps=0.0)
    for row, r in zip(adv, rewards):  # by hand: (r - mean) / sample std, per group
        mean = sum(r.tolist()) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r.tolist()) / 3)
        expected = [(x - mean) / std if std else 0.0 for x in r.tolist()]
        assert row.tolist() == pytest.approx(expected, abs=1e-6) or std == 0
    assert group_advantages(rewards)[1].tolist() == [0.0] * 4  # a group that scores alike teaches nothing
    assert group_advantages(rewards).sum(1).abs().max() < 1e-5  # centred in every group
    unscaled = group_advantages(rewards, scale=False)  # Dr. GRPO: r - mean only
    assert unscaled[2].tolist() == pytest.approx([0.0, -2.0, -1.0, 3.0])
    # the same reward shifted and scaled within a group gives the same advantages
    assert torch.allclose(group_advantages(rewards[2:] * 10 + 7), group_advantages(rewards[2:]), atol=1e-4)


def test_k3_kl_matches_a_hand_computation_and_the_loss_gradient():
    logp = torch.tensor([-1.0, -2.5, -0.1, -3.0])
    ref = torch.tensor([-1.5, -2.0, -0.1, -0.5])
    hand = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert k3_kl(logp, ref).tolist() == pytest.approx(hand, rel=1e-6)
    assert k3_kl(logp, ref)[2] == 0 and (k3_kl(logp, ref) >= 0).all()
    # the policy-gradient term: value -A, gradient -A d(logp) (ratio 1: one update per rollout)
    x = logp.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    loss, kl = token_loss(x, adv, None, beta=0.0)
    assert kl is None and loss.tolist() == pytest.approx((-adv).tolist())
    loss.sum().backward()
    assert x.grad.tolist() == pytest.approx((-adv).tolist())
    x.grad = None
    loss, kl = token_loss(x, adv, ref, beta=0.5)
    loss.sum().backward()  # d/dlogp of beta * k3 = beta * (1 - exp(ref - logp))
    expected = [-a + 0.5 * (1 - math.exp(r - p)) for a, p, r in zip(adv.tolist(), logp.tolist(), ref.tolist())]
    assert x.grad.tolist() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- rewards

def _rewards(*specs, paths=(), max_new_tokens=10):
    return build_rewards([RewardSpec(**s) for s in specs], list(paths), max_new_tokens)


def test_builtin_rewards():
    exact, regex, fmt, length = _rewards(
        {"type": "exact_match", "pattern": r"Answer:\s*(-?\d+)"}, {"type": "regex", "pattern": r"\d"},
        {"type": "format", "pattern": r"Answer: \d+"}, {"type": "length_penalty", "free_tokens": 4})
    texts = ["Answer: 57", "I think 12. Answer: 057.0?", "Answer: 56", "no idea", " Answer: 57 \n"]
    records = [{"answer": "57"}, {"answer": 57}, {"answer": "57"}, {"answer": "57"}, {"answer": "57"}]
    wheres = [f"row {i}" for i in range(5)]
    tokens = [3, 4, 6, 10, 12]
    # "057" (group 1 of the last match) is 57 by value, against the integer 57 of the record
    assert exact.score(texts, tokens, records, wheres) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert extract("12 then Answer: 5 and Answer: 7", re.compile(r"Answer: (\d)")) == "7"  # the last match
    assert extract("Answer 5", re.compile(r"Answer: (\d)")) is None and extract(" x ", None) == "x"
    assert regex.score(texts, tokens, records, wheres) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert fmt.score(texts, tokens, records, wheres) == [1.0, 0.0, 1.0, 0.0, 1.0]  # stripped, then fullmatch
    assert length.score(texts, tokens, records, wheres) == pytest.approx([0, 0, -2 / 6, -1.0, -1.0])
    (number,) = _rewards({"type": "exact_match", "pattern": r"(-?[\d.]+)"})
    assert number.score(["= 57.0", "570", "57.5"], [1, 1, 1], [{"answer": 57}] * 3, ["r"] * 3) == [1.0, 0.0, 0.0]
    names = [r.name for r in _rewards({"type": "exact_match"}, {"type": "exact_match"}, {"type": "regex",
                                                                                       "pattern": "x", "name": "x"})]
    assert names == ["exact_match", "exact_match_2", "x"]


def test_user_reward_loads_only_from_a_named_file(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def count_e(completion, record):\n    return completion.count('e') + len(record['answer'])\n"
        "def broken(completion, record):\n    raise KeyError('nope')\n"
        "def wordy(completion, record):\n    return 'many'\n")
    (fn,) = _rewards({"type": "function", "function": "my_rewards:count_e"}, paths=[tmp_path / "my_rewards.py"])
    assert fn.name == "count_e" and fn.score(["eee"], [3], [{"answer": "ab"}], ["r"]) == [5.0]
    with pytest.raises(TuneforgeError, match=r"no file my_rewards.py is listed in task.reward_paths"):
        _rewards({"type": "function", "function": "my_rewards:count_e"})  # no path: nothing is imported
    with pytest.raises(TuneforgeError, match=r"names module 'json'.*never from installed modules"):
        _rewards({"type": "function", "function": "json:loads"}, paths=[tmp_path / "my_rewards.py"])
    with pytest.raises(TuneforgeError, match=r"must be 'module:function'"):
        _rewards({"type": "function", "function": "my_rewards.count_e"}, paths=[tmp_path / "my_rewards.py"])
    with pytest.raises(TuneforgeError, match=r"defines no function 'nothing' \(its functions: broken, count_e, "
                                             r"wordy\)"):
        _rewards({"type": "function", "function": "my_rewards:nothing"}, paths=[tmp_path / "my_rewards.py"])
    (broken,) = _rewards({"type": "function", "function": "my_rewards:broken"}, paths=[tmp_path / "my_rewards.py"])
    with pytest.raises(TuneforgeError, match=r"reward broken in .*my_rewards.py raised KeyError: 'nope' — on the "
                                             r"completion 'hello there' of train.jsonl line 3"):
        broken.score(["hello there"], [2], [{}], ["train.jsonl line 3"])
    (wordy,) = _rewards({"type": "function", "function": "my_rewards:wordy"}, paths=[tmp_path / "my_rewards.py"])
    with pytest.raises(TuneforgeError, match=r"reward wordy in .*returned 'many' \(str\) for the completion 'x' of r;"):
        wordy.score(["x"], [1], [{}], ["r"])


def test_recipe_resolves_reward_paths_against_its_folder_and_refuses_unnamed_modules(tiny, tmp_path):
    import yaml

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "scores.py").write_text("def f(completion, record):\n    return 1.0\n")
    recipe = _recipe(tiny, tmp_path / "run", task={"rewards": [{"type": "function", "function": "scores:f"}],
                                                  "reward_paths": ["./scores.py"]})
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(folder / "r.yaml")  # from another working directory: relative to the recipe
    assert loaded.task.reward_paths == [str(folder / "scores.py")]
    assert loaded.train.metric_for_best == "reward" and not loaded.train.minimize
    recipe["task"]["reward_paths"] = []
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TuneforgeError, match=r"task.rewards\[0\]: reward function 'scores:f' names module 'scores'"):
        load_recipe(folder / "r.yaml")
    recipe["task"]["rewards"] = [{"type": "regex"}]
    with pytest.raises(TuneforgeError, match=r"reward type regex needs a pattern"):
        load_recipe(recipe)


def test_addition_data_is_deterministic_and_disjoint(tmp_path):
    train, held_out = addition_problems(300, 50, seed=3)
    assert (train, held_out) == addition_problems(300, 50, seed=3) and train != addition_problems(300, 50, seed=4)[0]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert all(int(r["answer"]) == sum(map(int, re.findall(r"\d+", r["prompt"])[:2])) for r in train)
    paths = write_addition_data(tmp_path, 10, 5, seed=0)
    assert len(Path(paths["validation"]).read_text().splitlines()) == 5


def test_bad_record_names_the_row_and_the_field(tiny, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "reverse ab =", "answer": "ba"}\n{"prompt": "reverse cd ="}\n')
    recipe = _recipe(tiny, tmp_path / "run", task={"rewards": [{"type": "exact_match"}]})
    recipe["data"] = {"train": str(data), "validation": str(data)}
    with pytest.raises(TuneforgeError, match=r"bad.jsonl line 2: reward exact_match compares with the field 'answer'"):
        finetune(recipe)


# --------------------------------------------------------------------------- whole runs

def test_grpo_raises_the_held_out_reward_reproducibly_and_generate_works(tiny, tmp_path, capsys):
    (tmp_path / "extra.py").write_text("def chars(completion, record):\n    return len(completion)\n")
    extra = {"rewards": [HAS_E, {"type": "function", "function": "extra:chars", "weight": 0.0}],
             "reward_paths": [str(tmp_path / "extra.py")]}  # a user reward in a real run, reported, unweighted
    first = finetune(_recipe(tiny, tmp_path / "a", task=extra))
    grpo = first.metrics["generation"]
    before, after = grpo["before_training"], first.metrics["validation"]
    assert before["reward"] <= 0.1 and after["reward"] >= before["reward"] + 0.5, (before, after)
    rollouts = _events(first.path, "rollout")
    assert [r["step"] for r in rollouts] == list(range(1, 9))
    assert rollouts[-1]["reward"] > rollouts[0]["reward"]  # the sampled (training) reward rises too
    # KL to the reference (a frozen copy of the starting weights) is 0 before the first update
    assert rollouts[0]["kl"] == 0.0 and before["kl"] == 0.0 and after["kl"] > 0
    assert _events(first.path, "baseline")[0]["reward"] == before["reward"]
    manifest = json.loads((first.path / "manifest.json").read_text())
    timings = manifest["task_settings"]["rollout"]
    assert timings["rollout_s"] > 0 and timings["update_s"] > 0 and timings["completions"] == 8 * 4 * 8
    assert sum(r["completions"] for r in rollouts) == timings["completions"]
    assert manifest["task_settings"]["reference"] == "a frozen copy of the starting weights"
    assert len((first.path / "generations.jsonl").read_text().splitlines()) == 4
    # the same seed, the same run: every rollout's figures and the final held-out metrics
    assert "reward_chars" in after and rollouts[0]["reward_chars"] > 0
    again = finetune(_recipe(tiny, tmp_path / "b", task=extra))
    drop = ("rollout_s", "reference_s", "update_s", "rollout_tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in _events(again.path, "rollout")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rollouts]
    assert {k: v for k, v in again.metrics["validation"].items() if k != "eval_seconds"} == \
        {k: v for k, v in after.items() if k != "eval_seconds"}

    from tuneforge.cli import main

    (tmp_path / "extra.py").unlink()  # generating needs no reward file
    assert main(["generate", str(first.path), "--prompt", "reverse abc =", "--max-new-tokens", "4"]) == 0
    assert "e" in capsys.readouterr().out  # the tuned model's greedy reply now holds an "e"


def test_lora_runs_with_the_base_as_reference_and_resumes_after_a_crash(tiny, tmp_path):
    recipe = _recipe(tiny, tmp_path / "run", strategy="lora", train={"max_steps": 6, "eval_every": 3,
                                                                      "save_every": 2, "keep_checkpoints": 5})
    recipe["strategy"].update(rank=8)
    recipe["output"]["keep_resumable"] = True
    done = finetune(recipe)
    rollouts = _events(done.path, "rollout")
    assert rollouts[0]["kl"] == 0.0  # LoRA starts as the base (B = 0), which is the reference
    manifest = json.loads((done.path / "manifest.json").read_text())
    assert manifest["task_settings"]["reference"] == "adapters disabled"
    assert done.metrics["validation"]["reward"] > done.metrics["generation"]["before_training"]["reward"]

    simulate_crash(done.path, after_step=2)
    resumed = finetune(recipe, resume=str(done.path))
    assert json.loads((done.path / "manifest.json").read_text())["status"] == "completed"
    # the sampling seed comes from torch's generator, saved in every checkpoint: the resumed
    # steps sample the same completions, so their rewards and the final metrics are the same
    drop = ("rollout_s", "reference_s", "update_s", "rollout_tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in _events(done.path, "rollout")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rollouts]
    assert resumed.metrics["validation"]["reward"] == done.metrics["validation"]["reward"]
    totals = json.loads((done.path / "manifest.json").read_text())["task_settings"]["rollout"]
    assert totals["completions"] == 6 * 4 * 8  # the steps before the crash counted once, from the checkpoint


def test_beta_zero_needs_no_reference_and_sequence_aggregation_runs(tiny, tmp_path):
    run = finetune(_recipe(tiny, tmp_path / "run", task={"beta": 0.0, "loss_aggregation": "sequence",
                                                         "scale_rewards": False},
                           train={"max_steps": 2, "eval_every": 2}))
    assert "kl" not in run.metrics["validation"] and "kl" not in _events(run.path, "rollout")[0]
    assert json.loads((run.path / "manifest.json").read_text())["task_settings"]["reference"] == "none"


@pytest.mark.slow
def test_smollm2_lora_grpo_steps(tmp_path):
    """Two GRPO steps of LoRA on the real SmolLM2-135M-Instruct (minutes on a busy CPU)."""
    paths = write_addition_data(tmp_path / "data", 8, 4, seed=0)
    recipe = {"model": {"name": SMOLLM2},
              "task": {"type": "grpo", "group_size": 2, "max_new_tokens": 8, "eval_samples": 2,
                       "rewards": [{"type": "exact_match", "pattern": r"(-?\d+)"},
                                   {"type": "format", "pattern": r"Answer: -?\d+", "weight": 0.5}]},
              "data": {"train": paths["train"], "validation": paths["validation"]},
              "strategy": {"name": "lora"},
              "train": {"max_steps": 2, "batch_size": 2, "eval_batch_size": 4, "lr": 1e-4, "log_every": 1,
                        "progress": False},
              "output": {"dir": str(tmp_path / "run"), "report": False}}
    run = finetune(recipe)
    rollouts = _events(run.path, "rollout")
    assert len(rollouts) == 2 and rollouts[0]["kl"] == 0.0 and rollouts[0]["completion_tokens"] > 0
    assert set(run.metrics["validation"]) >= {"reward", "reward_exact_match", "reward_format", "kl"}
