"""KV-cache quantization as KIVI does it: keys per channel, values per token, a full-precision tail.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024
(arXiv:2402.02750; reference code jy-yuan/KIVI, `models/llama_kivi.py`, `quant/new_pack.py`).

Quantization is asymmetric min-max, round to nearest: for a group x, `scale = (max - min) / (2^bits - 1)`,
`code = round((x - min) / scale)`, `x^ = code * scale + min`. Keys are grouped per channel over
`group_size` consecutive tokens, values per token over `group_size` consecutive channels. Codes are
stored packed, 8 / bits to a byte; scales and minima (the zero points) in the model's dtype.

When tokens leave the full-precision residual (the reference's rule, for prefill and decoding alike):
- keys: the residual is quantized in whole blocks of `residual_length` tokens. After the prefill of L
  tokens, the first L - L mod R are quantized and the last L mod R stay full; each decoded key is
  appended to the residual, and when it reaches R tokens all R are quantized (R / group_size groups)
  and the residual empties. So between 0 and R - 1 keys are full precision.
- values: the last `residual_length` values are full precision; each decoded value pushes the oldest
  one out of the residual, quantized on its own (per token needs no group of tokens).
A step attends with the residual and the new token in full precision and moves tokens out after it
(as the reference does: its prefill attends with unquantized states, and its decode step quantizes
after the attention), so `update` returns the previously quantized part dequantized, then the
full-precision residual and the new tokens.

Deviations from the reference: (1) it asserts that R is a multiple of group_size; here keys move in
blocks of R rounded up to whole groups (at least one group), so any R is accepted (R = 0: values
are all quantized, keys keep only the group being filled) and the rule is the reference's whenever R
is a positive multiple of group_size. (2) A group whose values are all equal (scale 0, which the
reference turns into NaN) stores code 0 and dequantizes to its value exactly. (3) head dims not a
multiple of group_size get a smaller last value group; packing pads the channel axis to whole bytes.
(4) Codes and dequantized states are computed in fp32 from the stored (model-dtype) scales and
minima; the reference computes in fp16. (5) The reference keeps K and V bits apart (`k_bits`,
`v_bits`); here one `bits` covers both.
Dequantization here is plain torch, the whole quantized part at every step (the reference has fused
CUDA kernels that read the packed codes); it decodes eagerly (`static_decode = False`).

Why not transformers' `QuantizedLayer`: its prefill quantizes every token (no residual kept), and when
its residual fills it re-quantizes the whole dequantized cache together with the residual (errors
compound, and groups span old and new tokens), with one quantization axis for keys and values alike;
KIVI quantizes each token once, keys per channel and values per token. Its backends (quanto, hqq)
are not installed either. So this is a `DynamicLayer` of its own, tested against a plain reference.

Composition: `KVQuant.adopt(model, cache)` quantizes any cache right after a prefill (dense, or the
`CompressedLayer`s SnapKV / PyramidKV / H2O leave), keeping each layer's token count (`seen`) apart
from what it stores, so decoding continues at the right positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from paretoray.actors.generation import Generation, cache_nbytes, decode, eager_step, prefill, timed
from paretoray.actors.techniques.base import Technique, param, register


# ---- packing -----------------------------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) along the last axis, `8 // bits` to a byte (first code in the low
    bits); the axis is zero-padded to whole bytes. [..., D] -> uint8 [..., ceil(D * bits / 8)]."""
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad))
    codes = codes.view(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 [..., ceil(length * bits / 8)] -> uint8 codes [..., length]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :length]


# ---- min-max quantization ------------------------------------------------------------------------


