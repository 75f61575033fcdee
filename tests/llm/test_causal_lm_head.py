"""CausalLM's loss: the LM head runs only on target positions, padded on CPU to a multiple of
LM_HEAD_ROWS_MULTIPLE rows; the result must equal the full-logits cross-entropy."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lmkit import corpus_text, make_lm, make_tokenizer
from tuneforge.llm.templates import IGNORE
from tuneforge.tasks.causal_lm import LM_HEAD_ROWS_MULTIPLE, CausalLM


def test_target_only_padded_head_equals_full_logits_loss(tmp_path):
    tok = make_tokenizer(tmp_path, corpus_text())
    lm = make_lm(tmp_path, tok).float().eval()
    model = CausalLM(lm.model, lm.lm_head, lm)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (3, 29), generator=g)  # (B, T)
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=g) < 0.6] = IGNORE
    n_targets = int((labels[:, 1:] != IGNORE).sum())
    assert n_targets % LM_HEAD_ROWS_MULTIPLE  # the padded path really runs

    loss_sum, n = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    loss_sum.backward()
    grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()

    logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]  # (B, T-1, V)
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    reference.backward()
    assert int(n) == n_targets
    torch.testing.assert_close(loss_sum, reference, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, (p.grad for p in lm.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
