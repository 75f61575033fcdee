"""ShareGPT data (LLaMA-Factory's shape) for SFT and preference tuning: detection, mapping, bad records."""

from __future__ import annotations

import json

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.llm.formats import read_lm_records


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _json(path, rows):
    path.write_text(json.dumps(rows, indent=2))
    return path


def turn(who, text):
    return {"from": who, "value": text}


def test_sft_conversations_become_chat_messages_and_the_mapping_is_said_once(tmp_path):
    rows = [{"conversations": [turn("system", "be brief"), turn("human", "hi"), turn("gpt", "hello"),
                               turn("human", "2+2?"), turn("gpt", "4")]},
            {"conversations": [turn("user", "name a colour"), turn("assistant", "red")], "system": "answer in one word"},
            {"messages": [turn("human", "and you?"), turn("gpt", "fine")]}]  # FastChat puts them under messages
    lines = []
    records = read_lm_records(_jsonl(tmp_path / "sg.jsonl", rows), log=lines.append)
    assert [r.values["format"] for r in records] == ["chat"] * 3  # rendered with the chat template
    assert records[0].values["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]
    assert records[1].values["messages"][0] == {"role": "system", "content": "answer in one word"}
    assert [m["role"] for m in records[1].values["messages"]] == ["system", "user", "assistant"]
    assert records[2].values["messages"][1] == {"role": "assistant", "content": "fine"}
    assert "mapped" not in records[0].values
    assert lines == ["sg.jsonl: ShareGPT: system -> system message, conversations[from=system] -> system, "
                     "conversations[from=human] -> user, conversations[from=user] -> user, "
                     "messages[from=human] -> user, conversations[from=gpt] -> assistant, "
                     "conversations[from=assistant] -> assistant, messages[from=gpt] -> assistant"]
    # an explicit task.format: sharegpt reads the same, and plain chat data says nothing
    assert read_lm_records(tmp_path / "sg.jsonl", fmt="sharegpt")[0].values == records[0].values
    quiet = []
    read_lm_records(_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                   {"role": "assistant", "content": "b"}]}]),
                    log=quiet.append)
    assert quiet == []


@pytest.mark.parametrize("record,match", [
    ({"conversations": [turn("human", "weather?"), turn("function_call", "{}"), turn("observation", "sunny"),
                        turn("gpt", "sunny")]},
     r"line 2: conversations turn 2 is a 'function_call' turn \(tool use\).*data.on_bad_record: skip"),
    ({"conversations": [turn("human", "hi"), turn("bot", "hello")]}, r"line 2: conversations turn 2 is from 'bot'"),
    ({"conversations": [turn("human", "hi"), {"from": "gpt"}]}, r"line 2: conversations turn 2 must be \{\"from\""),
    ({"conversations": [turn("human", "hi")]}, r"line 2: the conversation has no gpt/assistant turn"),
    ({"conversations": []}, r"line 2: 'conversations' must be a non-empty list"),
    ({"conversations": [turn("human", "hi"), turn("system", "late"), turn("gpt", "x")]},
     r"line 2: conversations turn 2 is a system turn after the start"),
    ({"conversations": [turn("system", "a"), turn("human", "hi"), turn("gpt", "x")], "system": "b"},
     r"line 2: conversations turn 1 is a system turn.*also has a top-level 'system'"),
    ({"conversations": [turn("human", "hi"), turn("gpt", "x")], "system": ["not", "a string"]},
     r"line 2: 'system' must be a string"),
])
def test_bad_sft_records_name_their_line_and_the_fix(tmp_path, record, match):
    good = {"conversations": [turn("human", "hi"), turn("gpt", "hello")]}
    path = _jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(TuneforgeError, match=match):
        read_lm_records(path)
    skipped = []
    assert len(read_lm_records(path, on_bad_record="skip", skipped=skipped)) == 1 and len(skipped) == 1


