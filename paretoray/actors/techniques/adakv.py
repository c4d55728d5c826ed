"""AdaKV: a layer's budget shared by its heads, allocated by one top-k over every head's scores.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference" (arXiv:2407.11550; reference code FFY0/AdaKV `AdaptiveSnapKVCluster`, and kvpress's
`AdaKVPress`).

A wrapper over any prompt compressor that scores positions per KV head (`adakv+snapkv`,
`adakv+pyramidkv`; `adakv` alone wraps SnapKV with its defaults, as the paper builds on SnapKV).
The member says each layer's budget b (entries per head, its protected positions included) and
scores every position of every KV head at the end of the prefill; where the member would keep
each head's own top b, AdaKV keeps, per layer of H KV heads and prompt length L:
  1. in every head, the member's protected positions P (SnapKV's observation window, w = |P|),
     outside the competition;
  2. safeguard: in every head, its own best floor(alpha_safeguard * (b - w)) other positions;
  3. the layer's remaining H (b - w) - H floor(...) entries: the best remaining scores of all heads
     together (one top-k over H x L),
so heads keep different lengths that sum to H b, each at least w + floor(alpha (b - w)).
Nothing is compressed when b >= L. alpha_safeguard = 1 is the member's uniform rule.

Real per-head lengths (`RaggedLayer`): after the prefill each layer stores its heads packed along
one slot axis, [1, T, D] with T = the sum of the heads' lengths (no padding to the longest head);
a forward after it (a decoded token, a context-only question) appends to every head and attends
head by head over exactly that head's entries (end-aligned causal among the new tokens). The
prefill's own forward is dense, before compression. The compiled step gets one `SlotGroup` per run
of heads of equal length (kept + steps slots each), and a batch stacks sequences prefilled alone.

Deviations:
- Safeguard: FFY0 (the paper's fail-safe) gives head h round((1 - alpha) c_h + floor(alpha B))
  prefix entries, c_h its share of an unconstrained global top-(H B), B = b - w (the total may miss
  H B by rounding). kvpress forces each head's top floor(alpha n_kept) entries, then prunes the
  global bottom-k (exact total). Here: kvpress's forcing, so the total is exact, with FFY0's
  accounting of the window (outside the global choice, the floor counted over b - w). kvpress pads
  SnapKV's window scores with the layer's maximum, so its floor, counted over b, goes first to the
  window and protects prefix entries only when floor(alpha b) > w.
- FFY0's options `skip` (uniform budgets in the first layers) and `normalize` (each head's scores
  scaled by the share of its mass in its top B) are not reproduced.
- GQA: selection per KV head on the member's group-averaged scores (kvpress; FFY0's gqa_support).
  SnapKV's `per_query_head` rule is refused.
- adakv provides no cache to an outer technique (self_spec+adakv, kv_quant+adakv): the packed
  layers are its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from paretoray.actors.generation import attention_installed
from paretoray.actors.techniques.base import Technique, build_technique, param, register
from paretoray.actors.techniques.kv_compression import end_aligned_sdpa

ATTENTION = "paretoray_ragged"
DEFAULT_MEMBER = "snapkv"  # the paper's Ada-SnapKV
_ACTIVE: ContextVar[Cache | None] = ContextVar("ragged_cache", default=None)


def allocate(scores: torch.Tensor, budget: int, protected: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """AdaKV's kept positions: protected ones, each head's safeguard, then one top-k over all heads.

    scores: [B, H, L] (higher is kept); protected: [L] bool (kept by every head) or None; budget:
    entries per head, protected ones included -> kept [B, H, L] bool, H * budget per row.
    """
    batch, heads, length = scores.shape
    if budget >= length:
        return torch.ones_like(scores, dtype=torch.bool)
    if protected is None:
        protected = torch.zeros(length, dtype=torch.bool, device=scores.device)
    free = max(budget - int(protected.sum()), 0)  # unprotected entries per head, on average
    open_ = scores.float().masked_fill(protected, float("-inf"))
    safe = open_.topk(int(alpha * free), dim=-1).indices  # [B, H, floor]: each head's own best
    ranked = open_.scatter(-1, safe, float("inf"))
    chosen = ranked.flatten(1).topk(heads * free, dim=-1).indices  # [B, H * free]: over every head
    kept = torch.zeros(batch, heads * length, dtype=torch.bool, device=scores.device)
    return kept.scatter_(1, chosen, True).view(batch, heads, length) | protected


class RaggedLayer(DynamicLayer):
    """One layer's cache: dense [1, H, L, D] through the prefill, then each KV head at its own length.

    Packed (`pack`): `keys`/`values` [1, T, D], KV head h in slots [offsets[h], offsets[h + 1]),
    in text order, T the sum of the heads' lengths; `positions` [T] the text position of each slot.
    """

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.offsets: list[int] | None = None  # [H + 1], on the host, once packed
        self.positions: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.offsets is not None

    @property
    def lengths(self) -> list[int]:
        return [end - start for start, end in zip(self.offsets, self.offsets[1:])]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.seen += key_states.shape[-2]
        if not self.packed:
            return super().update(key_states, value_states)
        self._append(key_states, value_states)
        return self.keys, self.values  # unused: ragged_attention reads the heads from the layer

    def pack(self, kept: torch.Tensor) -> None:
        """Keep, in each head, the positions where kept [1, H, L] is True (the layer holds 0..L-1)."""
        if kept.shape[0] != 1:
            raise ValueError("a ragged cache holds one sequence (a batch stacks sequences prefilled alone)")
        index = [row.nonzero().view(-1) for row in kept[0]]  # per head, sorted: text order
        self.keys = torch.cat([self.keys[:, h, i] for h, i in enumerate(index)], dim=1)  # [1, T, D]
        self.values = torch.cat([self.values[:, h, i] for h, i in enumerate(index)], dim=1)
        self.positions = torch.cat(index)
        self.offsets = [0, *accumulate(len(i) for i in index)]

    def pack_whole(self) -> None:
        """Pack every head whole (nothing evicted): the layer's later forwards append per head."""
        self.pack(torch.ones(*self.keys.shape[:3], dtype=torch.bool, device=self.keys.device))

    def _append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value [1, H, n, D]: n new tokens at the end of every head (one copy of the layer)."""
        n = key.shape[-2]
        new = torch.arange(self.seen - n, self.seen, device=key.device)
        spans = list(zip(self.offsets, self.offsets[1:]))
        self.keys = torch.cat([x for h, (a, b) in enumerate(spans) for x in (self.keys[:, a:b], key[:, h])], dim=1)
        self.values = torch.cat([x for h, (a, b) in enumerate(spans) for x in (self.values[:, a:b], value[:, h])], dim=1)
        self.positions = torch.cat([x for a, b in spans for x in (self.positions[a:b], new)])
        self.offsets = [offset + h * n for h, offset in enumerate(self.offsets)]

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KV head h's keys and values [1, n_h, D] and text positions [n_h]."""
        a, b = self.offsets[h], self.offsets[h + 1]
        return self.keys[:, a:b], self.values[:, a:b], self.positions[a:b]

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The newest q tokens' attention, one SDPA per KV head over exactly its entries.
        query: [1, Hq, q, D] -> [1, Hq, q, D]; the q tokens are the last entries of every head."""
        heads, q = len(self.offsets) - 1, query.shape[-2]
        groups = query.shape[1] // heads
        outs = []
        for h, n in enumerate(self.lengths):
            keys, values, _ = self.head(h)
            mask = None if q == 1 else torch.ones(q, n, dtype=torch.bool, device=query.device).tril(n - q)
            outs.append(F.scaled_dot_product_attention(query[:, h * groups : (h + 1) * groups], keys[:, None],
                                                       values[:, None], attn_mask=mask, scale=scaling, enable_gqa=True))
        return torch.cat(outs, dim=1)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("adakv's ragged cache cannot be rolled back: its prefill dropped entries")

    def to_static(self, steps: int):
        """Each head's kept entries plus `steps` slots (static_decode): one SlotGroup per run of
        heads of equal length, none padded to the longest."""
        from paretoray.actors.static_decode import StaticLayer, grouped

        if not self.packed:  # no multi-token forward yet (a one-token prompt): every head whole
            self.pack_whole()
        entries = []
        for h in range(len(self.offsets) - 1):
            keys, values, positions = self.head(h)
            entries.append((keys[:, None], values[:, None], positions, len(positions) + steps))
        return StaticLayer(grouped(entries))


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The prompt's own forward: dense causal SDPA (compression follows it); afterwards each KV
    head attends over its own entries (`RaggedLayer.attend`)."""
    layer: RaggedLayer = _ACTIVE.get().layers[module.layer_idx]
    if not layer.packed:
        return end_aligned_sdpa(module, query, key, value, attention_mask, scaling=scaling)
    return layer.attend(query, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, ragged_attention)  # no mask function: masks are built here


