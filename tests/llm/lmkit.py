"""Tiny causal LMs and tokenizers built in the test (no pretrained LLM can be downloaded here)."""

from tuneforge.llm.tiny import (LETTERS, SPECIAL, corpus_text, make_lm, make_tiny_lm, make_tokenizer,  # noqa: F401
                                preference_task, reverse_task, write_jsonl)
