"""A verifiable skill for instruction tuning: rows generated from a seed, scored by exact match.

ROUGE-L against free-text references says little about whether SFT taught a model anything;
a skill whose answer is one exact string does. ``json-extract`` asks for a person's name,
age and city from a sentence as one JSON object with fixed keys and nothing else::

    user:      Extract the person's name, age and city from the text. Answer with only a JSON
               object with the keys "name", "age" (a number) and "city", on one line.

               Text: Priya (34) has lived in Lisbon for years.
    assistant: {"name": "Priya", "age": 34, "city": "Lisbon"}

A small instruction model tends to answer in a code fence, with prose around it, or with
other keys (the measured before/after exact match of SmolLM2-135M-Instruct is in docs/llm.md).
The held-out rows use names, cities and sentence shapes in combinations the training rows
never have (checked), so exact match measures the skill, not recall of a seen row.

:func:`make_sft_data` writes the mixed data set that ``recipes/sft-smollm2-*.yaml`` train on:
Alpaca rows turned into chat records, the skill's rows mixed in, every record tagged with
``source`` (``task.generation.group_by: source`` scores each source on its own).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..errors import TuneforgeError

NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jonas", "Keiko", "Liam",
         "Maya", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Victor", "Wen", "Ximena",
         "Yusuf", "Zoe", "Amara", "Felix", "Ingrid", "Mateo")
CITIES = ("Paris", "Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Perth", "Quito",
          "Seoul", "Tunis", "Vienna", "Dublin", "Porto", "Accra", "Kyoto", "Austin", "Riga")
SHAPES = ("{name} is {age} years old and lives in {city}.",
          "{name}, aged {age}, moved to {city} last spring.",
          "Meet {name} from {city}; {name} turned {age} this year.",
          "In {city}, {name} ({age}) runs a small bakery.",
          "Since last year {name}, {age}, has worked as a nurse in {city}.",
          "Our new colleague {name} is {age} and commutes from {city}.",
          "{city} is home to {name}, who is {age}.",
          "At {age}, {name} still cycles across {city} every day.")
INSTRUCTION = ("Extract the person's name, age and city from the text. Answer with only a JSON object with the "
               "keys \"name\", \"age\" (a number) and \"city\", on one line.")
SKILLS = ("json-extract",)
NO_INPUT = {"noinput", "no input", "none", "n/a", ""}


def skill_rows(n_train: int, n_eval: int, seed: int = 0, skill: str = "json-extract") -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` rows ``{"prompt", "reply"}``, the same for the same seed. Held-out rows
    never share a (name, city, sentence shape) combination with a training row."""
    if skill not in SKILLS:
        raise TuneforgeError(f"unknown skill '{skill}'; choose one of: {', '.join(SKILLS)}")
    combos = [(n, c, s) for n in range(len(NAMES)) for c in range(len(CITIES)) for s in range(len(SHAPES))]
    if n_train + n_eval > len(combos):
        raise TuneforgeError(f"at most {len(combos)} {skill} rows can be generated; asked for {n_train + n_eval}")
    rng = random.Random(seed)
    rng.shuffle(combos)
    rows = []
    for name, city, shape in combos[: n_train + n_eval]:
        age = rng.randint(18, 89)
        text = SHAPES[shape].format(name=NAMES[name], age=age, city=CITIES[city])
        rows.append({"prompt": f"{INSTRUCTION}\n\nText: {text}",
                     "reply": json.dumps({"name": NAMES[name], "age": age, "city": CITIES[city]})})
    return rows[:n_train], rows[n_train:]


def exact_match(prediction: str, reference: str) -> bool:
    """The skill's score: the reply is the reference exactly, up to surrounding and repeated
    whitespace (the same rule as ``generation.text_scores``' exact_match). A code fence, a
    sentence around the object or other keys are all wrong: the instruction asked for none."""
    return " ".join(prediction.split()) == " ".join(reference.split())


def _chat(prompt: str, reply: str, source: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "source": source}


def make_sft_data(alpaca: str | Path, out: str | Path, *, holdout: int = 100, skill: str = "json-extract",
                  skill_train: int = 200, skill_eval: int = 32, seed: int = 0) -> dict:
    """Alpaca ``{instruction, input, output}`` rows -> chat records (the instruction, a blank line
    and the input as the user turn), the last ``holdout`` of them held out; ``skill_train`` /
    ``skill_eval`` skill rows mixed in (shuffled with ``seed``). Writes ``out/train.jsonl`` and
    ``out/validation.jsonl`` (atomically) and returns the counts."""
    alpaca, out = Path(alpaca), Path(out)
    try:
        data = json.loads(alpaca.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TuneforgeError(f"cannot read {alpaca} as a JSON array of Alpaca records ({err})") from None
    if not isinstance(data, list):
        raise TuneforgeError(f"{alpaca}: expected a JSON array of {{instruction, input, output}} records")
    general = []
    for i, row in enumerate(data):
        if not (isinstance(row, dict) and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str)):
            raise TuneforgeError(f"{alpaca} item {i + 1}: an Alpaca record needs 'instruction' and 'output' strings")
        extra = (row.get("input") or "").strip()
        if extra.lower().strip(".<>` ") in NO_INPUT:  # Alpaca-style files spell "no input" several ways
            extra = ""
        general.append(_chat(row["instruction"].strip() + (f"\n\n{extra}" if extra else ""), row["output"].strip(),
                             "alpaca"))
    if not 0 < holdout < len(general):
        raise TuneforgeError(f"--holdout {holdout}: hold out between 1 and {len(general) - 1} of the {len(general)} rows")
    train_skill, eval_skill = skill_rows(skill_train, skill_eval, seed, skill)
    train = general[:-holdout] + [_chat(r["prompt"], r["reply"], skill) for r in train_skill]
    validation = general[-holdout:] + [_chat(r["prompt"], r["reply"], skill) for r in eval_skill]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(validation)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("validation.jsonl", validation)):
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out / name)  # a reader never sees half a file
    return {"train": len(train), "validation": len(validation), "alpaca_train": len(general) - holdout,
            "alpaca_validation": holdout, f"{skill}_train": skill_train, f"{skill}_validation": skill_eval,
            "out": str(out)}