@contextmanager
def ragged_attention_installed(model: PreTrainedModel, cache: Cache) -> Iterator[None]:
    """`model` attends through `ragged_attention` over `cache` (its layers `RaggedLayer`s) until exit."""
    token = _ACTIVE.set(cache)
    try:
        with attention_installed(model, ATTENTION):
            yield
    finally:
        _ACTIVE.reset(token)


@dataclass(frozen=True)
class AdaKVOver(Technique):
    """AdaKV bound to its member for one generation (what `AdaKV` runs; not registered)."""

    member: Technique = field(default_factory=lambda: build_technique(DEFAULT_MEMBER, {}))
    alpha_safeguard: float = 0.2

    name = "adakv"
    phase = "kv-cache"
    static_decode = True
    batched = True

    def compress(self, module, hidden_states, position_embeddings, layer: RaggedLayer, num_layers: int) -> None:
        """The member's budget and scores for this layer, AdaKV's allocation, the layer packed."""
        if self.member.kv_repeat(module) > 1:
            raise ValueError(f"adakv selects per KV head; {self.member.label} repeats KV heads to the query heads "
                             "before selecting (SnapKV's per_query_head): use gqa=group_mean")
        length = layer.keys.shape[-2]
        budget = self.member.layer_budget(module.layer_idx, num_layers, length)
        if budget >= length:
            layer.pack_whole()
            return
        scores, protected = self.member.prefill_scores(module, hidden_states, position_embeddings, layer.keys, budget)
        layer.pack(allocate(scores, budget, protected, self.alpha_safeguard))

    def new_cache(self, model: PreTrainedModel) -> Cache:
        return Cache(layers=[RaggedLayer() for _ in range(model.config.num_hidden_layers)])

    @contextmanager
    def applied(self, model: PreTrainedModel) -> Iterator[Cache]:
        cache = self.new_cache(model)
        attention_modules = [layer.self_attn for layer in model.model.layers]

        def hook(module, args, kwargs, output):
            layer: RaggedLayer = cache.layers[module.layer_idx]
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if not layer.packed and hidden_states.shape[1] > 1:
                self.compress(module, hidden_states, kwargs.get("position_embeddings"), layer, len(attention_modules))

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules]
        try:
            with ragged_attention_installed(model, cache):
                yield cache
        finally:
            for handle in handles:
                handle.remove()