def test_preference_pairs_in_the_llama_factory_shape(tmp_path):
    """dpo_en_demo.json's shape: a JSON array; chosen/rejected one message each (or lists, or strings)."""
    prompt = [turn("system", "be kind"), turn("human", "hi"), turn("gpt", "hello"), turn("human", "bye?")]
    rows = [{"conversations": prompt, "chosen": turn("gpt", "goodbye!"), "rejected": turn("gpt", "no.")},
            {"conversations": prompt[1:2], "chosen": [turn("gpt", "a"), turn("human", "more"), turn("gpt", "b")],
             "rejected": "c"},
            {"conversations": prompt[1:2], "chosen": prompt[1:2] + [turn("gpt", "whole conversation")],
             "rejected": {"from": "assistant", "value": "d"}}]
    lines = []
    records = read_lm_records(_json(tmp_path / "dpo.json", rows), preference=True, log=lines.append)
    first = records[0].values
    assert first["prompt"] == [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"}]
    assert first["chosen"] == [{"role": "assistant", "content": "goodbye!"}]
    assert first["rejected"] == [{"role": "assistant", "content": "no."}] and first["chat"] is True
    assert [m["role"] for m in records[1].values["chosen"]] == ["assistant", "user", "assistant"]
    assert records[1].values["rejected"] == [{"role": "assistant", "content": "c"}]
    assert records[2].values["chosen"] == [{"role": "assistant", "content": "whole conversation"}]  # prompt dropped
    assert lines == ["dpo.json: ShareGPT: conversations[from=system] -> system, conversations[from=human] -> user, "
                     "conversations[from=gpt] -> assistant, chosen.value -> chosen reply, chosen[...] -> chosen reply, "
                     "chosen[after the prompt] -> chosen reply, rejected.value -> rejected reply, "
                     "rejected -> rejected reply"]
    # where a record sits in a .json array: its number and the line it starts on
    starts = [n for n, line in enumerate((tmp_path / "dpo.json").read_text().splitlines(), 1) if line == "  {"]
    assert len(starts) == 3 and starts[0] == 2
    assert [r.where for r in records] == [f"dpo.json item {i} (line {n})" for i, n in enumerate(starts, 1)]


@pytest.mark.parametrize("record,match", [
    ({"conversations": [turn("human", "hi"), turn("gpt", "hello")], "chosen": turn("gpt", "a"),
      "rejected": turn("gpt", "b")}, r"item 2 \(line \d+\): 'conversations' must end with a human turn"),
    ({"conversations": [turn("human", "hi")], "chosen": turn("gpt", "same"), "rejected": turn("gpt", "same ")},
     r"item 2 \(line \d+\): 'chosen' and 'rejected' are the same reply"),
    ({"conversations": [turn("human", "hi")], "chosen": turn("gpt", "a")}, r"needs rejected besides 'conversations'"),
    ({"conversations": [turn("human", "hi")], "chosen": turn("gpt", "a"), "rejected": turn("human", "b")},
     r"'rejected' must end with an assistant reply"),
    ({"conversations": [turn("human", "hi")], "chosen": 3, "rejected": turn("gpt", "b")},
     r"'chosen' must be a message"),
    ({"conversations": [turn("human", "hi")], "chosen": turn("gpt", " "), "rejected": turn("gpt", "b")},
     r"'chosen' is an empty reply"),
])
def test_bad_preference_records(tmp_path, record, match):
    good = {"conversations": [turn("human", "hi")], "chosen": turn("gpt", "a"), "rejected": turn("gpt", "b")}
    with pytest.raises(TuneforgeError, match=match):
        read_lm_records(_json(tmp_path / "bad.json", [good, record]), preference=True)


def test_a_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]')
    with pytest.raises(TuneforgeError, match=r"broken.json is not valid JSON .* at line 3"):
        read_lm_records(path)
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    with pytest.raises(TuneforgeError, match="must hold an array of records, got dict"):
        read_lm_records(tmp_path / "obj.json")


def test_a_sharegpt_preference_file_trains_with_the_chat_template_and_masks_the_prompt(tmp_path):
    """Through the preference task: the prompt (system, earlier turns) carries no loss, the replies do."""
    from tuneforge.llm.templates import IGNORE
    from tuneforge.llm.tiny import corpus_text, make_lm, make_tokenizer
    from tuneforge.recipe import load_recipe
    from tuneforge.tasks import get_task
    from tuneforge.models import load_model

    jinja = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model_dir = tmp_path / "lm"
    make_lm(model_dir, make_tokenizer(model_dir, corpus_text(), chat_template=jinja))
    rows = [{"conversations": [turn("system", "abc"), turn("human", "reverse abcd")],
             "chosen": turn("gpt", "dcba"), "rejected": turn("gpt", "abcd")}] * 4
    data = _json(tmp_path / "pairs.json", rows)
    recipe = load_recipe({"model": {"name": str(model_dir)}, "task": {"type": "preference", "max_length": 64},
                          "data": {"train": str(data), "validation": str(data)}})
    task = get_task(recipe)
    lines = []
    records = task.read("train", str(data), limit=None, skipped=[], log=lines.append)
    assert lines and lines[0].startswith("pairs.json: ShareGPT: conversations[from=system] -> system")
    task.attach(load_model(str(model_dir), causal_lm=True))
    task.build_template("chat")
    item = task.dataset(records, None, "train")[0]
    tok = task.tokenizer
    ids, labels = item["chosen"]
    chosen = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert chosen.startswith("dcba") and "reverse" not in chosen and "abc" not in chosen.replace("dcba", "")


def test_validate_prints_the_mapping_as_plain_text(tmp_path, capsys):
    """The run's log takes rich markup; the note quotes field names with brackets, which must survive."""
    from tuneforge.cli import main

    data = _jsonl(tmp_path / "sg.jsonl", [{"conversations": [turn("human", f"hi {i}"), turn("gpt", "hello")]}
                                          for i in range(6)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tmp_path}}}\ntask: {{type: causal-lm}}\ndata: {{train: {data}}}\n"
                      f"output: {{dir: {tmp_path / 'run'}}}\n")
    assert main(["validate", str(recipe)]) == 0
    assert ("sg.jsonl: ShareGPT: conversations[from=human] -> user, conversations[from=gpt] -> assistant"
            in capsys.readouterr().err.replace("\n", ""))