def minmax_codes(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest codes of x given its group's min and max (broadcast): (codes, scale).
    The scale is kept in x's dtype (as stored); the codes are computed in fp32 from the stored scale
    and min, so a bf16 model's 8-bit codes are not off by one. A constant group (scale 0) gets code 0,
    so it dequantizes to its min exactly."""
    scale = (high - low) / (2**bits - 1)
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = ((x.float() - low.float()) / divisor).round().clamp(0, 2**bits - 1)
    return codes, scale


@dataclass
class QuantizedKeys:
    """Keys quantized per channel over groups of `group` tokens (n a multiple of group).
    codes: uint8 [B, H, n, ceil(D*bits/8)]; scale, zero: [B, H, n / group, D] (model dtype)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


@dataclass
class QuantizedValues:
    """Values quantized per token over groups of `group` channels.
    codes: uint8 [B, H, n, ceil(D*bits/8)]; scale, zero: [B, H, n, ceil(D / group)] (model dtype)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def quantize_keys(keys: torch.Tensor, bits: int, group: int) -> QuantizedKeys:
    """keys [B, H, n, D], n a multiple of `group` -> per-channel codes over each group of tokens."""
    batch, heads, n, dim = keys.shape
    assert n % group == 0, f"keys are quantized in whole groups of {group} tokens, got {n}"
    grouped = keys.view(batch, heads, n // group, group, dim)
    low, high = grouped.amin(dim=3, keepdim=True), grouped.amax(dim=3, keepdim=True)  # [B, H, n/g, 1, D]
    codes, scale = minmax_codes(grouped, low, high, bits)
    return QuantizedKeys(pack(codes.view(batch, heads, n, dim), bits), scale.squeeze(3), low.squeeze(3))


def dequantize_keys(q: QuantizedKeys, bits: int, group: int, dim: int) -> torch.Tensor:
    """-> [B, H, n, D] in the scales' dtype (computed in fp32, rounded once)."""
    codes = unpack(q.codes, bits, dim)
    batch, heads, n, _ = codes.shape
    grouped = codes.view(batch, heads, n // group, group, dim).float()
    return (grouped * q.scale.unsqueeze(3).float() + q.zero.unsqueeze(3).float()).view(batch, heads, n, dim).to(q.scale.dtype)


def quantize_values(values: torch.Tensor, bits: int, group: int) -> QuantizedValues:
    """values [B, H, n, D] -> per-token codes over each group of `group` channels (the last group
    smaller when D is not a multiple of it)."""
    dim = values.shape[-1]
    groups = math.ceil(dim / group)
    pad = groups * group - dim  # repeat the last channel: the last group's min and max are unchanged
    padded = torch.cat([values, values[..., -1:].expand(*values.shape[:-1], pad)], dim=-1) if pad else values
    grouped = padded.view(*values.shape[:-1], groups, group)
    low, high = grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)  # [B, H, n, G, 1]
    codes, scale = minmax_codes(grouped, low, high, bits)
    return QuantizedValues(pack(codes.flatten(-2)[..., :dim], bits), scale.squeeze(-1), low.squeeze(-1))


def dequantize_values(q: QuantizedValues, bits: int, group: int, dim: int) -> torch.Tensor:
    """-> [B, H, n, D] in the scales' dtype (computed in fp32, rounded once)."""
    groups = q.scale.shape[-1]
    codes = unpack(q.codes, bits, dim).float()
    codes = torch.nn.functional.pad(codes, (0, groups * group - dim)).view(*codes.shape[:-1], groups, group)
    return (codes * q.scale.unsqueeze(-1).float() + q.zero.unsqueeze(-1).float()).flatten(-2)[..., :dim].to(q.scale.dtype)


def _append(old, new, cls):
    """Concatenate two quantized parts along their token (keys: group) axis, dim 2 for all fields."""
    if old is None:
        return new
    return cls(*(torch.cat([a, b], dim=2) for a, b in ((old.codes, new.codes), (old.scale, new.scale), (old.zero, new.zero))))


# ---- the cache -----------------------------------------------------------------------------------


class KIVILayer(DynamicLayer):
    """One layer of a KIVI cache: quantized keys and values, then full-precision residuals.

    `keys` / `values` hold only the full-precision residuals [B, H, r, D] (r differs between keys and
    values); `quantized_keys` / `quantized_values` the older tokens. `seen` counts tokens fed (the next
    token's text position), which exceeds what is stored when the layer adopted a compressed cache.
    `repeat` > 1: the layer holds one head per query head (SnapKV's per_query_head), and each arriving
    token's KV heads are repeated to match.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, bits: int, group_size: int, residual_length: int, repeat: int = 1):
        super().__init__()
        self.bits, self.group, self.residual = bits, group_size, residual_length
        self.key_block = max(group_size, math.ceil(residual_length / group_size) * group_size)
        self.repeat = repeat
        self.seen = 0
        self.quantized_keys: QuantizedKeys | None = None
        self.quantized_values: QuantizedValues | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.head_dim = key_states.shape[-1]

    @property
    def stored(self) -> int:
        """Entries held, quantized or not (the same for keys and values)."""
        if not self.is_initialized:
            return 0
        quantized = 0 if self.quantized_keys is None else self.quantized_keys.codes.shape[-2]
        return quantized + self.keys.shape[-2]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored entry in text order, the quantized ones dequantized: ([B, H, n, D], [B, H, n, D])."""
        keys, values = self.keys, self.values
        if self.quantized_keys is not None:
            keys = torch.cat([dequantize_keys(self.quantized_keys, self.bits, self.group, self.head_dim), keys], dim=-2)
        if self.quantized_values is not None:
            values = torch.cat([dequantize_values(self.quantized_values, self.bits, self.group, self.head_dim), values], dim=-2)
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, Hkv, q, D] new states; return all stored ones plus the new, the residual and the
        new in full precision. Tokens then leave the residual by KIVI's rule (`flush`)."""
        if self.repeat > 1:
            key_states = key_states.repeat_interleave(self.repeat, dim=1)
            value_states = value_states.repeat_interleave(self.repeat, dim=1)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        keys, values = self.dequantized()
        self.flush()
        return keys, values

    def flush(self) -> None:
        """Move tokens out of the residuals: keys in whole blocks of `key_block` tokens, values all but
        the last `residual_length`. The residuals are re-allocated, so the moved states are freed."""
        move = self.keys.shape[-2] // self.key_block * self.key_block
        if move:
            new = quantize_keys(self.keys[..., :move, :], self.bits, self.group)
            self.quantized_keys = _append(self.quantized_keys, new, QuantizedKeys)
            self.keys = self.keys[..., move:, :].clone()
        move = max(0, self.values.shape[-2] - self.residual)
        if move:
            new = quantize_values(self.values[..., :move, :], self.bits, self.group)
            self.quantized_values = _append(self.quantized_values, new, QuantizedValues)
            self.values = self.values[..., move:, :].clone()

    def nbytes(self) -> int:
        """Bytes physically held: packed codes, scales and zero points, and the residuals."""
        tensors = [self.keys, self.values] if self.is_initialized else []
        for q in (self.quantized_keys, self.quantized_values):
            if q is not None:
                tensors += [q.codes, q.scale, q.zero]
        return sum(t.numel() * t.element_size() for t in tensors)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored
        return stored + query_length, self.seen - stored

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.quantized_keys = self.quantized_values = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be rolled back (its tokens are quantized once)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a quantized KV cache does not reorder its batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a quantized KV cache does not reorder its batch")


