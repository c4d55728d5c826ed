"""KNorm: keep the keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024
(arXiv:2406.11430; reference code NVIDIA/kvpress, `kvpress/presses/knorm_press.py`, `KnormPress`).

Rule: at the end of the prefill every cached key gets the score -||k||_2, and each KV head keeps
its `max_capacity_prompt` best-scoring positions (the lowest norms). The paper observes that
low-norm keys draw high attention. Nothing else is kept on purpose: like kvpress's `ScorerPress`,
no attention sinks and no recent window are protected. The keys scored are the cached ones, with
RoPE applied, as in kvpress, which scores the keys it reads from the cache. RoPE rotates pairs of
coordinates, so the norm is the same before and after it (a YaRN-style attention factor scales
every key by the same constant, which leaves the order unchanged). Scores are per KV head, so the
GQA rule is simply per KV head (no query is involved).

The rule reads neither queries nor the question: in a context-only placement the kept set depends
on the context alone. Decoding appends to the compressed cache and evicts nothing (static decoding
as SnapKV's). Budget: `max_capacity_prompt` entries per layer (a fraction of the prompt if <= 1),
instead of kvpress's `compression_ratio` (which keeps int(L * (1 - ratio))).
"""

from __future__ import annotations

from dataclasses import dataclass

from paretoray.actors.techniques.base import register
from paretoray.actors.techniques.kv_compression import CAPACITY, PromptCompression, budget_tokens


@register
@dataclass(frozen=True)
class KNorm(PromptCompression):
    max_capacity_prompt: float = CAPACITY.field()

    name = "knorm"
    examples = {"covers": {}, "compresses": {"max_capacity_prompt": 0.25}}

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        return budget_tokens(self.max_capacity_prompt, prompt_len)

    def prefill_scores(self, module, hidden_states, position_embeddings, keys, budget):
        return -keys.float().norm(dim=-1), None  # [B, Hkv, L]: the lowest norms are kept
