"""Per-head sink + span attention (MoA's mechanism) on a tiny random model: the packed ring cache
decodes exactly what the masked prefill computes, and the density arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from paretoray.actors.generation import with_cache
from paretoray.actors.techniques import build_technique
from paretoray.actors.techniques.elastic_attention import GROWTH, ElasticSpans, span_for_density


@dataclass(frozen=True)
class FixedSpans(ElasticSpans):
    """Spans that do not depend on the prompt length, so any prefix can be re-prefilled as a reference."""

    spans: tuple[tuple[int, ...], ...] = ()
    sink_tokens: int = 2
    name = "fixed_spans_for_tests"

    def sinks(self) -> int:
        return self.sink_tokens

    def layer_spans(self, model, layer_idx, prompt_len):
        return list(self.spans[layer_idx])


def prompt(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def heterogeneous(model) -> FixedSpans:
    heads = model.config.num_key_value_heads
    pattern = [1, 5, 13, 40, 3, 9, 200]
    return FixedSpans(spans=tuple(tuple(pattern[(layer + h) % len(pattern)] for h in range(heads))
                                  for layer in range(model.config.num_hidden_layers)))


@torch.inference_mode()
def last_logits_by_prefill(model, technique, ids: torch.Tensor) -> torch.Tensor:
    with technique.applied(model) as cache:
        return model(input_ids=ids, **with_cache(model, cache), use_cache=True).logits[0, -1]


def test_decoding_from_the_ring_cache_equals_a_masked_prefill_of_the_whole_sequence(tiny_model):
    model, _ = tiny_model
    technique = heterogeneous(model)
    ids = prompt(model, 30, 0)
    # 75 steps: every ring wraps, short heads many times; the 200-token head outgrows its first
    # region (30 prompt tokens + GROWTH slots) and is given more.
    run = technique.generate(model, ids, 75)
    sequence = torch.cat([ids, torch.tensor([run.tokens[:-1]])], dim=1)
    for step in (1, 7, 24, 74):
        prefix = sequence[:, : 30 + step]
        expected = last_logits_by_prefill(model, technique, prefix)
        with technique.applied(model) as cache, torch.inference_mode():
            model(input_ids=ids, **with_cache(model, cache), use_cache=True)
            for t in range(step):
                logits = model(input_ids=sequence[:, 30 + t : 31 + t], **with_cache(model, cache), use_cache=True).logits[0, -1]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert int(expected.argmax()) == run.tokens[step]


def test_each_head_holds_its_sinks_and_its_span_and_nothing_else(tiny_model):
    model, _ = tiny_model
    technique = heterogeneous(model)
    with technique.applied(model) as cache, torch.inference_mode():
        model(input_ids=prompt(model, 30, 1), **with_cache(model, cache), use_cache=True)
        for token in range(4, 14):
            model(input_ids=torch.tensor([[token]]), **with_cache(model, cache), use_cache=True)
    for layer, spans in zip(cache.layers, technique.spans):
        assert layer.seen == 40
        for kept, span in zip(layer.kept_positions(), spans):
            expected = list(range(40)) if 40 <= 2 + span else [0, 1] + list(range(40 - span, 40))
            assert kept == expected
        # Packed: sinks + span slots per head; a head whose span exceeds the text holds what it
        # has plus room to grow, not its whole span.
        assert layer.region == [min(2 + s, 30 + GROWTH) for s in spans]
        assert layer.keys.shape[1] == sum(layer.region)
        assert layer.lengths == [min(40, 2 + s) for s in spans]


def test_a_window_as_long_as_the_prompt_is_dense_attention(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 40, 2)
    # Density 1 gives a span of the prompt's length; with 4 sinks all 40 + 4 fed tokens stay in view.
    dense = build_technique("dense", {}).generate(model, ids, 5).tokens
    assert build_technique("uniform_window", {"density": 1.0, "sink_tokens": 4}).generate(model, ids, 5).tokens == dense


def test_uniform_window_keeps_its_density_of_the_prompt(tiny_model):
    model, _ = tiny_model
    assert span_for_density(0.5, 64, 2048) == 960  # 64 sinks + 960 recent = half of 2048
    assert span_for_density(0.01, 64, 2048) == 1
    technique = build_technique("uniform_window", {"density": 0.25, "sink_tokens": 4})
    with technique.applied(model) as cache, torch.inference_mode():
        model(input_ids=prompt(model, 200, 5), **with_cache(model, cache), use_cache=True)
    assert all(layer.lengths == [50] * model.config.num_key_value_heads for layer in cache.layers)


def test_context_only_placement_is_refused_with_a_reason(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="query_aware"):
        build_technique("uniform_window", {}).generate(model, prompt(model, 20, 3), 4, question_ids=prompt(model, 5, 4))
