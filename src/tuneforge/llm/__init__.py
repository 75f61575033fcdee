"""Causal language models: data formats, chat templates, packing, generation, preference losses."""
