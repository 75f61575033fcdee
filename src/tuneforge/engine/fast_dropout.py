"""Dropout for CPU training that draws its mask 3-4x faster than ``torch.nn.Dropout``.

Why our own: on CPU, ``nn.Dropout`` draws one Bernoulli sample per element
(``bernoulli_``, ~10 ns per element here). In a MiniLM fine-tune on SST-2 the 20 dropouts
of a training step were 10% of the step in torch.profiler — as much as the fused AdamW step
and the mixed-precision casts together. This module draws 64 random bits at a time from
torch's own generator (``random_`` on int64) and keeps 15 of each 16 as one element's
uniform number, so one draw serves four elements; the mask is then one comparison.

* Same distribution up to a resolution of 1/32768: an element is dropped with probability
  ``round(p * 32768) / 32768`` (0.1 -> 0.099991) and the kept ones are scaled by
  ``1 / (1 - that probability)``, so the expected activation is unchanged exactly.
* Same generator: the mask comes from torch's default CPU generator, so ``train.seed``
  fixes it and exact resume (which saves and restores that generator) still holds.
* Only the boolean mask is kept for the backward pass (as ``nn.Dropout`` does).
* CUDA and other devices keep torch's fused dropout kernels, which are fast there.

``install(model)`` turns every plain ``nn.Dropout`` in a model into a ``FastDropout`` by
changing its class: the module objects stay the same (a model, PEFT's ``lora_dropout``
or an attention layer that reads ``self.dropout.p`` keeps working), and dropouts have no
weights, so nothing in a state dict changes. ``train.fast_dropout: false`` turns it off.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_BITS = 15  # of each 16-bit chunk: int64 random_() leaves the top bit of the top chunk 0


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` saving only the 0/1 mask (one byte per element) for backward."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(keep.to(torch.uint8))
        # Multiply by an exact 0/1 tensor of x's dtype, then by the scale as a Python float
        # (rounded once per element, as torch's dropout does; a bf16 scale would be biased).
        # Boolean tensors take torch's slow non-vectorised paths on CPU, hence 0/1 numbers.
        return x.mul(keep.to(x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep.to(grad.dtype)).mul_(ctx.scale), None, None


def keep_mask(shape, p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """A 0/1 int16 keep-mask of ``shape`` (CPU) and the scale that keeps the expectation."""
    threshold = round(p * (1 << _BITS))
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=generator)
    chunks = words.view(torch.int16)[:n]
    # u = 15 random bits in [0, 32768); (u - threshold) >> 15 is -1 below the threshold and
    # 0 from it on (arithmetic shift), so + 1 gives drop = 0 / keep = 1 without a comparison.
    keep = chunks.bitwise_and((1 << _BITS) - 1).sub_(threshold).bitwise_right_shift_(_BITS).add_(1)
    drop_p = threshold / (1 << _BITS)
    return keep.view(shape), 1.0 / (1.0 - drop_p)


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p, training=True)`` for a CPU tensor, with the faster mask."""
    if round(p * (1 << _BITS)) >= 1 << _BITS:  # p within 1/65536 of 1: everything dropped, no finite scale
        return torch.nn.functional.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, p)
    return _MaskedScale.apply(x, keep, scale)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the fast CPU mask; identical outside training or off the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.p >= 1.0 or not x.is_floating_point():
            return super().forward(x)
        return fast_dropout(x, self.p)


def install(model: nn.Module) -> int:
    """Make every plain ``nn.Dropout`` with p > 0 in ``model`` a ``FastDropout``; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = FastDropout
            n += 1
    return n


def uninstall(model: nn.Module) -> None:
    """Back to plain ``nn.Dropout`` (e.g. before pickling a whole module)."""
    for module in model.modules():
        if type(module) is FastDropout:
            module.__class__ = nn.Dropout


# -- attention-probability dropout ------------------------------------------------------
#
# Hugging Face models pass their attention dropout to SDPA, whose CPU path then draws torch's
# per-element Bernoulli mask (6 of a MiniLM step's 20 dropouts, ~5% of the step). Models use
# the attention function named by ``config._attn_implementation``; ``install_attention``
# registers this one under ``ATTENTION`` (beside transformers' own, nothing replaced) and
# points the model's "sdpa" configs at it. It is SDPA's math path with the fast mask, used
# only while training on CPU with dropout; everything else (evaluation, generation, GPUs,
# position biases, soft-capping) goes to transformers' ``sdpa_attention_forward`` unchanged.
# The name is not saved: ``_attn_implementation`` is not part of a saved config.json.

ATTENTION = "tuneforge_sdpa"


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    q_len = query.shape[2]
    if (not dropout or query.device.type != "cpu" or q_len == 1 or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = attention_mask is None and is_causal
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    kv_len = key.shape[2]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :kv_len]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    elif is_causal:
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).triu(kv_len - q_len + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = fast_dropout(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def install_attention(model: nn.Module) -> int:
    """Point every Hugging Face config in ``model`` that uses "sdpa" at the fast-dropout
    attention above; returns how many configs changed (0 without transformers)."""
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return 0
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA gets, unchanged
    changed = set()
    for module in model.modules():
        config = getattr(module, "config", None) if isinstance(module, PreTrainedModel) else None
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa" and id(config) not in changed:
            config._attn_implementation = ATTENTION
            changed.add(id(config))
    return len(changed)
