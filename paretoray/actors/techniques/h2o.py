"""H2O: keep the heavy hitters (largest accumulated attention) and the most recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023 (arXiv:2306.14048; reference code FMInference/H2O, real-drop variant).

At prefill every key's score is the attention it received from every prompt query (summed over
queries); the budget keeps the `recent_fraction` most recent tokens and fills the rest with the
highest-scoring ones. While decoding, each new token's attention is added to the scores of the
keys it saw, and whenever the cache exceeds the budget the lowest-scoring non-recent entries are
evicted, so the cache stays at its budget (a context-only question is scored and evicted the same
way, all its tokens at once). Kept keys keep their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.kv_compression import (
    CAPACITY,
    CompressedLayer,
    PromptCompression,
    attention_weights,
    budget_tokens,
    project_queries,
    select,
)

QUERY_CHUNK = 512  # prompt queries scored at once: bounds the [chunk x L] attention buffer


@register
@dataclass(frozen=True)
class H2O(PromptCompression):
    max_capacity_prompt: float = CAPACITY.field()
    recent_fraction: float = param("float", 0.5, low=0.0, high=1.0, doc="share of the budget for recent tokens (paper: half)")

    name = "h2o"
    carries_scores = True
    decode_evicts = True  # the heavy hitters are re-chosen every decoding step
    examples = {"covers": {}, "compresses": {"max_capacity_prompt": 0.25}}

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        return budget_tokens(self.max_capacity_prompt, prompt_len)

    def recent_positions(self, length: int, budget: int, device: torch.device) -> torch.Tensor:
        """[length] bool: the newest entries the budget reserves for recent tokens."""
        recent = min(budget, max(1, round(budget * self.recent_fraction)))
        return torch.arange(length, device=device) >= length - recent

    def prefill_scores(self, module, hidden_states, position_embeddings, keys, budget):
        length = keys.shape[-2]
        scores = torch.zeros(*keys.shape[:2], length, dtype=torch.float32, device=keys.device)
        for start in range(0, length, QUERY_CHUNK):
            end = min(start + QUERY_CHUNK, length)
            query = project_queries(module, hidden_states, position_embeddings, start, end)
            weights = attention_weights(query, keys[..., :end, :], module.scaling)  # [B, Hkv, g, c, end]
            scores[..., :end] += weights.sum(dim=-2).mean(dim=2)  # summed over queries, averaged over the group
        return scores, self.recent_positions(length, budget, keys.device)

    def static_cache(self, model, cache, steps, release=False):
        """Decoding keeps evicting: each layer a `ScoredGroup` of budget + 1 slots (static_decode)."""
        from paretoray.actors.static_decode import ScoredGroup, StaticLayer, convert

        def layer_to_static(layer):
            kept = layer.keys.shape[-2]
            recent = min(layer.budget, max(1, round(layer.budget * self.recent_fraction)))
            group = ScoredGroup(layer.keys, layer.values, layer.positions, min(layer.budget + 1, kept + steps),
                                scores=layer.scores, budget=layer.budget, recent=recent)
            return StaticLayer([group], repeat=layer.repeat)

        return convert(model, cache, layer_to_static, release)

    def after_append(self, module, hidden_states, position_embeddings, layer: CompressedLayer) -> None:
        new = hidden_states.shape[1]  # 1 while decoding; the question's length in a context-only placement
        query = project_queries(module, hidden_states, position_embeddings, 0, new)
        weights = attention_weights(query, layer.keys, module.scaling).sum(dim=-2).mean(dim=2)  # [B, Hkv, n]
        fresh = torch.zeros(*layer.scores.shape[:-1], new, dtype=layer.scores.dtype, device=layer.scores.device)
        layer.scores = torch.cat([layer.scores, fresh], dim=-1) + weights
        stored = layer.keys.shape[-2]
        if stored > layer.budget:
            layer.keep(select(layer.scores, layer.budget, self.recent_positions(stored, layer.budget, layer.keys.device)))
