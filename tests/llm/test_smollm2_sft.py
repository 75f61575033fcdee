"""SmolLM2-135M-Instruct, real weights (`make test-slow`): its own chat template masks the prompt,
and a few LoRA steps on Alpaca rows lower the held-out loss (train.eval_before's step 0 vs the end).

The model is the ``smollm2-135m`` alias (its converted directory where a tokenizer is read directly);
point ``TUNEFORGE_SMOLLM2`` at another copy to run these on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMOLLM2 = os.environ.get("TUNEFORGE_SMOLLM2", "smollm2-135m")
ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "instruct" / "alpaca_en_demo.json"  # ../shared


def test_smollm2_template_trains_on_the_replies_only():
    from transformers import AutoTokenizer

    from tuneforge.llm.templates import IGNORE, Template

    from tuneforge.models.aliases import ALIASES, llm_alias_dir

    tok = AutoTokenizer.from_pretrained(llm_alias_dir(SMOLLM2) if SMOLLM2 in ALIASES else SMOLLM2)
    template = Template("tokenizer", tok)
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, like grass."}]
    rendered = template.render(chat)
    ids, labels = template.encode(rendered)
    assert tok.decode(ids) == rendered.text
    # SmolLM2's template adds its own system prompt when there is none: it must carry no loss
    assert rendered.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    trained = [tok.decode([i]) for i, lab in zip(ids, labels) if lab != IGNORE]
    assert "".join(trained) == "Blue.<|im_end|>Green, like grass.<|im_end|>"  # replies and their EOS, nothing else
    assert template.stop_ids() == [tok.convert_tokens_to_ids("<|im_end|>")]
    prompt = template.prompt(chat[:1])
    assert prompt.endswith("<|im_start|>assistant\n") and rendered.text.startswith(prompt)


def test_smollm2_lora_lowers_held_out_loss(tmp_path):
    from tuneforge import finetune
    from tuneforge.llm.skills import make_sft_data

    make_sft_data(ALPACA, tmp_path / "data", holdout=8, skill_train=8, skill_eval=4)
    run = finetune({
        "model": {"name": SMOLLM2},
        "task": {"type": "causal-lm", "chat_template": "tokenizer", "max_length": 256,
                 "generation": {"eval_prompts": 0}},
        "data": {"train": str(tmp_path / "data" / "train.jsonl"), "validation": str(tmp_path / "data" / "validation.jsonl"),
                 "max_train_rows": 32, "max_eval_rows": 12},
        "strategy": {"name": "lora", "rank": 8},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 2e-3, "warmup": 0, "progress": False},
        "output": {"dir": str(tmp_path / "run"), "report": False},
    })
    final = json.loads((run.path / "eval.json").read_text())
    assert final["validation"]["loss"] < final["before"]["loss"], final
    assert [e["step"] for e in run.history][0] == 0 and final["best_step"] == 4
