"""StreamingLLM: attention sinks plus a rolling window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv:2309.17453; reference code mit-han-lab/streaming-llm).

Eviction: the cache holds the first `n_sink` tokens and the last `window` tokens; every forward
attends to what the cache holds plus its own new tokens, then the oldest non-sink entries are
dropped. A prompt that overflows the budget goes through the mechanism every prompt compressor
shares (`kv_compression`: score -> select -> gather, here with recency as the score and the sinks
protected); single decoded tokens then use a ring buffer instead of re-gathering every step. A prompt is prefilled in one forward with full attention inside it (as the reference's
chat demo does for each prompt); from then on each decoded token sees sinks + window + itself.

Positions: the paper assigns positions by index in the cache, not in the text; the reference
stores keys before RoPE and re-rotates the whole cache every step. RoPE scores depend only on
the query-key distance, so we keep recent keys (contiguous in the text) at their original
positions, feed new tokens at their original positions, and rotate only the sink keys forward by
the number of evicted tokens. Every distance then equals the cache-index distance of the paper,
at O(n_sink) instead of O(window) extra work per step.

Refused (ValueError when the technique is applied, naming the config field): models whose RoPE
that re-rotation would get wrong: partial rotary (`partial_rotary_factor` < 1, `rotary_dim` below
the head dimension), RoPE that differs per layer (`rope_parameters` per layer type, Gemma's
`rope_local_base_freq`), and RoPE types whose angle is not a fixed function of the distance
('dynamic', 'longrope', ...: see `SHIFTABLE_ROPE_TYPES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from paretoray.actors.techniques.base import Technique, param, register
from paretoray.actors.techniques.kv_compression import gather, select


def rotate_by(keys: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE-rotated keys `shift` positions further (HF's rotate-half layout).

    keys: [batch, kv_heads, n, head_dim]; inv_freq: [head_dim // 2]; shift: a number, or one per
    batch row as [batch, 1, 1, 1] (a stacked batch's rows have evicted different numbers of tokens).
    """
    angle = shift * inv_freq.to(device=keys.device, dtype=torch.float64)
    angle = torch.cat([angle, angle], dim=-1).to(torch.float32)
    half = keys.shape[-1] // 2
    k = keys.float()
    rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * angle.cos() + rotated_half * angle.sin()).to(keys.dtype)