@register
@dataclass(frozen=True)
class AdaKV(Technique):
    alpha_safeguard: float = param("float", 0.2, low=0.0, high=1.0,
                                   doc="each head keeps at least this share of its uniform budget (kvpress: 0.2; 1: the member's uniform rule)")

    name = "adakv"
    phase = "kv-cache"
    static_decode = True
    batched = True  # each sequence is allocated alone at its prefill, then the static caches are stacked
    accepts = "kv_cache"  # adakv+snapkv: SnapKV's budgets and scores, AdaKV's allocation
    member_requires = {
        "scores_per_head": (True, "adakv allocates the layer's budget from the member's per-head prefill scores "
                                  "(a prompt compressor's layer_budget and prefill_scores), which it does not give"),
        "decode_evicts": (False, "adakv's per-head cache only appends after the prefill, so a member that evicts "
                                 "while decoding would silently stop evicting"),
    }
    examples = {"covers": {}}  # alone, SnapKV's default 1024 entries cover the contract's prompt

    def over(self, member: Technique | None = None) -> AdaKVOver:
        member = member if member is not None else build_technique(DEFAULT_MEMBER, {})
        return AdaKVOver(member=member, alpha_safeguard=self.alpha_safeguard)

    @contextmanager
    def applied(self, model: PreTrainedModel) -> Iterator[Cache]:
        with self.over().applied(model) as cache:
            yield cache

    def generate(self, model, input_ids, max_new_tokens, eos_token_ids=None, forced_tokens=None, question_ids=None,
                 compiled=False, member: Technique | None = None):
        bound = self.over(member)
        bound.member.prepare_for_prompt(model, input_ids.shape[-1])
        return bound.generate(model, input_ids, max_new_tokens, eos_token_ids, forced_tokens, question_ids, compiled)

    def generate_batch(self, model, prompts, max_new_tokens, eos_token_ids=None, question_ids=None, compiled=False,
                       member: Technique | None = None):
        bound = self.over(member)
        for prompt in prompts:
            bound.member.prepare_for_prompt(model, prompt.shape[-1])
        return bound.generate_batch(model, prompts, max_new_tokens, eos_token_ids, question_ids, compiled)
