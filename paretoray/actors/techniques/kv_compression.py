"""The mechanism prompt-compression techniques share: score -> select -> gather.

At the end of the first multi-token forward (the prefill, or the context alone in a
context-only placement), a forward hook on every attention module asks the technique for one
score per cached position and KV head, keeps the budget's best-scoring positions (always
keeping the ones the technique protects), and gathers them into a smaller cache. The cache
really shrinks: keys and values are re-allocated at the kept length.

Positions: SnapKV, PyramidKV and H2O keep each kept key at its original RoPE position, and new
tokens continue at their text positions (the cache counts tokens seen, not tokens kept).

GQA: by default scores are computed per query head and averaged over each KV head's group, and
positions are selected per KV head (kvpress's rule). A technique may instead repeat the KV heads
to the query heads before scoring (`kv_repeat`, SnapKV's original rule): the layer then stores and
selects per query head, at `groups` times the memory, and repeats every appended token the same
way.

Layers may keep different lengths (PyramidKV). transformers sizes its causal mask from one
layer, so while a technique is applied the model runs an SDPA attention registered here that
builds its own end-aligned causal mask from each layer's actual lengths.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from paretoray.actors.generation import attention_installed
from paretoray.actors.techniques.base import Param, Technique

ATTENTION = "paretoray_sdpa"


def end_aligned_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA whose causal mask aligns the queries with the last keys, whatever the cache holds.

    query: [B, Hq, q, D]; key/value: [B, Hkv, kv, D] with kv >= q (the new tokens come last).
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    mask = None
    if 1 < q_len < kv_len:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=q_len > 1 and mask is None, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, end_aligned_sdpa)  # no mask function: transformers builds none


class CompressedLayer(DynamicLayer):
    """A layer cache that can be cut down to chosen positions per KV head.

    `positions` [B, heads, n] holds the text position of every stored entry, so tests and reports
    can say exactly what was kept. `scores` is free for techniques that carry state (H2O). The
    heads are the KV heads, or the query heads once `expand` has repeated them.
    """

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.budget: int | None = None
        self.compressed = False
        self.repeat = 1  # > 1 once expand() has repeated the KV heads to the query heads

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.repeat > 1:  # an expanded layer stores one head per query head: repeat what arrives
            key_states = key_states.repeat_interleave(self.repeat, dim=1)
            value_states = value_states.repeat_interleave(self.repeat, dim=1)
        keys, values = super().update(key_states, value_states)
        new = torch.arange(self.seen, self.seen + key_states.shape[-2], device=key_states.device)
        new = new.expand(*key_states.shape[:2], -1)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], dim=-1)
        self.seen += key_states.shape[-2]
        return keys, values

    def keep(self, index: torch.Tensor) -> None:
        """Keep the entries at `index` [B, Hkv, k] (sorted, so text order is preserved)."""
        index = index.sort(dim=-1).values
        self.keys, self.values = gather(self.keys, index), gather(self.values, index)
        self.positions = self.positions.gather(2, index)
        if self.scores is not None:
            self.scores = self.scores.gather(2, index)

    def expand(self, groups: int) -> None:
        """Repeat every KV head `groups` times (transformers' `repeat_kv` order: KV head h becomes
        query heads h * groups ... h * groups + groups - 1); later tokens are repeated on arrival."""
        self.keys = self.keys.repeat_interleave(groups, dim=1)
        self.values = self.values.repeat_interleave(groups, dim=1)
        self.positions = self.positions.repeat_interleave(groups, dim=1)
        if self.scores is not None:
            self.scores = self.scores.repeat_interleave(groups, dim=1)
        self.repeat *= groups

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.keys.shape[-2] if self.is_initialized and self.keys.numel() else 0
        return stored + query_length, self.seen - stored

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be rolled back")

    def to_static(self, steps: int):
        """The kept entries plus room for `steps` decoded tokens, appended (static_decode)."""
        from paretoray.actors.static_decode import SlotGroup, StaticLayer

        kept = self.keys.shape[-2]
        return StaticLayer([SlotGroup(self.keys, self.values, self.positions, kept + steps)], repeat=self.repeat)


def gather(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries at `index` of each head, re-allocated at their new length.

    states: [B, Hkv, L, D]; index: [B, Hkv, k] -> [B, Hkv, k, D].
    """
    return states.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])).contiguous()