# RoPE types whose rotation is R(theta_i * position) with theta_i fixed once for all lengths, so
# moving a key by `shift` positions is R(theta_i * shift) whatever its position: 'linear' and
# 'llama3' only rescale the frequencies; 'yarn' also scales cos/sin by a constant attention factor,
# which commutes with a rotation. 'dynamic' (NTK) recomputes theta when the positions grow past
# max_position_embeddings and 'longrope' switches frequency sets past
# original_max_position_embeddings: the angle then depends on more than the distance, and the
# paper's cache-index positions would not cross the threshold where the text positions do.
SHIFTABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def check_rope(config) -> None:
    """Refuse a model whose rotary embedding `rotate_by` would move wrongly (ValueError naming the
    config field): re-rotating the sinks assumes one full-head, rotate-half RoPE with fixed
    frequencies, the same in every layer."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = type(config).__name__
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(value, dict) for value in rope.values()):  # one entry per layer type
        if len({repr(sorted(value.items())) for value in rope.values()}) > 1:
            raise ValueError(
                f"streaming_llm: {model_type}.rope_parameters differs between layer types ({', '.join(rope)}); "
                "re-rotating the sink keys assumes one RoPE for every layer"
            )
        rope = next(iter(rope.values()))
    local_base = getattr(config, "rope_local_base_freq", None)
    if local_base is not None and local_base != rope.get("rope_theta", getattr(config, "rope_theta", None)):
        raise ValueError(
            f"streaming_llm: {model_type}.rope_local_base_freq={local_base} gives local layers another RoPE base; "
            "re-rotating the sink keys assumes one RoPE for every layer"
        )
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial is not None and partial < 1:
        raise ValueError(
            f"streaming_llm: {model_type}.partial_rotary_factor={partial}: RoPE covers part of each head, "
            "and re-rotating the sink keys assumes full-dimension RoPE"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = getattr(config, "rotary_dim", None)
    if rotary_dim is not None and rotary_dim != head_dim:
        raise ValueError(
            f"streaming_llm: {model_type}.rotary_dim={rotary_dim} differs from the head dimension {head_dim}; "
            "re-rotating the sink keys assumes full-dimension RoPE"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SHIFTABLE_ROPE_TYPES:
        raise ValueError(
            f"streaming_llm: {model_type}.rope_parameters['rope_type']={rope_type!r}: its rotation is not a fixed "
            f"function of the position difference, so the sink keys cannot be re-rotated; supported: "
            f"{', '.join(SHIFTABLE_ROPE_TYPES)}"
        )


def rope_inv_freq(model: PreTrainedModel) -> torch.Tensor:
    """The model's one set of RoPE frequencies [head_dim // 2] (checked by `check_rope` first)."""
    check_rope(model.config)
    found = [inv_freq.detach() for module in model.modules()
             if isinstance(inv_freq := getattr(module, "inv_freq", None), torch.Tensor)]
    if not found:
        raise ValueError(f"streaming_llm needs a model with rotary position embeddings; {type(model).__name__} has none")
    if any(f.shape != found[0].shape or not torch.equal(f, found[0]) for f in found[1:]):
        raise ValueError(f"streaming_llm: {type(model).__name__} has rotary embeddings with different frequencies; "
                         "re-rotating the sink keys assumes one RoPE for every layer")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if 2 * found[0].numel() != head_dim:
        raise ValueError(f"streaming_llm: {type(model).__name__}'s RoPE has {found[0].numel()} frequencies for a head "
                         f"dimension of {head_dim} (partial rotary); re-rotating the sink keys assumes full-dimension RoPE")
    return found[0]


