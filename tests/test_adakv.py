"""AdaKV (`adakv+snapkv`, ...): one top-k over every head's scores, real per-head cache lengths.

References are computed here, apart from the technique: SnapKV's per-KV-head scores from plain
eager attention, AdaKV's allocation by sorting (score, head, position) triples, and decoding as
dense eager attention masked, per query head, to the positions its KV head kept.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from paretoray.actors.declarations import CompositionError, composition_declaration, technique_declarations
from paretoray.actors.generation import cache_nbytes, greedy_generate, with_cache
from paretoray.actors.techniques import build_technique, parse_technique
from tests.masked_reference import causal, masked_logits

WINDOW, KERNEL = 8, 7


def prompt(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def text_prompt(tokenizer, length: int) -> torch.Tensor:
    """Real English prose (Python's reference documentation, shipped with Python), `length` tokens."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics)[:20])
    return tokenizer(text, return_tensors="pt").input_ids[:, :length]


def adakv(budget: int, alpha: float = 0.2, member: str = "snapkv", **extra):
    """The composition and the two members as `adakv.over(...)` binds them."""
    technique = build_technique(f"adakv+{member}", {"adakv.alpha_safeguard": alpha, f"{member}.window_size": WINDOW,
                                                    f"{member}.kernel_size": KERNEL,
                                                    f"{member}.max_capacity_prompt": budget, **extra})
    return technique, technique.members[0].over(technique.members[1])


def head_sets(layer) -> list[set[int]]:
    return [set(layer.head(h)[2].tolist()) for h in range(len(layer.lengths))]


@pytest.fixture(scope="module")
def eager_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def snapkv_scores(attn: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """SnapKV's votes per KV head on the prefix: the window's attention summed over its queries,
    avg-pooled, averaged over each KV head's query heads. attn [Hq, L, L] -> [Hkv, L - w]."""
    q_heads, length, _ = attn.shape
    votes = attn[:, length - WINDOW :, : length - WINDOW].sum(dim=1)
    pooled = F.avg_pool1d(votes[:, None], KERNEL, stride=1, padding=KERNEL // 2)[:, 0]
    return pooled.view(kv_heads, q_heads // kv_heads, -1).mean(dim=1)


def adakv_reference(scores: torch.Tensor, length: int, budget: int, alpha: float, window: int = WINDOW) -> list[set[int]]:
    """AdaKV's kept positions, by sorting: every head keeps the window and its own best
    floor(alpha (budget - w)) prefix positions; the rest of heads x (budget - w) goes to the best
    remaining (score, head, position) of the whole layer. scores: [H, >= L - w] (the prefix's)."""
    heads = scores.shape[0]
    free = budget - window
    floor = int(alpha * free)
    kept = [set(range(length - window, length)) for _ in range(heads)]
    ranked = [sorted(range(length - window), key=lambda p: -float(scores[h, p])) for h in range(heads)]
    rest = []
    for h in range(heads):
        kept[h] |= set(ranked[h][:floor])
        rest += [(float(scores[h, p]), h, p) for p in ranked[h][floor:]]
    for _, h, p in sorted(rest, reverse=True)[: heads * (free - floor)]:
        kept[h].add(p)
    return kept


# ---- the allocation -------------------------------------------------------------------------


def test_per_head_lengths_sum_to_the_layer_budget_and_differ_between_heads(tiny_model):
    model, tokenizer = tiny_model
    ids = text_prompt(tokenizer, 200)
    assert ids.shape[-1] == 200
    budget = 40
    _, bound = adakv(budget)
    with torch.no_grad(), bound.applied(model) as cache:
        model(ids, **with_cache(model, cache), use_cache=True)
    heads = model.config.num_key_value_heads
    for layer in cache.layers:
        assert sum(layer.lengths) == heads * budget
        assert min(layer.lengths) >= WINDOW + int(0.2 * (budget - WINDOW))  # the safeguard
        for h, positions in enumerate(head_sets(layer)):
            assert set(range(200 - WINDOW, 200)) <= positions and len(positions) == layer.lengths[h]
    assert any(len(set(layer.lengths)) > 1 for layer in cache.layers)  # heads really get different budgets


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_allocation_equals_sorting_where_the_safeguard_binds(alpha):
    """Scores where one head dominates: without the safeguard the others keep almost nothing."""
    from paretoray.actors.techniques.adakv import allocate

    length, budget, window = 60, 20, 5
    scores = torch.rand(1, 3, length, generator=torch.Generator().manual_seed(0)) * torch.tensor([10.0, 1.0, 0.5])[:, None]
    protected = torch.arange(length) >= length - window
    kept = allocate(scores, budget, protected, alpha)[0]
    expected = adakv_reference(scores[0], length, budget, alpha, window)
    assert [set(row.nonzero().view(-1).tolist()) for row in kept] == expected
    lengths = kept.sum(dim=-1).tolist()
    assert sum(lengths) == 3 * budget and min(lengths) == window + int(alpha * (budget - window))  # it binds
    assert allocate(scores, length, protected, alpha).all()  # a budget covering the prompt keeps everything


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_kept_positions_equal_an_independent_global_top_k(tiny_model, eager_model, alpha):
    model, _ = tiny_model
    length, budget = 150, 36
    ids = prompt(model, length, seed=3)
    _, bound = adakv(budget, alpha)
    with torch.no_grad(), bound.applied(model) as cache:
        model(ids, **with_cache(model, cache), use_cache=True)
        attentions = eager_model(ids, output_attentions=True).attentions
    kv_heads = model.config.num_key_value_heads
    for layer_idx, layer in enumerate(cache.layers):
        expected = adakv_reference(snapkv_scores(attentions[layer_idx][0], kv_heads), length, budget, alpha)
        assert head_sets(layer) == expected


def test_alpha_one_is_the_members_uniform_rule(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 130, seed=4)
    technique, bound = adakv(30, alpha=1.0)
    snapkv = technique.members[1]
    with torch.no_grad(), bound.applied(model) as ragged:
        model(ids, **with_cache(model, ragged), use_cache=True)
    with torch.no_grad(), snapkv.applied(model) as uniform:
        model(ids, **with_cache(model, uniform), use_cache=True)
    for mine, theirs in zip(ragged.layers, uniform.layers):
        assert head_sets(mine) == [set(row.tolist()) for row in theirs.positions[0]]
    assert technique.generate(model, ids, 6).tokens == snapkv.generate(model, ids, 6).tokens


def test_pyramidkv_member_sets_each_layers_budget(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 200, seed=5)
    technique, bound = adakv(40, member="pyramidkv", **{"pyramidkv.beta": 4})
    pyramid = technique.members[1]
    with torch.no_grad(), bound.applied(model) as cache:
        model(ids, **with_cache(model, cache), use_cache=True)
    budgets = [pyramid.layer_budget(i, len(cache.layers), 200) for i in range(len(cache.layers))]
    assert budgets[0] > budgets[-1]
    assert [sum(layer.lengths) for layer in cache.layers] == [model.config.num_key_value_heads * b for b in budgets]


# ---- the ragged cache -----------------------------------------------------------------------


def test_physical_kv_bytes_are_the_sum_of_per_head_lengths(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 160, seed=6)
    _, bound = adakv(32)
    steps = 5
    with bound.applied(model) as cache:
        run = greedy_generate(model, ids, cache, max_new_tokens=steps)
    entry = 2 * model.config.head_dim * 4  # a key and a value, float32
    lengths = [layer.lengths for layer in cache.layers]
    assert run.kv_bytes == cache_nbytes(cache) == entry * sum(map(sum, lengths))
    assert sum(map(sum, lengths)) == len(cache.layers) * model.config.num_key_value_heads * (32 + steps - 1)
    assert sum(map(sum, lengths)) < sum(max(row) * len(row) for row in lengths)  # not padded to the longest head
    dense = build_technique("dense", {}).generate(model, ids, steps)
    assert run.kv_bytes < dense.kv_bytes / 4
    # Static slots (the compiled step's): every head's kept entries plus one slot per token to decode.
    with torch.no_grad(), bound.applied(model) as cache:
        model(ids, **with_cache(model, cache), use_cache=True)
        kept = sum(sum(layer.lengths) for layer in cache.layers)
        static = bound.static_cache(model, cache, steps)
    assert cache_nbytes(static) == entry * (kept + len(cache.layers) * model.config.num_key_value_heads * steps)


@pytest.mark.parametrize("split", [None, 112])
def test_decoding_equals_dense_attention_masked_to_the_kept_positions(tiny_model, eager_model, tiny_model_dir, split):
    """Every forward after the prefill (the decoded tokens; with `split`, first a context-only
    question of 128 - split tokens, end-aligned causal) gives the logits of the whole text run
    densely with each query head masked, after the context, to its KV head's kept positions."""
    model, _ = tiny_model
    length, budget, steps = 128, 30, 6
    ids, continuation = prompt(model, length, seed=7), prompt(model, steps, seed=8)
    context = length if split is None else split
    _, bound = adakv(budget)
    with torch.no_grad(), bound.applied(model) as cache:
        logits = [model(ids[:, :context], **with_cache(model, cache), use_cache=True).logits[0, -1:]]
        if split is not None:
            logits.append(model(ids[:, context:], **with_cache(model, cache), use_cache=True).logits[0])
        for token in continuation[0]:
            logits.append(model(token.view(1, 1), **with_cache(model, cache), use_cache=True).logits[0])
    full = torch.cat([ids, continuation], dim=1)
    total = full.shape[1]
    q_heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    allowed = {}
    with torch.no_grad():
        attentions = eager_model(ids[:, :context], output_attentions=True).attentions  # the context alone
        for layer_idx, layer in enumerate(cache.layers):
            kept = adakv_reference(snapkv_scores(attentions[layer_idx][0], kv_heads), context, budget, 0.2)
            assert [s & set(range(context)) for s in head_sets(layer)] == kept
            assert all(s - set(range(context)) == set(range(context, total)) for s in head_sets(layer))
            allowed[layer_idx] = causal(q_heads, total)
            for head in range(q_heads):
                dropped = sorted(set(range(context)) - kept[head // (q_heads // kv_heads)])
                allowed[layer_idx][head, context:, dropped] = False
        unmasked = eager_model(full).logits[0, context - 1 :]
    expected = masked_logits(tiny_model_dir, full, allowed)[context - 1 :]
    got = torch.cat(logits)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0], unmasked[0], atol=1e-4, rtol=1e-4)  # the context's own forward is dense
    assert (got[1:] - unmasked[1:]).abs().max() > 1e-2  # and the comparison has teeth after it


def test_compiled_and_batched_decoding_give_the_eager_tokens(tiny_model):
    model, _ = tiny_model
    technique, _ = adakv(36)
    prompts = [prompt(model, 160, seed=9), prompt(model, 117, seed=10)]
    alone = [technique.generate(model, ids, 8) for ids in prompts]
    assert not alone[0].compiled
    compiled = technique.generate(model, prompts[0], 8, compiled=True)
    assert compiled.compiled and compiled.tokens == alone[0].tokens
    forced = alone[1].tokens[::-1]
    assert (technique.generate(model, prompts[0], 8, forced_tokens=forced, compiled=True).agreement
            == technique.generate(model, prompts[0], 8, forced_tokens=forced).agreement)
    batch = technique.generate_batch(model, prompts, 8)  # the static step run eagerly; rows group heads differently
    assert batch.tokens == [run.tokens for run in alone]
    questions = [prompt(model, 9, seed=11), prompt(model, 5, seed=12)]
    batch = technique.generate_batch(model, prompts, 4, question_ids=questions)
    assert batch.tokens == [technique.generate(model, ids, 4, question_ids=q).tokens for ids, q in zip(prompts, questions)]


def test_a_rollback_is_refused_and_the_model_restored(tiny_model):
    model, _ = tiny_model
    _, bound = adakv(30)
    before = model.config._attn_implementation
    with torch.no_grad(), bound.applied(model) as cache:
        model(prompt(model, 80, seed=13), **with_cache(model, cache), use_cache=True)
        with pytest.raises(NotImplementedError, match="cannot be rolled back"):
            cache.crop(-1)
    assert model.config._attn_implementation == before
    assert not any(m._forward_hooks for m in model.modules())


def test_snapkvs_per_query_head_rule_is_refused(tiny_model):
    model, _ = tiny_model
    technique, _ = adakv(30, **{"snapkv.gqa": "per_query_head"})
    with pytest.raises(ValueError, match="per_query_head"):
        technique.generate(model, prompt(model, 80, seed=14), 2)


# ---- composition ----------------------------------------------------------------------------


def test_adakv_over_snapkv_composes():
    declared = technique_declarations(["adakv+snapkv", "adakv+pyramidkv"])
    caps = declared["adakv+snapkv"].capabilities
    assert caps["members"] == ["adakv", "snapkv"] and caps["static_decode"] and caps["batched"] and caps["context_only"]
    assert not caps["lossless"] and caps["measures_fidelity"] and not caps["provides"]
    assert "pyramidkv.beta" in declared["adakv+pyramidkv"].params
    technique, _ = adakv(64)
    assert technique.label.startswith("adakv(alpha_safeguard=0.2)+snapkv(")
    assert parse_technique(technique.label) == technique
    assert build_technique("adakv", {}).over().member == build_technique("snapkv", {})  # alone: Ada-SnapKV


@pytest.mark.parametrize("name,reason", [
    ("adakv+streaming_llm", "per-head prefill scores"),
    ("adakv+kv_quant", "per-head prefill scores"),
    ("adakv+h2o", "evicts while decoding"),
    ("adakv+specdec", "specdec is not one"),
    ("snapkv+adakv", "the outer technique comes first: adakv+snapkv"),
    ("kv_quant+adakv", "adakv is not one"),
])
def test_members_that_do_not_fit_are_refused_with_the_reason(name, reason):
    with pytest.raises(CompositionError) as caught:
        composition_declaration(name, technique_declarations())
    assert reason in str(caught.value)
    with pytest.raises(ValueError):
        build_technique(name, {})
