"""kv_quant (KIVI): the quantizer against a plain loop reference, the residual rule step by step,
physical bytes counted exactly, generation on a tiny random Llama, and `adopt` of a dense and of
SnapKV / PyramidKV-compressed caches."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import Cache

from paretoray.actors.generation import cache_nbytes, with_cache
from paretoray.actors.techniques import build_technique
from paretoray.actors.techniques.kv_quant import (
    KIVILayer,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize_keys,
    quantize_values,
    unpack,
)

# ---- a plain reference ---------------------------------------------------------------------------


def reference_minmax(chunk: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Quantize -> dequantize one group set: min-max along `dim`, asymmetric, round to nearest."""
    low = chunk.amin(dim=dim, keepdim=True)
    high = chunk.amax(dim=dim, keepdim=True)
    scale = (high - low) / (2**bits - 1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round((chunk - low) / safe), 0, 2**bits - 1)
    return codes * scale + low


def reference_keys(keys: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per channel, over each run of `group` tokens. [B, H, n, D] -> dequantized [B, H, n, D]."""
    out = torch.empty_like(keys)
    for start in range(0, keys.shape[2], group):
        out[:, :, start:start + group] = reference_minmax(keys[:, :, start:start + group], 2, bits)
    return out


def reference_values(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per token, over each run of `group` channels (the last run may be shorter)."""
    out = torch.empty_like(values)
    for start in range(0, values.shape[3], group):
        out[..., start:start + group] = reference_minmax(values[..., start:start + group], 3, bits)
    return out


def simulate_kivi(prompt: int, steps: int, residual: int) -> list[tuple[int, int]]:
    """(quantized keys, quantized values) after the prefill and after each decode step, as the
    reference's prefill branch and decode branch compute them (residual a multiple of the group)."""
    if prompt % residual:
        key_full = prompt % residual
    else:
        key_full = 0
    key_quant = prompt - key_full
    value_quant = max(0, prompt - residual)
    value_full = prompt - value_quant
    history = [(key_quant, value_quant)]
    for _ in range(steps):
        key_full += 1
        if key_full == residual:
            key_quant, key_full = key_quant + residual, 0
        value_full += 1
        if value_full > residual:
            value_quant, value_full = value_quant + 1, value_full - 1
        history.append((key_quant, value_quant))
    return history


# ---- quantizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [16, 13, 7])
def test_pack_round_trips(bits, dim):
    codes = torch.randint(0, 2**bits, (2, 3, 5, dim), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-dim * bits // 8)
    assert torch.equal(unpack(packed, bits, dim).long(), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("batch,heads,tokens,dim,group", [(1, 2, 32, 16, 8), (2, 3, 48, 20, 16), (1, 1, 7, 13, 7), (2, 2, 24, 10, 12)])
def test_quantizers_match_the_reference(bits, batch, heads, tokens, dim, group):
    generator = torch.Generator().manual_seed(tokens * dim + bits)
    x = torch.randn(batch, heads, tokens, dim, generator=generator) * 3 + 1
    x[..., 0] = 0.5  # a constant channel: scale 0 in every key group
    keys = dequantize_keys(quantize_keys(x, bits, group), bits, group, dim)
    values = dequantize_values(quantize_values(x, bits, group), bits, group, dim)
    torch.testing.assert_close(keys, reference_keys(x, bits, group), rtol=0, atol=1e-5)
    torch.testing.assert_close(values, reference_values(x, bits, group), rtol=0, atol=1e-5)
    assert torch.equal(keys[..., 0], x[..., 0])
    if bits == 8:  # error bounded by half a step of the group's range
        assert (keys - x).abs().max() <= (x.amax() - x.amin()) / 255 / 2 + 1e-5


# ---- the layer: residual rule, dequantized contents, bytes -------------------------------------


def feed(layer: KIVILayer, states: torch.Tensor, prompt: int):
    """Prefill `prompt` tokens of states [B, H, N, D] (keys = states, values = -states), then one at a
    time; yields (returned keys, returned values) of every update."""
    yield layer.update(states[:, :, :prompt], -states[:, :, :prompt])
    for t in range(prompt, states.shape[2]):
        yield layer.update(states[:, :, t:t + 1], -states[:, :, t:t + 1])


def counts(layer: KIVILayer) -> tuple[int, int]:
    quantized = lambda q: 0 if q is None else q.codes.shape[2]  # noqa: E731
    return quantized(layer.quantized_keys), quantized(layer.quantized_values)


@pytest.mark.parametrize("prompt,residual,group", [(40, 16, 8), (32, 32, 32), (5, 16, 8), (77, 32, 16), (64, 8, 8)])
def test_residual_follows_kivis_rule(prompt, residual, group):
    steps = 40
    states = torch.randn(2, 2, prompt + steps, 12, generator=torch.Generator().manual_seed(prompt))
    layer = KIVILayer(bits=2, group_size=group, residual_length=residual)
    expected = simulate_kivi(prompt, steps, residual)
    for i, (keys, values) in enumerate(feed(layer, states, prompt)):
        seen = prompt + i
        # this step attended with everything not quantized before it in full precision
        before_k, before_v = expected[i - 1] if i else (0, 0)
        assert torch.equal(keys[:, :, before_k:], states[:, :, before_k:seen])
        assert torch.equal(values[:, :, before_v:], -states[:, :, before_v:seen])
        assert counts(layer) == expected[i], f"after {seen} tokens"
        assert layer.keys.shape[2] == seen - expected[i][0] and layer.values.shape[2] == seen - expected[i][1]
        assert layer.get_seq_length() == seen and layer.stored == seen
        # the stored part: each block quantized once, as the reference quantizes it
        quant_k, quant_v = expected[i]
        ref_k = torch.cat([reference_keys(states[:, :, s:s + residual], 2, group)
                           for s in range(0, quant_k, residual)] + [states[:, :, quant_k:seen]], dim=2)
        ref_v = torch.cat([reference_values(-states[:, :, :quant_v], 2, group), -states[:, :, quant_v:seen]], dim=2)
        got_k, got_v = layer.dequantized()
        torch.testing.assert_close(got_k, ref_k, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_v, ref_v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("residual,group,key_block", [(0, 8, 8), (5, 8, 8), (20, 8, 24)])
def test_residual_not_a_multiple_of_the_group(residual, group, key_block):
    """The deviation: keys move in blocks of the residual rounded up to whole groups (at least one)."""
    states = torch.randn(1, 2, 60, 16, generator=torch.Generator().manual_seed(residual))
    layer = KIVILayer(bits=4, group_size=group, residual_length=residual)
    assert layer.key_block == key_block
    for i, _ in enumerate(feed(layer, states, 30)):
        seen = 30 + i
        assert counts(layer) == (seen // key_block * key_block, max(0, seen - residual))
    ref_k = torch.cat([reference_keys(states[:, :, :60 // key_block * key_block], 4, group),
                       states[:, :, 60 // key_block * key_block:]], dim=2)
    torch.testing.assert_close(layer.dequantized()[0], ref_k, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_physical_bytes_are_exact(bits):
    """B=2, H=3, D=20, group 8, residual 16, 45 tokens in fp32: 32 keys and 29 values quantized."""
    b, h, d, group, residual, n = 2, 3, 20, 8, 16, 45
    layer = KIVILayer(bits=bits, group_size=group, residual_length=residual)
    states = torch.randn(b, h, n, d)
    list(feed(layer, states, 40))
    assert counts(layer) == (32, 29)
    code_row = -(-d * bits // 8)  # packed bytes per token: ceil(20 * bits / 8)
    keys = b * h * (32 * code_row + 2 * (32 // group) * d * 4 + (n - 32) * d * 4)
    values = b * h * (29 * code_row + 2 * 29 * -(-d // group) * 4 + residual * d * 4)
    assert layer.nbytes() == keys + values
    dense = 2 * b * h * n * d * 4
    assert layer.nbytes() < dense
    # the residuals are re-allocated, not views that keep the moved tokens alive
    assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 4
    assert layer.values.untyped_storage().nbytes() == layer.values.numel() * 4


def test_crop_refuses():
    layer = KIVILayer(bits=4, group_size=8, residual_length=8)
    list(feed(layer, torch.randn(1, 1, 20, 8), 16))
    with pytest.raises(NotImplementedError, match="rolled back"):
        layer.crop(-1)


# ---- on the tiny model -----------------------------------------------------------------------------


def prompt_ids(model, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def test_generation_bits8_equals_dense_and_bits2_stores_less(tiny_model):
    model, _ = tiny_model
    ids = prompt_ids(model, 96)
    dense = build_technique("dense", {}).generate(model, ids, 12)
    eight = build_technique("kv_quant", {"bits": 8, "group_size": 16, "residual_length": 16}).generate(model, ids, 12)
    two = build_technique("kv_quant", {"bits": 2, "group_size": 16, "residual_length": 16}).generate(model, ids, 12)
    assert eight.tokens == dense.tokens
    assert len(two.tokens) == 12 and not two.compiled
    assert two.kv_bytes < eight.kv_bytes < dense.kv_bytes
    # 107 tokens stored; 2 layers x 2 KV heads x head dim 16, fp32
    layers_heads, d = 2 * model.config.num_key_value_heads, model.config.head_dim
    keys = 96 * d * 2 // 8 + 2 * 6 * d * 4 + 11 * d * 4  # 96 keys quantized (6 groups of 16 tokens), 11 full
    values = 91 * d * 2 // 8 + 2 * 91 * 1 * 4 + 16 * d * 4  # 91 values quantized (one channel group), 16 full
    assert two.kv_bytes == layers_heads * (keys + values)
    assert dense.kv_bytes == layers_heads * 2 * 107 * d * 4


def test_adopting_a_dense_prefill_equals_quantizing_in_update(tiny_model):
    from transformers import DynamicCache

    model, _ = tiny_model
    ids = prompt_ids(model, 70, seed=3)
    technique = build_technique("kv_quant", {"bits": 4, "group_size": 16, "residual_length": 32})
    with torch.inference_mode():
        dense = DynamicCache(config=model.config)
        model(input_ids=ids, **with_cache(model, dense), use_cache=True)
        adopted = technique.adopt(model, dense)
        own = technique.new_cache(model)
        model(input_ids=ids, **with_cache(model, own), use_cache=True)
    assert adopted.get_seq_length() == own.get_seq_length() == 70
    assert cache_nbytes(adopted) == cache_nbytes(own) < cache_nbytes(dense)
    for a, b in zip(adopted.layers, own.layers):
        assert counts(a) == counts(b) == (64, 38)
        for x, y in zip(a.dequantized(), b.dequantized()):
            assert torch.equal(x, y)
    with pytest.raises(TypeError, match="already quantized"):
        technique.adopt(model, own)


def decode_with(model, cache, first: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits, token = [], [], first
    for _ in range(steps):
        out = model(input_ids=token, **with_cache(model, cache), use_cache=True).logits[:, -1]
        logits.append(out)
        token = out.argmax(dim=-1, keepdim=True)
        tokens.append(int(token))
    return tokens, logits


@pytest.mark.parametrize("compressor", [{"name": "snapkv", "max_capacity_prompt": 48, "window_size": 8},
                                        {"name": "snapkv", "max_capacity_prompt": 48, "window_size": 8, "gqa": "per_query_head"},
                                        {"name": "pyramidkv", "max_capacity_prompt": 48, "window_size": 8}])
def test_adopt_a_compressed_cache_and_keep_decoding(tiny_model, compressor):
    """SnapKV / PyramidKV keep 48 (PyramidKV: a different count per layer) of 150 prompt entries;
    adopting quantizes them, positions continue at 150, and decoding follows the unquantized cache.
    per_query_head stores one head per query head: the adopted layers repeat arriving tokens too."""
    model, _ = tiny_model
    ids = prompt_ids(model, 150, seed=5)
    params = dict(compressor)
    press = build_technique(params.pop("name"), params)
    technique = build_technique("kv_quant", {"bits": 8, "group_size": 16, "residual_length": 16})
    with torch.inference_mode():
        with press.applied(model) as compressed:
            logits = model(input_ids=ids, **with_cache(model, compressed), use_cache=True, logits_to_keep=1).logits
        first = logits[:, -1].argmax(dim=-1, keepdim=True)
        stored = [layer.keys.shape[-2] for layer in compressed.layers]
        assert max(stored) < 150
        adopted = technique.adopt(model, compressed)
        assert adopted.get_seq_length() == 150
        assert cache_nbytes(adopted) < cache_nbytes(compressed)
        assert cache_nbytes(Cache(layers=adopted.layers)) == adopted.nbytes()  # layers count their own bytes
        for source, layer in zip(compressed.layers, adopted.layers):
            assert layer.stored == source.keys.shape[-2] and layer.seen == 150 and layer.repeat == source.repeat
            keys, values = layer.dequantized()
            for got, original in ((keys, source.keys), (values, source.values)):
                step = (original.amax() - original.amin()) / 255  # 8 bits: at most half a step of any group
                assert (got - original).abs().max() <= step / 2 + 1e-5
        # Decoding outside the compressor's context (plain SDPA, 1-token steps need no mask) ...
        quantized_tokens, quantized_logits = decode_with(model, adopted, first, 6)
        exact_tokens, exact_logits = decode_with(model, compressed, first, 6)  # the compressed cache, unquantized
    assert quantized_tokens == exact_tokens
    for a, b in zip(quantized_logits, exact_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0.05)
    assert adopted.get_seq_length() == 156
    assert [layer.stored for layer in adopted.layers] == [n + 6 for n in stored]


def test_context_only_placement_appends_the_question_as_one_chunk(tiny_model):
    """A question fed after the context (several tokens at once) joins the residual, which then
    moves tokens out by the same rule; with a residual covering everything it is dense exactly."""
    model, _ = tiny_model
    context, question = prompt_ids(model, 90, seed=7), prompt_ids(model, 21, seed=8)
    dense = build_technique("dense", {}).generate(model, context, 6, question_ids=question)
    covers = build_technique("kv_quant", {"bits": 2, "residual_length": 256})
    assert covers.generate(model, context, 6, question_ids=question).tokens == dense.tokens
    technique = build_technique("kv_quant", {"bits": 8, "group_size": 16, "residual_length": 32})
    with torch.inference_mode():
        cache = technique.new_cache(model)
        model(input_ids=context, **with_cache(model, cache), use_cache=True)
        assert [counts(layer) for layer in cache.layers] == [(64, 58)] * len(cache.layers)
        model(input_ids=question, **with_cache(model, cache), use_cache=True)
    assert cache.get_seq_length() == 111
    assert [counts(layer) for layer in cache.layers] == [(96, 79)] * len(cache.layers)


def test_adopted_cache_takes_a_chunk_inside_the_compressors_context(tiny_model):
    """Composed use: PyramidKV compresses (different lengths per layer), kv_quant adopts, and a
    5-token chunk (a question) runs under the compressor's end-aligned attention, close to the same
    chunk on the unquantized compressed cache."""
    model, _ = tiny_model
    ids, chunk = prompt_ids(model, 150, seed=9), prompt_ids(model, 5, seed=10)
    press = build_technique("pyramidkv", {"max_capacity_prompt": 48, "window_size": 8})
    technique = build_technique("kv_quant", {"bits": 8, "group_size": 16, "residual_length": 0})
    with torch.inference_mode(), press.applied(model) as compressed:
        model(input_ids=ids, **with_cache(model, compressed), use_cache=True)
        assert len({layer.keys.shape[-2] for layer in compressed.layers}) > 1
        adopted = technique.adopt(model, compressed)
        quantized = model(input_ids=chunk, **with_cache(model, adopted), use_cache=True).logits
        exact = model(input_ids=chunk, **with_cache(model, compressed), use_cache=True).logits
    torch.testing.assert_close(quantized, exact, rtol=0, atol=0.05)
    assert adopted.get_seq_length() == 155
    assert [layer.stored for layer in adopted.layers] == [layer.keys.shape[-2] for layer in compressed.layers]
