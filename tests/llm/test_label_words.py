"""A causal LM as a classifier by its own words (`task.classifier: label-words`): each label is
scored by the log-probability the LM gives to its words after the text and `task.label_prompt`.
Tiny Llama / GPT-2 models and a byte-level BPE tokenizer are built in the test (no downloads)."""

from __future__ import annotations

import pytest
import torch

from helpers import FILLER, NEG, POS, text_recipe, write_text_csv
from lmkit import make_lm, make_tokenizer
from tuneforge import finetune
from tuneforge.errors import TuneforgeError

PROMPT = "\nLabel:"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny decoder whose tokenizer has ' good' and ' bad' as single tokens."""
    directory = tmp_path_factory.mktemp("lw_llama")
    corpus = [" ".join(FILLER + POS + NEG)] * 5 + [f"{PROMPT} good", f"{PROMPT} bad"] * 5
    tok = make_tokenizer(directory, corpus, vocab_size=400)
    make_lm(directory, tok, hidden=32, layers=2, positions=64)
    return directory


def _task_and_model(model_dir, names, **task):
    """The label-words model exactly as a run builds it, untrained."""
    from tuneforge.models import load_model
    from tuneforge.recipe import recipe_from_dict
    from tuneforge.tasks import LabelMap, get_task

    recipe = recipe_from_dict({"model": {"name": str(model_dir)}, "task": {"classifier": "label-words", **task}})
    t = get_task(recipe)
    loaded = load_model(str(model_dir), causal_lm=True)
    t.attach(loaded)
    return t, t.build_model(loaded, LabelMap(names)).eval()


def _by_hand(model_dir, text: str, word: str) -> float:
    """log P(word | text + prompt) with the plain Hugging Face model, token by token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    context = tok(text + PROMPT)["input_ids"]
    full = tok(text + PROMPT + " " + word)["input_ids"]
    assert full[:len(context)] == context
    with torch.no_grad():
        logp = lm(torch.tensor([full])).logits.log_softmax(-1)[0]  # (T, V)
    return sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(full[len(context):]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("words", [{}, {"bad": "goodish", "meh": "excellent"}], ids=["one-token", "multi-token"])
def test_untrained_scores_are_the_lms_own_log_probs(tmp_path, family, words):
    """Zero-shot: untrained, the (B, C) scores are the LM's own log-probabilities of each label's
    words — one forward pass for single-token labels; teacher-forced for several tokens, where a
    label may share its first token with another ('goodish' starts like 'good')."""
    corpus = [" ".join(FILLER + POS + NEG)] * 5 + [f"{PROMPT} good", f"{PROMPT} bad"] * 5
    make_lm(tmp_path, make_tokenizer(tmp_path, corpus, vocab_size=400), family=family, hidden=32, layers=2,
            positions=64)
    names = ["bad", "good"] + (["meh"] if words else [])
    task, model = _task_and_model(tmp_path, names, label_words=words)
    lengths = [len(t) for t in model.label_ids]
    assert (max(lengths) > 1) == bool(words)
    texts = ["the movie was good", "bad awful film plot is really very boring"]  # padded batch
    with torch.no_grad():
        scores = model(**task.encode_inputs(texts))  # (B, C)
    assert scores.shape == (2, len(names))
    for b, text in enumerate(texts):
        for c, name in enumerate(names):
            assert scores[b, c].item() == pytest.approx(_by_hand(tmp_path, text, words.get(name, name)), abs=1e-4)


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_label_words_learns_and_the_saved_run_predicts_the_same(lm_dir, tmp_path, strategy):
    from tuneforge.deploy.evaluate import evaluate_run
    from tuneforge.deploy.export import export_run

    train = write_text_csv(tmp_path / "train.csv", n=40, labels=("good", "bad"))
    val = write_text_csv(tmp_path / "val.csv", n=32, seed=5, labels=("good", "bad"))
    recipe = text_recipe(lm_dir, train, tmp_path / "run", strategy, task={"classifier": "label-words"},
                         data={"validation": str(val)}, train={"epochs": 3, "lr": 3e-3}, output={"report": False})
    if strategy == "lora":  # the LM head stays frozen: the adapters alone move the label words' scores
        recipe["train"]["lr"] = 1e-2
        recipe["strategy"]["dropout"] = 0.0
    run = finetune(recipe)
    metrics = run.metrics["validation"]
    assert metrics["accuracy"] >= 0.8  # chance is 0.5
    for key in ("precision_macro", "recall_macro", "f1_macro", "confusion_matrix", "per_class", "roc_auc"):
        assert key in metrics
    assert sum(map(sum, metrics["confusion_matrix"])) == 32
    # the saved run, loaded back, does on the validation file exactly what the trained model did
    again = evaluate_run(run.path, str(val))
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    assert again["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    predicted = run.predict(["good great fun film", "bad awful film"])
    assert [p["label"] for p in predicted] == ["good", "bad"]
    if strategy == "full":
        with pytest.raises(TuneforgeError, match="label-words"):
            export_run(run.path, "onnx", tmp_path / "export")


def test_truncation_cuts_the_text_and_keeps_the_prompt(lm_dir):
    task, model = _task_and_model(lm_dir, ["bad", "good"], max_length=12)
    long_text = " ".join(["the movie was really very good"] * 10)
    enc = task.encode_inputs([long_text, "bad"])
    ids = enc["input_ids"][0].tolist()
    prompt = task.words.prompt_ids
    assert len(ids) == 12 and ids[-len(prompt):] == prompt
    short = enc["input_ids"][1][enc["attention_mask"][1].bool()].tolist()
    assert short[-len(prompt):] == prompt  # right padding after the prompt
    with torch.no_grad():
        assert torch.isfinite(model(**enc)).all()


def test_recipe_refuses_what_label_words_cannot_do(tiny_bert_dir, tmp_path):
    from tuneforge.recipe import recipe_from_dict

    def recipe(**over):
        base = {"model": {"name": "/some/llm"}, "task": {"classifier": "label-words"}}
        for key, value in over.items():
            base.setdefault(key, {}).update(value)
        return recipe_from_dict(base)

    with pytest.raises(TuneforgeError, match="minilm-l6.*decoder language model.*classifier: head"):
        recipe(model={"name": "minilm-l6"})
    with pytest.raises(TuneforgeError, match="multi-label data use task.classifier: head"):
        recipe(task={"multi_label": True})
    with pytest.raises(TuneforgeError, match="linear-probe trains or schedules a new task head"):
        recipe(strategy={"name": "linear-probe"})
    with pytest.raises(TuneforgeError, match="label_words only applies with task.classifier: label-words"):
        recipe(task={"classifier": "head", "label_words": {"a": "b"}})
    assert recipe(task={"label_words": {0: "negative", 1: "positive"}}).task.label_words == {"0": "negative",
                                                                                           "1": "positive"}
    # an encoder in a local directory: refused when it loads, before a run directory is made
    train = write_text_csv(tmp_path / "train.csv", n=8)
    with pytest.raises(TuneforgeError, match="bert encoder.*decoder language model"):
        finetune(text_recipe(tiny_bert_dir, train, tmp_path / "run", task={"classifier": "label-words"}))
    assert not (tmp_path / "run").exists()


def test_label_words_must_name_training_labels_and_stay_distinct(lm_dir):
    with pytest.raises(TuneforgeError, match="'neutral'.*its labels: bad, good"):
        _task_and_model(lm_dir, ["bad", "good"], label_words={"neutral": "meh"})
    with pytest.raises(TuneforgeError, match="labels 'bad' and 'good' become the same tokens"):
        _task_and_model(lm_dir, ["bad", "good"], label_words={"bad": "good"})