class KIVICache(Cache):
    """A cache of `KIVILayer`s that counts its own physical bytes (`generation.cache_nbytes`)."""

    def __init__(self, layers: list[KIVILayer]):
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# ---- the technique -------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class KVQuant(Technique):
    bits: int = param("categorical", 4, choices=(2, 4, 8), doc="bits per key and value code (KIVI: 2 or 4)")
    group_size: int = param("int", 32, low=8, high=256, log=True,
                            doc="tokens per key group (per channel), channels per value group (per token); KIVI: 32")
    residual_length: int = param("int", 32, low=0, high=4096,
                                 doc="recent tokens kept in full precision (keys: 0 to R-1, values: the last R); KIVI: 32 or 128")

    name = "kv_quant"
    phase = "kv-cache"
    static_decode = False
    static_note = ("decodes eagerly: every step dequantizes the packed codes and the residual moves tokens "
                   "into them, which the fixed slot buffers of static_decode do not model")
    # covers: a residual longer than the 160-token prompt and its 8 new tokens keeps everything exact.
    examples = {"covers": {"bits": 8, "residual_length": 256}, "compresses": {"bits": 2}}

    def new_layer(self, repeat: int = 1) -> KIVILayer:
        return KIVILayer(self.bits, self.group_size, self.residual_length, repeat)

    def new_cache(self, model: PreTrainedModel) -> KIVICache:
        """Dense prefill through `update`: the prompt attends in full precision, then all but the
        residual is quantized (KIVI's prefill); decoding quantizes as the residual fills."""
        return KIVICache([self.new_layer() for _ in range(model.config.num_hidden_layers)])

    # Composition: kv_quant+snapkv stores what SnapKV keeps, quantized (the member prefills with its
    # own hooks and selection; `adopt` takes its kept entries). A member that evicts while decoding
    # would stop evicting once its entries are adopted: refused.
    accepts = "kv_cache"
    member_requires = {"decode_evicts": (False, "kv_quant continues the member's kept entries append-only, "
                                         "so a member that evicts while decoding would silently stop evicting")}
    provides = ("kv_cache",)

    def generate(self, model, input_ids, max_new_tokens, eos_token_ids=None, forced_tokens=None, question_ids=None,
                 compiled=False, member: Technique | None = None) -> Generation:
        """Alone: KIVI's cache from the prefill on. With a `member` (a composition): the member's
        prefill chooses the entries, which are then quantized (`adopt`, timed in the prefill) and
        decoded eagerly."""
        if member is None:
            return super().generate(model, input_ids, max_new_tokens, eos_token_ids, forced_tokens, question_ids, compiled)
        member.prepare_for_prompt(model, input_ids.shape[-1])
        with torch.inference_mode():
            steps = len(forced_tokens) if forced_tokens is not None else max_new_tokens
            with member.applied(model) as cache:
                first, prefill_s = prefill(model, input_ids, cache, question_ids)
            adopt_s: list[float] = []
            with timed(input_ids.device, adopt_s):
                quantized = self.adopt(model, cache)
            del cache
            tokens, step_s, warmup_s, agree = decode(
                eager_step(model, quantized), first, steps, input_ids.device, eos_token_ids, forced_tokens)
            return Generation(
                tokens=tokens, prefill_s=prefill_s + adopt_s[0], step_s=step_s, kv_bytes=cache_nbytes(quantized),
                agreement=(agree / steps) if forced_tokens is not None and steps else None, warmup_s=warmup_s)

    @torch.no_grad()
    def adopt(self, model: PreTrainedModel, cache: Cache) -> KIVICache:
        """`cache` (after a prefill) quantized by KIVI's rule, as if its entries had been prefilled here.

        Accepts any cache whose layers hold `keys` / `values` [B, H, n, D]: a `DynamicCache`, or the
        `CompressedLayer`s of kv_compression (SnapKV, PyramidKV, H2O: n may differ between layers and
        be less than the tokens seen, `seen`; an expanded layer's `repeat` is kept). Each layer keeps
        its tokens seen, so `get_seq_length()` is the next token's text position and new tokens
        append after the kept entries (RoPE is already applied to cached keys). The source cache is
        not modified and can be dropped. A layer never filled (no keys) stays empty.
        """
        layers = []
        for source in cache.layers:
            if isinstance(source, KIVILayer):
                raise TypeError(f"{self.name}: the cache is already quantized (its keys/values are only the residuals)")
            layer = self.new_layer(getattr(source, "repeat", 1))
            keys, values = getattr(source, "keys", None), getattr(source, "values", None)
            if getattr(source, "is_initialized", False) and keys is not None and keys.numel():
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys.clone(), values.clone()
                layer.seen = int(getattr(source, "seen", source.get_seq_length()))
                layer.flush()
            layers.append(layer)
        return KIVICache(layers)
