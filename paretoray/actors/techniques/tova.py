"""TOVA: keep the entries the newest token attends to most; evict the least attended one each step.

Oren et al., "Transformers are Multi-State RNNs", 2024 (arXiv:2401.06104; reference code
schwartz-lab-NLP/TOVA, `src/tova_cache.py` `TOVACache.reduce`, called after every attention
forward in `src/convert_models/llama_custom.py`).

The cache holds at most `max_capacity_prompt` entries per layer. After any forward that leaves a
layer above its budget, the softmax attention of that forward's last query over every entry the
layer holds (its own key included), averaged over all the layer's query heads, scores each entry,
and the budget's best are kept. At the prefill this keeps the keys the last prompt token attends
to most; while decoding the layer holds budget + 1 entries after the append, so exactly the one
the newest token attends to least is evicted. Only the current step's attention counts (it is
replaced every step, not accumulated as H2O does). Kept keys keep their original RoPE positions
(the reference without its optional positional compression).

As the reference has it:
- one selection per layer, shared by all its heads: the reference's `reduce` averages
  `attn_weights[:, :, -1, :]` over every query head (after `repeat_kv`, so under GQA that is the
  mean over all query heads of all KV groups) and gathers the same positions from every KV head;
- nothing is protected: the newest token competes with the rest (it may evict itself). kvpress's
  `TOVAPress` (a prompt-only `ScorerPress`, same head-averaged last-token score) instead gives the
  last prompt token the maximum score; we follow the paper's code;
- a multi-token forward after the prefill (the question of a context-only placement) is reduced the
  way the reference reduces any forward: by its last token's attention, down to the budget at once.

Deviations: the budget may also be a fraction of the prompt (`CAPACITY`, as every compressor
here; the reference takes tokens); the attention is recomputed in fp32 from the layer's input (the
reference averages the weights cast to the model's dtype); ties go to `topk`'s order (eager) or
`argmin`'s (static decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paretoray.actors.static_decode import SlotGroup
from paretoray.actors.techniques.base import register
from paretoray.actors.techniques.kv_compression import (
    CAPACITY,
    CompressedLayer,
    PromptCompression,
    attention_weights,
    budget_tokens,
    project_queries,
)


def last_query_scores(module, hidden_states, position_embeddings, keys: torch.Tensor) -> torch.Tensor:
    """The last input token's attention over every stored key, averaged over all query heads.

    hidden_states: [B, n, hidden] (the forward's new tokens, the last is scored); keys: [B, Hkv, L, D]
    -> [B, 1, L] (one score per position, shared by every head of the layer).
    """
    new = hidden_states.shape[1]
    query = project_queries(module, hidden_states, position_embeddings, new - 1, new)  # [B, Hq, 1, D]
    weights = attention_weights(query, keys, module.scaling)[..., 0, :]  # [B, Hkv, groups, L]
    return weights.mean(dim=(1, 2))[:, None]


class LastAttentionGroup(SlotGroup):
    """TOVA while decoding: after attending, once the group holds more than `budget` entries, the
    slot the current query attends to least (fp32 softmax over the valid slots, averaged over every
    query head of the group: the whole layer) is freed for the next token. Capacity: budget + 1.
    Every head holds the same positions, so every head writes and frees the same slot."""

    def __init__(self, keys, values, positions, capacity: int, budget: int):
        super().__init__(keys, values, positions, capacity)
        self.budget = torch.tensor(budget, device=self.keys.device)

    def attend(self, query, scaling, position):
        out = super().attend(query, scaling, position)
        batch, heads = self.keys.shape[:2]
        weights, valid = self.weights(query, scaling)  # [B, h, groups, C], [B, h, C]
        scores = weights.mean(dim=(1, 2))[:, None]  # [B, 1, C]: this step's attention, not accumulated
        victim = scores.masked_fill(~valid[:, :1], float("inf")).argmin(dim=-1, keepdim=True)  # [B, 1, 1]
        victim = victim.expand(batch, heads, 1)
        over = valid[:, :1].sum(dim=-1, keepdim=True) > self.budget  # [B, 1, 1]
        self.positions.scatter_(2, victim, torch.where(over, -1, self.positions.gather(2, victim)))
        return out

    def _stack(self, members):
        super()._stack(members)
        self.budget = torch.stack([row.budget for row, _ in members]).view(-1, 1, 1)  # per row: from its prompt


@register
@dataclass(frozen=True)
class TOVA(PromptCompression):
    max_capacity_prompt: float = CAPACITY.field()

    name = "tova"
    decode_evicts = True  # one entry leaves every decoding step once the cache is full
    examples = {"covers": {}, "compresses": {"max_capacity_prompt": 0.25}}

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        return budget_tokens(self.max_capacity_prompt, prompt_len)

    def prefill_scores(self, module, hidden_states, position_embeddings, keys, budget):
        scores = last_query_scores(module, hidden_states, position_embeddings, keys)  # [B, 1, L]
        return scores.expand(-1, keys.shape[1], -1), None  # every KV head selects the same positions

    def after_append(self, module, hidden_states, position_embeddings, layer: CompressedLayer) -> None:
        if layer.keys.shape[-2] <= layer.budget:
            return
        scores = last_query_scores(module, hidden_states, position_embeddings, layer.keys)  # [B, 1, n]
        layer.keep(scores.topk(layer.budget, dim=-1).indices.expand(-1, layer.keys.shape[1], -1))

    def static_cache(self, model, cache, steps, release=False):
        """Decoding keeps evicting: each layer a `LastAttentionGroup` of budget + 1 slots."""
        from paretoray.actors.static_decode import StaticLayer, convert

        def layer_to_static(layer):
            capacity = min(layer.budget + 1, layer.keys.shape[-2] + steps)
            group = LastAttentionGroup(layer.keys, layer.values, layer.positions, capacity, budget=layer.budget)
            return StaticLayer([group], repeat=layer.repeat)

        return convert(model, cache, layer_to_static, release)
