"""The arithmetic of policy-gradient RL on a causal LM (GRPO, ``tasks/grpo.py``): group-normalised
advantages, the k3 KL estimator, the per-token loss, token log-probs of sampled completions, and
the module-wise eval mode that a rollout runs in."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from .model import LM_HEAD_ROWS_MULTIPLE, CausalLM
from .templates import IGNORE

EPS = 1e-4  # advantage denominator guard (TRL's GRPOTrainer uses the same)



def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = EPS) -> torch.Tensor:
    """(B, G) rewards -> (B, G) advantages: centred per group, divided by the group's (sample)
    standard deviation + eps when ``scale``. A group whose completions score alike gets 0."""
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, keepdim=True) + eps) if scale else centred


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate ``exp(ref - logp) - (ref - logp) - 1``: unbiased, never
    negative (Schulman 2020, "Approximating KL divergence"; DeepSeekMath eq. 4)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def token_loss(logp: torch.Tensor, advantages: torch.Tensor, ref_logp: torch.Tensor | None, beta: float):
    """Per-token GRPO loss (N,) and KL (N,) or None. ``ratio = pi / pi_old`` with pi_old the
    sampling policy, the same weights (one update per rollout): 1 in value, grad log pi in gradient."""
    ratio = torch.exp(logp - logp.detach())
    loss = -ratio * advantages
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
    return loss, kl


def token_logps(core: CausalLM, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """Log-prob of every target token (N,) and its row (N,); the LM head only where a target is."""
    hidden = core.hidden(ids, mask)  # (R, T, H)
    targets = labels[:, 1:]  # (R, T-1): position t predicts token t+1
    keep = targets != IGNORE
    picked, target = hidden[:, :-1][keep], targets[keep]  # (N, H), (N,)
    n = picked.shape[0]
    pad = -n % LM_HEAD_ROWS_MULTIPLE if picked.device.type == "cpu" else 0  # a few shapes: llm/model.py says why
    if pad:
        picked = torch.cat([picked, picked.new_zeros(pad, picked.shape[1])])
    logits = core.lm_head(picked)[:n]  # (N, V)
    logps = -F.cross_entropy(logits.float(), target, reduction="none")  # (N,)
    rows = torch.arange(len(labels), device=labels.device).unsqueeze(1).expand_as(keep)[keep]  # (N,)
    return logps, rows


def sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device):
    """Prompt + completion rows, right-padded: ids, mask and labels (the completion tokens only)."""
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    R = len(prompts)
    ids = torch.full((R, longest), pad_id, dtype=torch.long)  # (R, T)
    labels = torch.full((R, longest), IGNORE, dtype=torch.long)  # (R, T)
    mask = torch.zeros((R, longest), dtype=torch.long)  # (R, T)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        labels[r, len(p): len(p) + len(c)] = torch.tensor(c)
        mask[r, : len(p) + len(c)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every module in eval mode, and afterwards each back in exactly its own mode (a strategy may
    keep frozen parts in eval mode while training: ``model.train()`` would undo that)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


