"""MoA's profile, plan search and technique on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from paretoray.actors.moa import (
    BLOCK,
    Plan,
    Profile,
    Rule,
    block_influence,
    value_influence,
    candidate_rules,
    dropped_blocks,
    profile_model,
    search_plan,
)
from paretoray.actors.techniques import build_technique


def test_influence_is_the_loss_change_of_dropping_a_value_for_a_linear_loss():
    """For L = sum_k A_k c_k the first-order formula is exact (up to the reference's eps)."""
    generator = torch.Generator().manual_seed(0)
    n = 48
    logits = torch.randn(n, n, generator=generator)
    attention = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    weights = torch.randn(n, n, generator=generator)  # c = dL/dA
    influence = value_influence(attention, weights)
    for query, key in [(40, 17), (12, 12), (47, 0)]:
        row = attention[query]
        dropped = row.clone()
        dropped[key] = 0
        true_change = float(((dropped / dropped.sum() - row) * weights[query]).sum())
        assert float(influence[query, key]) == pytest.approx(abs(true_change), rel=2e-2)


def test_block_influence_sums_causal_elements_into_64_blocks():
    attention = torch.rand(2, 3, 130, 130)
    grad = torch.rand(2, 3, 130, 130)
    blocks = block_influence(attention, grad)
    assert blocks.shape == (3, 3, 3)
    assert float(blocks[:, 0, 1:].abs().sum()) == 0.0  # nothing above the diagonal block row 0


def test_rules_keep_the_sink_block_and_their_band():
    rule = Rule(alpha=128, beta=0.25)  # at 1024 tokens: 2 + 4 = 6 blocks
    assert rule.blocks(1024) == 6 and rule.span(1024) == 6 * BLOCK
    assert rule.density(1024) == pytest.approx(7 / 16)
    dropped = dropped_blocks(rule, 1024)
    assert not dropped[:, 0].any() and not dropped[10, 5:11].any() and dropped[10, 1:5].all()
    rules = candidate_rules([1024, 2048], alpha_step=512)
    assert all(r.alpha + r.beta * 2048 <= 2048 and r.alpha + r.beta * 1024 > 0 for r in rules)
    assert Rule(-512, 1.0) in rules and Rule(-1024, 1.0) not in rules and Rule(2048, 1.0) not in rules


def synthetic_profile(layers=3, heads=2, lengths=(512, 1024), seed=0) -> Profile:
    generator = torch.Generator().manual_seed(seed)
    influence = {}
    for n in lengths:
        nb = n // BLOCK
        values = torch.rand(layers, heads, nb, nb, generator=generator).tril() * 0.01
        values[0, 0, :, 1 : nb // 2] += 1.0  # head (0, 0) needs distant context
        influence[n] = values
    return Profile("synthetic", list(lengths), influence, 1, 0.0)


@pytest.mark.parametrize("density", [0.4, 0.6])
def test_plan_meets_the_density_budget_at_every_length(density):
    profile = synthetic_profile()
    plan = search_plan(profile, density, alpha_step=256)
    for n in profile.lengths:
        assert 0.9 * density - 1e-9 <= plan.achieved_density[str(n)] <= density + 1e-9
    for layer in range(3):
        assert len(set(plan.rules(layer))) <= 2
    # The head that relies on distant blocks gets the longest span at the longest length.
    spans = [[rule.span(1024) for rule in plan.rules(layer)] for layer in range(3)]
    assert spans[0][0] == max(max(row) for row in spans)


def test_an_impossible_budget_says_why():
    with pytest.raises(ValueError, match="no MoA plan reaches mean density 0.01"):
        search_plan(synthetic_profile(), 0.01, alpha_step=256)


def test_profile_plan_and_technique_on_a_tiny_model(tiny_model, tmp_path, monkeypatch):
    from paretoray.actors.techniques.moa import moa_dir

    model, tokenizer = tiny_model
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path))
    profile = profile_model(model, tokenizer, [256, 512], samples_per_length=1, response_tokens=8)
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was
    assert profile.influence[512].shape == (model.config.num_hidden_layers, model.config.num_key_value_heads, 8, 8)
    assert all(float(v.sum()) > 0 for v in profile.influence.values())
    plan = search_plan(profile, 0.8, alpha_step=128)
    plan.save(moa_dir(model) / "plan-density0.8000.json")
    assert Plan.load(moa_dir(model) / "plan-density0.8000.json") == plan

    ids = torch.randint(4, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    technique = build_technique("moa", {"density": 0.8})
    with technique.applied(model) as cache, torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.spans == [rule.span(300) for rule in plan.rules(layer_idx)]
        assert layer.lengths == [min(300, BLOCK + s) for s in layer.spans]
    run = technique.generate(model, ids, 6)
    assert len(run.tokens) == 6 and math.isfinite(run.prefill_s)
    for layer in cache.layers:  # packed: each head its own slots, never more than sinks + span
        assert layer.keys.shape[1] == sum(layer.region) and all(r <= BLOCK + s for r, s in zip(layer.region, layer.spans))
