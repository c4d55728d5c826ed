"""The mechanism MoA and its uniform-window baseline share: per-head sink + span attention and cache.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv:2406.14909; reference code thu-nics/MoA). Every KV head h keeps the first `sinks` tokens
and its own span S_h of most recent tokens; query i of that head sees key j iff j <= i and
(j < sinks or i - j < S_h). Spans follow the elastic rule S_h = alpha_h + beta_h * N, fixed from
the prompt length N at prefill.

Plans are per KV head: under GQA the query heads of a group read one KV head, and the cache (what
the technique saves) is per KV head, so a group shares its span.

Cache layout (`ElasticSpanLayer`): per layer one packed buffer [B, T, D] in which KV head h owns
exactly `capacity[h]` = sinks + S_h slots (no padding to the largest head): sinks, then a ring of
S_h slots for the window. A decoded token overwrites its head's oldest
window entry, so decoding copies nothing. Keys are stored RoPE-rotated at their text positions,
and a single query attends to a set of keys whatever their slot order.

Attention: prefill masks each head to its band (`sliding_window_prefill`), decoding attends to each
head's valid slots (`variable_length_decode`); on CUDA with Triton the kernels of
`paretoray.kernels` run, elsewhere their PyTorch references.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from paretoray.actors.generation import attention_installed
from paretoray.actors.techniques.base import Technique

ATTENTION = "paretoray_elastic"
GROWTH = 64  # slots a head whose span exceeds the text gets at a time
_ACTIVE: ContextVar[Cache | None] = ContextVar("elastic_cache", default=None)


def span_for_density(density: float, sinks: int, n: int) -> int:
    """The span whose sinks + span keep `density` of a prompt of n tokens in the KV cache (MoA's
    "kv" density: the share of the cache kept, which is also the mean attention span over N)."""
    return max(1, round(density * n) - sinks)


def _use_kernels(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from paretoray.kernels import triton_available

    return triton_available(device)


class ElasticSpanLayer(DynamicLayer):
    """One layer's cache: per KV head, `sinks` first tokens + a ring of its own span (see module doc).

    Packed: `keys`/`values` are [B, T, D] with KV head g in slots [offsets[g], offsets[g + 1]): its
    capacity sinks + S_g, or, while the text is shorter than that, what it holds plus up to GROWTH
    slots to decode into (grown GROWTH at a time).
    """

    is_croppable = False

    def __init__(self, sinks: int, spans_of):
        super().__init__()
        self.sinks = sinks
        self.spans_of = spans_of  # prompt length -> this layer's spans [Hkv]
        self.seen = 0
        self.lengths_seen_at_prefill = 0
        self.spans: list[int] | None = None  # per KV head, fixed at prefill
        self.capacity: list[int] = []  # per KV head: sinks + span, the most it ever holds
        self.region: list[int] = []  # per KV head: slots allocated now (<= capacity)
        self.lengths: list[int] = []  # valid slots per KV head
        self.write: list[int] = []  # per KV head: the window slot (0..span-1) the next token overwrites
        self.host_offsets: list[int] = []
        self.offsets: torch.Tensor | None = None  # [Hkv + 1] int32
        self.lengths_tensor: torch.Tensor | None = None  # [Hkv] int32

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.spans is None:
            self._prefill(key_states, value_states)
            self.seen = self.lengths_seen_at_prefill = n
            return key_states, value_states  # the prefill attends over everything, masked per head
        if n != 1:
            raise NotImplementedError("an elastic-span cache takes one prompt, then one token per step")
        self.seen += 1
        self._append(key_states, value_states)
        return self.keys, self.values

    def _prefill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device
        n = keys.shape[-2]
        self.spans = [max(1, int(s)) for s in self.spans_of(n)]
        self.capacity = [self.sinks + s for s in self.spans]
        kept_keys, kept_values, self.region = [], [], []
        for h, span in enumerate(self.spans):
            if n <= self.capacity[h]:
                kept = torch.arange(n, device=keys.device)
            else:  # sinks, then the last `span` tokens in text order: slot sinks + 0 is the oldest
                kept = torch.cat([torch.arange(self.sinks, device=keys.device), torch.arange(n - span, n, device=keys.device)])
            # A head whose span outgrows the prompt gets a little room to decode into, not its whole
            # span at once: a span longer than the text would otherwise hold empty slots.
            region = min(self.capacity[h], len(kept) + GROWTH)
            spare = region - len(kept)
            kept_keys += [keys[:, h, kept], keys.new_zeros(keys.shape[0], spare, keys.shape[-1])]
            kept_values += [values[:, h, kept], values.new_zeros(values.shape[0], spare, values.shape[-1])]
            self.lengths.append(len(kept))
            self.region.append(region)
        self.keys, self.values = torch.cat(kept_keys, dim=1), torch.cat(kept_values, dim=1)
        self.write = [0] * len(self.spans)
        self._index_regions()

    def _index_regions(self) -> None:
        self.host_offsets = [0, *np.cumsum(self.region).tolist()]  # kept on the host: no GPU read per step
        self.offsets = torch.tensor(self.host_offsets, dtype=torch.int32, device=self.keys.device)
        self.lengths_tensor = torch.tensor(self.lengths, dtype=torch.int32, device=self.keys.device)

    def _grow(self, h: int) -> None:
        """Give head h up to GROWTH more slots (a copy of the layer's buffer, once every GROWTH tokens)."""
        extra = min(GROWTH, self.capacity[h] - self.region[h])
        at = self.host_offsets[h + 1]
        pad = self.keys.new_zeros(self.keys.shape[0], extra, self.keys.shape[-1])
        self.keys = torch.cat([self.keys[:, :at], pad, self.keys[:, at:]], dim=1)
        self.values = torch.cat([self.values[:, :at], pad, self.values[:, at:]], dim=1)
        self.region[h] += extra
        self._index_regions()

    def _append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        for h in range(len(self.spans)):
            if self.lengths[h] == self.region[h] < self.capacity[h]:
                self._grow(h)
        slots = []
        offsets = self.host_offsets
        for h, span in enumerate(self.spans):
            if self.lengths[h] < self.capacity[h]:
                slots.append(offsets[h] + self.lengths[h])  # still filling: the text is shorter than the capacity
                self.lengths[h] += 1
            else:  # full: overwrite the oldest window entry
                slots.append(offsets[h] + self.sinks + self.write[h])
                self.write[h] = (self.write[h] + 1) % span
        index = torch.tensor(slots, device=key.device)
        self.keys[:, index] = key[:, :, 0]
        self.values[:, index] = value[:, :, 0]
        self.lengths_tensor = torch.tensor(self.lengths, dtype=torch.int32, device=key.device)

    def head_entries(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """KV head h's valid keys and values, [B, length, D] each."""
        start = self.host_offsets[h]
        return self.keys[:, start : start + self.lengths[h]], self.values[:, start : start + self.lengths[h]]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen, 0

    def kept_positions(self) -> list[list[int]]:
        """Text positions each KV head holds (sinks, then its window), for tests and reports."""
        return [
            list(range(self.seen)) if self.seen <= self.sinks + span
            else list(range(self.sinks)) + list(range(self.seen - span, self.seen))
            for span in self.spans
        ]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an elastic-span cache has already evicted what a rollback would need")

    def to_static(self, steps: int):
        """Each KV head's sinks + span ring at its own capacity (no padding to the largest head);
        runs of heads with one capacity share a group, so a uniform window is one attention call.
        Right after the prefill, or after tokens were appended (a context-only question): each slot
        is given the text position it holds (`slot_positions`), whatever the ring's order."""
        from paretoray.actors.static_decode import StaticLayer, grouped

        if self.spans is None:
            return None
        entries = []
        for h in range(len(self.spans)):
            keys, values = self.head_entries(h)
            positions = self.slot_positions(h)
            capacity = min(self.capacity[h], len(positions) + steps)
            entries.append((keys[:, None], values[:, None], torch.tensor(positions, device=keys.device), capacity))
        return StaticLayer(grouped(entries, n_sink=self.sinks))

    def slot_positions(self, h: int) -> list[int]:
        """The text position in each of head h's valid slots, in slot order: text order while the
        head fills; once full, its sinks, then the ring, whose slot `write[h]` holds the oldest."""
        span = self.spans[h]
        if self.seen <= self.capacity[h]:
            return list(range(self.seen))
        oldest = self.seen - span
        return list(range(self.sinks)) + [oldest + (j - self.write[h]) % span for j in range(span)]


def elastic_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Per-head sink + span attention. query [B, Hq, q, D]; key/value as the cache layer returned
    them: [B, Hkv, N, D] for the prompt, the packed [B, T, D] buffers when decoding."""
    layer: ElasticSpanLayer = _ACTIVE.get().layers[module.layer_idx]
    heads = len(layer.spans)
    groups = query.shape[1] // heads
    kernels = _use_kernels(query.device)
    if query.shape[-2] > 1:  # the prompt: full keys, one band per head
        windows = torch.tensor(layer.spans, dtype=torch.int32, device=query.device).repeat_interleave(groups)
        if kernels:
            from paretoray.kernels import sliding_window_prefill as prefill
        else:
            from paretoray.kernels import sliding_window_prefill_reference as prefill
        out = prefill(query, key, value, windows, layer.sinks, scaling)
    elif kernels:
        from paretoray.kernels import variable_length_decode

        lengths = layer.lengths_tensor.expand(query.shape[0], -1)
        out = variable_length_decode(query[:, :, 0], key, value, layer.offsets, lengths, scaling)[:, :, None]
    else:  # one SDPA per KV head over exactly its entries
        outs = []
        for h in range(heads):
            k, v = layer.head_entries(h)
            q = query[:, h * groups : (h + 1) * groups]
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k[:, None], v[:, None], scale=scaling, enable_gqa=True))
        out = torch.cat(outs, dim=1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, elastic_attention)  # no mask function: masks are built here


@dataclass(frozen=True)
class ElasticSpans(Technique):
    """Base of per-head sink + span techniques: subclasses say each layer's spans for a prompt length."""

    phase = "sparse-attention"
    static_decode = True
    provides = ("kv_cache",)
    decode_evicts = True  # each head's span rolls
    context_only = False
    context_only_note = "each head's span is set from the whole prompt; use query_placement: query_aware"
    batched = True  # each sequence's spans follow its own prompt length
    reports = ("target_calls", "kv_density")  # see generate

    def sinks(self) -> int:
        raise NotImplementedError

    def layer_spans(self, model: PreTrainedModel, layer_idx: int, prompt_len: int) -> list[int]:
        """Span (tokens) of each KV head of this layer for a prompt of `prompt_len` tokens."""
        raise NotImplementedError

    def new_cache(self, model: PreTrainedModel) -> Cache:
        def spans_of(layer_idx: int):
            return lambda n: self.layer_spans(model, layer_idx, n)

        return Cache(layers=[ElasticSpanLayer(self.sinks(), spans_of(i)) for i in range(model.config.num_hidden_layers)])

    def prepare_for_prompt(self, model: PreTrainedModel, prompt_len: int) -> None:
        """Anything the spans need, fetched before generating (outside inference mode)."""

    def kv_density(self, model: PreTrainedModel, prompt_len: int) -> float:
        """Kept KV entries over dense entries at a prompt of prompt_len tokens, over all layers and
        KV heads: sinks + span per head, at most the whole prompt (what the cache holds after prefill)."""
        kept = [min(prompt_len, self.sinks() + max(1, int(span)))
                for layer in range(model.config.num_hidden_layers) for span in self.layer_spans(model, layer, prompt_len)]
        return sum(kept) / (len(kept) * prompt_len)

    def generate(self, model, input_ids, max_new_tokens, eos_token_ids=None, forced_tokens=None, question_ids=None, compiled=False):
        if question_ids is not None and not self.context_only:
            raise ValueError(f"{self.name}: {self.context_only_note}")
        prompt_len = input_ids.shape[-1]
        self.prepare_for_prompt(model, prompt_len)
        run = super().generate(model, input_ids, max_new_tokens, eos_token_ids, forced_tokens, question_ids, compiled)
        # One target forward per decoded token, as the runner records for plain decoding when stats are empty.
        run.stats = {"target_calls": len(run.step_s), **run.stats, "kv_density": self.kv_density(model, prompt_len)}
        return run

    def generate_batch(self, model, prompts, max_new_tokens, eos_token_ids=None, question_ids=None, compiled=False):
        if question_ids is not None and not self.context_only:
            raise ValueError(f"{self.name}: {self.context_only_note}")
        lengths = [ids.shape[-1] for ids in prompts]
        for length in sorted(set(lengths)):
            self.prepare_for_prompt(model, length)
        run = super().generate_batch(model, prompts, max_new_tokens, eos_token_ids, question_ids, compiled)
        run.stats = [{"target_calls": len(tokens) - 1, "kv_density": self.kv_density(model, n)} for tokens, n in zip(run.tokens, lengths)]
        return run

    @contextmanager
    def applied(self, model: PreTrainedModel) -> Iterator[Cache]:
        cache = self.new_cache(model)
        token = _ACTIVE.set(cache)
        try:
            with attention_installed(model, ATTENTION):
                yield cache
        finally:
            _ACTIVE.reset(token)


def kv_heads(model: PreTrainedModel) -> int:
    config = model.config
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def mean_span(spans: list[list[int]]) -> float:
    return float(np.mean([s for layer in spans for s in layer])) if spans else math.nan