def select(scores: torch.Tensor, budget: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `budget` best positions per head; `protected` [L] bool positions always win.

    scores: [B, Hkv, L] (higher is kept) -> index [B, Hkv, budget].
    """
    if protected is not None:
        scores = scores.masked_fill(protected, float("inf"))
    return scores.topk(budget, dim=-1).indices


def project_queries(module: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings, start: int, end: int) -> torch.Tensor:
    """Recompute an attention module's queries for positions [start, end) of its input, RoPE applied.

    The SDPA path returns no attention weights, so scoring recomputes them from the layer input.
    hidden_states: [B, L, hidden] -> [B, Hq, end - start, D].
    """
    span = hidden_states[:, start:end]
    query = module.q_proj(span).view(*span.shape[:-1], -1, module.head_dim)
    if hasattr(module, "q_norm"):  # Qwen3-style query norm before RoPE
        query = module.q_norm(query)
    query = query.transpose(1, 2)
    cos, sin = position_embeddings
    query, _ = apply_rotary_pos_emb(query, query, cos[:, start:end], sin[:, start:end])
    return query


def attention_weights(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of the last queries over all keys, causal among themselves, in fp32.

    query: [B, Hq, w, D]; keys: [B, Hkv, L, D] -> [B, Hkv, groups, w, L].
    """
    batch, q_heads, w, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    groups = q_heads // kv_heads
    q = query.float().view(batch, kv_heads, groups, w, dim)
    logits = torch.einsum("bhgwd,bhld->bhgwl", q, keys.float()) * scaling
    future = torch.ones(w, length, dtype=torch.bool, device=keys.device).triu(length - w + 1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


CAPACITY = Param(
    "float", 1024.0, low=0.001, high=1048576.0,
    doc="prompt KV entries kept per layer (any window included): a fraction of the prompt if <= 1, else tokens",
)


def budget_tokens(capacity: float, prompt_len: int) -> int:
    """`max_capacity_prompt`: a fraction of the prompt when <= 1, else a number of tokens."""
    return max(1, round(capacity * prompt_len)) if capacity <= 1 else int(round(capacity))


@dataclass(frozen=True)
class PromptCompression(Technique):
    """Base of score -> select -> gather techniques (not registered itself)."""

    phase = "kv-cache"
    static_decode = True
    provides = ("kv_cache",)
    scores_per_head = True  # layer_budget + prefill_scores: an outer technique may select itself (adakv)
    batched = True  # each sequence is scored and selected alone at its prefill (Technique.generate_batch)
    carries_scores = False  # keep the prefill scores on the layer for decoding (H2O accumulates them)

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        """Entries this layer keeps after compressing a prompt of `prompt_len` tokens."""
        raise NotImplementedError

    def kv_repeat(self, module) -> int:
        """How many times each KV head is repeated before scoring and storing (1: select per KV head)."""
        return 1

    def prefill_scores(self, module, hidden_states, position_embeddings, keys, budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores [B, Hkv, L] (higher is kept) and the positions [L] always kept (or None), for a
        layer that will keep `budget` entries."""
        raise NotImplementedError

    def after_append(self, module, hidden_states, position_embeddings, layer: CompressedLayer) -> None:
        """Called after every forward that appends to a compressed layer: decoded tokens, or the
        question of a context-only placement. Eviction during decoding goes here (H2O)."""

    def new_cache(self, model: PreTrainedModel) -> Cache:
        return Cache(layers=[CompressedLayer() for _ in range(model.config.num_hidden_layers)])

    @contextmanager
    def applied(self, model: PreTrainedModel) -> Iterator[Cache]:
        cache = self.new_cache(model)
        attention_modules = [layer.self_attn for layer in model.model.layers]
        num_layers = len(attention_modules)

        def hook(module, args, kwargs, output):
            layer: CompressedLayer = cache.layers[module.layer_idx]
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            position_embeddings = kwargs.get("position_embeddings")
            if not layer.compressed and hidden_states.shape[1] > 1:
                layer.compressed = True
                layer.budget = self.layer_budget(module.layer_idx, num_layers, layer.keys.shape[-2])
                if (repeat := self.kv_repeat(module)) > 1:
                    layer.expand(repeat)
                if layer.budget < layer.keys.shape[-2] or self.carries_scores:
                    scores, protected = self.prefill_scores(module, hidden_states, position_embeddings, layer.keys, layer.budget)
                    layer.scores = scores if self.carries_scores else None
                    if layer.budget < layer.keys.shape[-2]:
                        layer.keep(select(scores, layer.budget, protected))
            elif layer.compressed:
                self.after_append(module, hidden_states, position_embeddings, layer)

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules]
        try:
            with attention_installed(model, ATTENTION):
                yield cache
        finally:
            for handle in handles:
                handle.remove()
