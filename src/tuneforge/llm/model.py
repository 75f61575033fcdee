"""The causal LM that trains: a decoder and its LM head, as one module with a summed-loss forward.

It lives with the other LLM parts (generation reads it) rather than inside a task, so that
``llm/`` never imports ``tasks/``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TuneforgeError
from .templates import IGNORE

# On CPU the LM head's row count is rounded up to a multiple of this (zero rows, no loss). The
# number of target tokens changes with every batch, and oneDNN builds and caches a kernel per
# matmul shape: a new shape each step cost ~15 MB of resident memory per step, without bound
# (a 17M Llama grew from 2.1 to 2.6 GB in 30 steps; flat with the rounding; PERFORMANCE.md).
LM_HEAD_ROWS_MULTIPLE = 64


class CausalLM(nn.Module):
    """A decoder and its LM head. ``forward(..., labels=...)`` returns the summed next-token loss
    and the number of target tokens; without labels it returns the logits (B, T, V)."""

    def __init__(self, backbone: nn.Module, lm_head: nn.Module, lm: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head
        self.__dict__["lm"] = lm  # the HF *ForCausalLM around the same modules (saving), not a submodule

    def hidden(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            # packed rows: no 2-D mask, so the model builds the block-diagonal mask from position ids
            kwargs.update(position_ids=position_ids, attention_mask=None)
        if not _wrapped(self.backbone):
            kwargs["use_cache"] = False  # a cache would also switch off packed-sequence masking
        return self.backbone(**kwargs).last_hidden_state  # (B, T, H)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **_):
        hidden = self.hidden(input_ids, attention_mask, position_ids)
        if labels is None:
            return self.lm_head(hidden)  # (B, T, V)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE
        picked, target = hidden[:, :-1][keep], targets[keep]  # (N, H), (N,): only positions that carry loss
        pad = -picked.shape[0] % LM_HEAD_ROWS_MULTIPLE if picked.device.type == "cpu" else 0
        if pad:  # a few shapes instead of one per batch (LM_HEAD_ROWS_MULTIPLE); padded rows carry no loss
            picked = torch.cat([picked, picked.new_zeros(pad, picked.shape[1])])
            target = torch.cat([target, target.new_full((pad,), IGNORE)])
        logits = self.lm_head(picked)  # (N + pad, V)
        loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
        return loss, keep.sum()


def _wrapped(backbone) -> bool:
    """A strategy's wrapper (prompt tuning) that takes only ids and mask."""
    return not hasattr(backbone, "config")


def core_model(model: nn.Module) -> CausalLM:
    """The :class:`CausalLM` inside a peft wrapper (adapters injected in place stay active)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, CausalLM):
        raise TuneforgeError(f"expected a causal language model, got {type(inner).__name__}")
    return inner
