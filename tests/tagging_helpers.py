"""Tiny tagging data and a tiny BERT whose vocabulary holds its words, written on the spot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "john mary smith jones ann paris berlin london new york rome acme corp globex went to the visited met in and "
    "with at from today said works for saw near , . ##ers ##s"
).split()
PER = [["John", "Smith"], ["Mary"], ["Jones"], ["Ann", "Jones"]]
LOC = [["Paris"], ["New", "York"], ["Londoners"], ["Rome"], ["Berlin"]]  # Londoners: london ##ers, two pieces
ORG = [["Acme", "Corp"], ["Globex"]]
VERBS = [["went", "to"], ["visited"], ["works", "for"], ["met", "with"], ["saw"]]


def sentence(rng: random.Random, clauses: int = 1) -> tuple[list[str], list[str]]:
    """Words and IOB2 tags: 'PER verb LOC|ORG' clauses joined by 'and', ending 'today .'."""
    tokens, tags = [], []
    for c in range(clauses):
        if c:
            tokens.append("and")
            tags.append("O")
        person, verb = rng.choice(PER), rng.choice(VERBS)
        kind, other = rng.choice([("LOC", rng.choice(LOC)), ("LOC", rng.choice(LOC)), ("ORG", rng.choice(ORG))])
        tokens += person + verb + other
        tags += ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O"] * len(verb)
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(other) - 1)
    return tokens + ["today", "."], tags + ["O", "O"]


def write_conll(path: Path, n: int = 40, seed: int = 0, docstart: bool = True, clauses=(1,)) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for _ in range(n):
        tokens, tags = sentence(rng, rng.choice(clauses))
        lines += [f"{w} NNP X {t}" for w, t in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_token_jsonl(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [dict(zip(("tokens", "tags"), sentence(rng))) for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_span_jsonl(path: Path, n: int = 40, seed: int = 0) -> Path:
    """The same sentences as raw text with character-offset entities."""
    from tuneforge.data.tag_schemes import read_spans
    from tuneforge.data.tagging import joined

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = sentence(rng)
        text, offsets = joined(tokens)
        spans, _ = read_spans(tags, "iob2", repair=False)
        rows.append({"text": text, "entities": [{"start": offsets[a][0], "end": offsets[b - 1][1], "label": k}
                                                for a, b, k in spans]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tagger_bert(root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    vocab_dir, model_dir = root / "vocab", root / "model"
    vocab_dir.mkdir(parents=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (vocab_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(model_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(model_dir,
                                                                                            safe_serialization=True)
    return model_dir


@pytest.fixture(scope="session")
def tagger_bert_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT whose WordPiece vocabulary covers the tagging sentences."""
    return build_tagger_bert(tmp_path_factory.mktemp("tagger_bert"))


def tagging_recipe(model_dir, train_file, out, name: str = "full", validation=None, **extra) -> dict:
    recipe = {
        "model": {"name": str(model_dir)},
        "task": {"type": "token-classification"},
        "data": {"train": str(train_file), **({"validation": str(validation)} if validation else {"validation_split": 0.25})},
        "strategy": {"name": name},
        "train": {"epochs": 5, "batch_size": 8, "lr": 1e-2, "progress": False, "precision": "fp32"},
        "output": {"dir": str(out), "report": False},
    }
    for key, value in extra.items():
        recipe.setdefault(key, {}).update(value)
    return recipe
