"""SnapKV: the prompt's last tokens vote on which prefix keys each head keeps.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469; reference code FasterDecoding/SnapKV).

At the end of prefill the last `window_size` queries (the observation window) attend to every
key; their softmax attention, summed over the window, is smoothed along positions by a 1-D
pooling (`kernel_size`, stride 1, padding kernel_size // 2), and each KV head keeps its
`max_capacity_prompt - window_size` best prefix positions plus the whole window. Decoding then
appends to the compressed cache; kept keys keep their original positions. Prompts no longer
than the budget are not compressed (as in the reference).

GQA (`gqa`): `group_mean` (default, kvpress's rule) averages the pooled votes over each KV head's
query-head group and selects per KV head. `per_query_head` is the original code's rule: it
repeats the KV heads to the query heads (`repeat_kv`) before scoring, selects per query head and
keeps the repeated cache, so the cache holds `num_attention_heads` heads, `groups` times the
memory (and the KV bytes reported), compressed or not, and decoded tokens are repeated too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.kv_compression import CAPACITY, PromptCompression, attention_weights, budget_tokens, project_queries


def pool_positions(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the last axis, same length out (kernel_size is odd). [..., L] -> [..., L]."""
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    return pool(flat, kernel_size=kernel_size, padding=kernel_size // 2, stride=1).view(scores.shape)


@register
@dataclass(frozen=True)
class SnapKV(PromptCompression):
    window_size: int = param("int", 32, low=1, high=1024, doc="observation window: the last prompt tokens that vote (reference: 32)")
    kernel_size: int = param("int", 7, low=1, high=63, doc="odd width of the pooling over positions (reference: 7 or 5)")
    pooling: str = param("categorical", "avgpool", choices=("avgpool", "maxpool"), doc="pooling of the window's votes")
    max_capacity_prompt: float = CAPACITY.field()
    gqa: str = param("categorical", "group_mean", choices=("group_mean", "per_query_head"),
                     doc="GQA: average votes per KV group (kvpress) or repeat KV heads, select per query head (original SnapKV, x groups memory)")

    name = "snapkv"
    examples = {"covers": {}, "compresses": {"max_capacity_prompt": 0.25, "window_size": 8},
                "per_query_head": {"max_capacity_prompt": 0.25, "window_size": 8, "gqa": "per_query_head"}}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{self.name}: kernel_size: expected an odd number, got {self.kernel_size}")

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        # The window is always kept, so no budget goes below it.
        return max(budget_tokens(self.max_capacity_prompt, prompt_len), min(self.window_size, prompt_len))

    def kv_repeat(self, module) -> int:
        return module.num_key_value_groups if self.gqa == "per_query_head" else 1

    @property
    def kv_within_dense(self) -> bool:  # type: ignore[override]
        """per_query_head holds every query head's own keys: up to `groups` x dense's bytes."""
        return self.gqa == "group_mean"

    def prefill_scores(self, module, hidden_states, position_embeddings, keys, budget):
        length = keys.shape[-2]
        window = min(self.window_size, length)
        query = project_queries(module, hidden_states, position_embeddings, length - window, length)
        votes = attention_weights(query, keys, module.scaling).sum(dim=-2)  # [B, Hkv, groups, L]
        prefix = pool_positions(votes[..., : length - window], self.kernel_size, self.pooling)
        scores = torch.zeros_like(votes[:, :, 0])
        scores[..., : length - window] = prefix.mean(dim=2)  # GQA: average over each KV head's group (of 1 if repeated)
        protected = torch.arange(length, device=keys.device) >= length - window
        return scores, protected
