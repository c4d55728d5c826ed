"""The reference compressed decoding is checked against: the whole text run densely through plain
eager attention (fp64 softmax), each query head of each layer masked by a pattern the test writes
(causal, minus what the technique dropped)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoModelForCausalLM

NAME = "paretoray_test_masked_eager"
_ALLOWED: dict[int, torch.Tensor] = {}  # layer -> [Hq, T, T] bool, for the forward under way


def _masked_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over repeated KV heads, query head h of this layer masked by _ALLOWED[layer][h]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = (query.double() @ key.double().transpose(-1, -2)) * scaling
    probs = logits.masked_fill(~_ALLOWED[module.layer_idx], float("-inf")).softmax(dim=-1)
    return (probs @ value.double()).to(value.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _masked_eager)


def causal(heads: int, total: int) -> torch.Tensor:
    """[heads, total, total] bool: plain causal attention for every query head (to cut into)."""
    return torch.ones(total, total, dtype=torch.bool).tril().repeat(heads, 1, 1)


@torch.no_grad()
def masked_logits(model_dir, ids: torch.Tensor, allowed: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits [T, vocab] of ids [1, T], layer l's query head h attending where allowed[l][h] [T, T]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    model.config._attn_implementation = NAME
    _ALLOWED.clear()
    _ALLOWED.update(allowed)
    try:
        return model(ids).logits[0]
    finally:
        _ALLOWED.clear()