class SinkWindowLayer(DynamicLayer):
    """One layer's cache: `n_sink` attention sinks + the `window` most recent tokens.

    Once full, the layer is a ring buffer of `n_sink + window + 1` slots: sinks, the window, and
    one slot for the incoming token. A decoded token is written into that slot in place, attends
    to every slot, and the window's oldest entry becomes the next write slot. A single query needs
    no mask and RoPE is already inside the keys, so slot order does not matter; this avoids
    copying the window twice per step (append, then evict), which made large windows slower than
    the dense cache they replace.
    """

    is_croppable = False

    def __init__(self, n_sink: int, window: int, inv_freq: torch.Tensor):
        super().__init__()
        self.n_sink, self.window, self.inv_freq = n_sink, window, inv_freq
        self.seen = 0  # tokens fed so far: the next token's position in the text
        self.evicted = 0  # tokens dropped so far: how far the sinks must move forward
        self._sinks_unshifted: torch.Tensor | None = None
        self._sink_shift = 0  # the shift the stored sink keys carry now
        self._write_slot: int | None = None  # ring mode: the recent-region slot the next token fills
        self._valid = 0  # entries that hold a kept token (the write slot holds none)

    @property
    def capacity(self) -> int:
        return self.n_sink + self.window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        if key_states.shape[-2] == 1 and self._write_slot is not None:
            return self._ring_update(key_states, value_states)
        keys, values = self._ordered()
        keys = torch.cat([keys, key_states], dim=-2)
        values = torch.cat([values, value_states], dim=-2)
        self._store(keys, values)
        return keys, values  # this forward still attends to everything it was given

    def _ring_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        self._shift_sinks()
        slot = self.n_sink + self._write_slot
        self.keys[..., slot : slot + 1, :] = key_states
        self.values[..., slot : slot + 1, :] = value_states
        # After this forward the window's oldest entry is dropped: its slot takes the next token.
        self._write_slot = (self._write_slot + 1) % (self.window + 1)
        self.evicted += 1
        return self.keys, self.values

    def _ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept entries in text order (sinks, then the window from oldest to newest)."""
        if self._write_slot is None:
            return self.keys, self.values
        self._shift_sinks()
        oldest = self._write_slot + 1
        order = [*range(self.n_sink)] + [self.n_sink + (oldest + i) % (self.window + 1) for i in range(self.window)]
        index = torch.tensor(order, device=self.keys.device)
        return self.keys.index_select(-2, index), self.values.index_select(-2, index)

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep sinks + window of `keys` (text order); switch to ring mode once full."""
        excess = keys.shape[-2] - self.capacity
        if excess < 0:
            self.keys, self.values, self._valid, self._write_slot = keys, values, keys.shape[-2], None
            return
        if self._sinks_unshifted is None:  # nothing was evicted before: the sinks carry no shift yet
            self._sinks_unshifted = keys[..., : self.n_sink, :].clone()
        self.evicted += excess  # the stored sinks keep their shift until the next update brings it up
        # The shared score -> select -> gather: the score is recency, the sinks are protected.
        length = keys.shape[-2]
        recency = torch.arange(length, dtype=torch.float32, device=keys.device).expand(*keys.shape[:2], -1)
        index = select(recency, self.capacity, torch.arange(length, device=keys.device) < self.n_sink).sort(-1).values
        spare = keys.new_zeros(*keys.shape[:-2], 1, keys.shape[-1])
        self.keys = torch.cat([gather(keys, index), spare], dim=-2)
        self.values = torch.cat([gather(values, index), spare], dim=-2)
        self._valid, self._write_slot = self.capacity, self.window

    def _shift_sinks(self) -> None:
        if self.n_sink and self._sink_shift != self.evicted:
            # Rotated from the unshifted copy each time, so rounding does not accumulate.
            self.keys[..., : self.n_sink, :] = rotate_by(self._sinks_unshifted, self.evicted, self.inv_freq)
            self._sink_shift = self.evicted

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # All kept entries precede the new queries; place them just before position `seen`.
        return self._valid + query_length, self.seen - self._valid

    def kept_positions(self) -> list[int]:
        """Original text positions of the kept entries (sinks, then the recent window)."""
        if self.seen <= self.capacity:
            return list(range(self.seen))
        return list(range(self.n_sink)) + list(range(self.seen - self.window, self.seen))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a StreamingLLM cache has already evicted what a rollback would need")

    def to_static(self, steps: int):
        """Sinks + window + the incoming token's slot, as a ring whose sinks move forward by the
        tokens evicted (static_decode.SinkGroup); None while the prompt is shorter than the sinks."""
        from paretoray.actors.static_decode import SinkGroup, StaticLayer

        if self.seen < self.n_sink:
            return None
        keys, values = self._ordered()
        unshifted = self._sinks_unshifted if self._sinks_unshifted is not None else keys[..., : self.n_sink, :]
        positions = torch.tensor(self.kept_positions(), device=keys.device)
        capacity = min(self.capacity + 1, keys.shape[-2] + steps)
        group = SinkGroup(keys, values, positions, capacity, self.n_sink, unshifted, self.inv_freq, self.capacity)
        return StaticLayer([group])


@register
@dataclass(frozen=True)
class StreamingLLM(Technique):
    n_sink: int = param("int", 4, low=0, high=64, doc="initial tokens kept as attention sinks (paper: 4)")
    window: int = param("int", 1020, low=1, high=131072, log=True, doc="most recent tokens kept")

    name = "streaming_llm"
    phase = "kv-cache"
    static_decode = True
    provides = ("kv_cache",)
    decode_evicts = True  # the window rolls
    batched = True
    examples = {"covers": {}, "compresses": {"n_sink": 4, "window": 32}}

    def new_cache(self, model: PreTrainedModel) -> Cache:
        inv_freq = rope_inv_freq(model)
        return Cache(
            layers=[SinkWindowLayer(self.n_sink, self.window, inv_freq) for _ in range(model.config.num_hidden_layers)]
        )
