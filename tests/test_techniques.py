"""Technique correctness on a tiny random Llama: dense equals `generate`, StreamingLLM keeps
exactly sinks + window, its positions equal the paper's cache-index positions."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from paretoray.actors.generation import greedy_generate
from paretoray.actors.techniques import UnknownTechniqueError, available_techniques, build_technique, parse_technique
from paretoray.actors.techniques.streaming_llm import SinkWindowLayer, rope_inv_freq


def prompt(model, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (1, length), generator=generator)


def test_registry_lists_names_on_unknown():
    assert {"dense", "streaming_llm"} <= set(available_techniques())
    with pytest.raises(UnknownTechniqueError, match="available: .*dense.*streaming_llm"):
        build_technique("nope", {})


def test_params_are_validated_against_declared_ranges():
    with pytest.raises(ValueError, match="window: expected >= 1"):
        build_technique("streaming_llm", {"window": 0})
    with pytest.raises(ValueError, match="unknown parameter"):
        build_technique("streaming_llm", {"windw": 8})
    assert build_technique("streaming_llm", {"window": 8}).label == "streaming_llm(n_sink=4,window=8)"


def test_techniques_parse_from_the_command_line_form():
    assert parse_technique("dense").label == "dense"
    snap = parse_technique("snapkv:max_capacity_prompt=0.25,window_size=8,pooling=maxpool")
    assert (snap.max_capacity_prompt, snap.window_size, snap.pooling) == (0.25, 8, "maxpool")
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_technique("streaming_llm:windw=3")


def test_register_derives_params_from_param_fields():
    from dataclasses import dataclass

    from paretoray.actors.techniques.base import Param, Technique, param, register

    @dataclass(frozen=True)
    class Undeclared(Technique):
        knob: float = 0.5
        name = "undeclared_test"

    with pytest.raises(TypeError, match="knob: declare hyperparameters with param"):
        register(Undeclared)

    @dataclass(frozen=True)
    class Twice(Technique):
        knob: float = param("float", 0.5, low=0.0, high=1.0)
        name = "twice_test"
        params = {"knob": Param("float", 0.4, low=0.0, high=1.0)}  # a second, drifted default

    with pytest.raises(TypeError, match="derived from its param"):
        register(Twice)

    @dataclass(frozen=True)
    class BadExample(Technique):
        knob: float = param("float", 0.5, low=0.0, high=1.0)
        name = "bad_example_test"
        examples = {"covers": {"knob": 2.0}}

    with pytest.raises(ValueError, match="knob: expected <= 1.0"):
        register(BadExample)
    assert {"undeclared_test", "twice_test", "bad_example_test"}.isdisjoint(available_techniques())
    assert list(available_techniques()["pyramidkv"].params)[-1] == "beta"  # inherited fields first, in order


def test_numbers_take_their_declared_kind():
    snap = build_technique("snapkv", {"max_capacity_prompt": 512, "window_size": 16.0})
    assert isinstance(snap.max_capacity_prompt, float) and isinstance(snap.window_size, int)
    with pytest.raises(ValueError, match="window_size: expected an integer"):
        build_technique("snapkv", {"window_size": 16.5})  # refused, not truncated


def test_a_label_parses_back_to_its_technique():
    snap = build_technique("snapkv", {"max_capacity_prompt": 0.25, "pooling": "maxpool"})
    assert snap.label.startswith("snapkv(window_size=32,") and ",pooling=maxpool," in snap.label
    assert parse_technique(snap.label) == snap and parse_technique("dense") == parse_technique("dense()")


def test_dense_equals_plain_generate(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 50)
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 50:].tolist()
    run = build_technique("dense", {}).generate(model, ids, 12)
    assert run.tokens == expected
    assert len(run.step_s) == 11 and run.prefill_s > 0


def test_streaming_with_room_for_everything_equals_dense(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 60, seed=1)
    dense = build_technique("dense", {}).generate(model, ids, 10)
    streaming = build_technique("streaming_llm", {"n_sink": 4, "window": 200}).generate(model, ids, 10)
    assert streaming.tokens == dense.tokens
    assert streaming.kv_bytes == dense.kv_bytes


@pytest.mark.parametrize("n_sink,window", [(4, 16), (0, 7), (2, 33)])
def test_streaming_keeps_exactly_sinks_and_window(tiny_model, n_sink, window):
    model, _ = tiny_model
    prompt_len, new = 80, 9
    technique = build_technique("streaming_llm", {"n_sink": n_sink, "window": window})
    cache = technique.new_cache(model)
    run = greedy_generate(model, prompt(model, prompt_len, seed=2), cache, max_new_tokens=new)
    fed = prompt_len + len(run.tokens) - 1  # the last generated token is never fed back
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for layer in cache.layers:
        assert layer.kept_positions() == list(range(n_sink)) + list(range(fed - window, fed))
        keys, values = layer._ordered()
        assert keys.shape[-2] == values.shape[-2] == n_sink + window
        # Physically: sinks + window + the one slot the next token is written into.
        assert layer.keys.shape[-2] == layer.values.shape[-2] == n_sink + window + 1
        assert layer.get_seq_length() == fed
    per_token = 2 * cfg.num_key_value_heads * head_dim * 4  # K and V, float32
    assert run.kv_bytes == cfg.num_hidden_layers * (n_sink + window + 1) * per_token


def test_streaming_generation_is_deterministic_and_differs_from_dense(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 120, seed=3)
    technique = build_technique("streaming_llm", {"n_sink": 2, "window": 8})
    first, second = technique.generate(model, ids, 10), technique.generate(model, ids, 10)
    assert first.tokens == second.tokens
    dense_cache = DynamicCache(config=model.config)
    dense = greedy_generate(model, ids, dense_cache, 10)
    assert first.kv_bytes < dense.kv_bytes


def test_positions_equal_cache_index_positions(tiny_model):
    """The paper scores a query at cache index S against keys at indices 0..S-1. We keep recent
    keys at text positions and shift only the sinks; every score must match the paper's."""
    model, _ = tiny_model
    torch.manual_seed(0)
    rotary = model.model.rotary_emb
    n_sink, window, total, heads, head_dim = 3, 5, 20, 2, 16
    raw_keys = torch.randn(1, heads, total + 1, head_dim)  # pre-RoPE keys of tokens 0..total
    raw_query = torch.randn(1, heads, 1, head_dim)  # the query of token `total`

    def rope(x, positions):
        cos, sin = rotary(x, torch.tensor([positions]))
        rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
        return rotated

    zeros = torch.zeros(1, heads, 1, head_dim)
    for prefill in (1, 11):  # decode-only, and a prompt chunk that overflows the window first
        layer = SinkWindowLayer(n_sink, window, rope_inv_freq(model))
        layer.update(rope(raw_keys[..., :prefill, :], list(range(prefill))), torch.zeros(1, heads, prefill, head_dim))
        for t in range(prefill, total):  # then one token at a time at its text position, as decoding does
            layer.update(rope(raw_keys[..., t : t + 1, :], [t]), zeros)
        keys, _ = layer.update(rope(raw_keys[..., total:, :], [total]), zeros)  # token `total` attends
        ours = (rope(raw_query, [total]) @ keys.transpose(-1, -2)).flatten(1)

        # The paper: kept tokens + the new one, re-rotated by cache index; the query at index len(kept).
        kept = list(range(n_sink)) + list(range(total - window, total)) + [total]
        paper_keys = rope(raw_keys[..., kept, :], list(range(len(kept))))
        paper_query = rope(raw_query, [len(kept) - 1])
        paper = (paper_query @ paper_keys.transpose(-1, -2)).flatten(1)
        # Slots are a ring (attention over one query is order-free): compare per head as sets.
        torch.testing.assert_close(ours.sort(-1).values, paper.sort(-1).values, rtol=1e-4, atol=1e-4)
