"""SnapKV, PyramidKV and H2O on a tiny random Llama: kept positions against references computed
plainly from the full attention matrices, budgets, determinism, equality with dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from paretoray.actors.generation import greedy_generate
from paretoray.actors.techniques import build_technique


@pytest.fixture(scope="module")
def eager_attentions(tiny_model_dir):
    """The same tiny model with eager attention, which returns every attention matrix."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def prompt(model, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (1, length), generator=generator)


def full_attention(eager, ids) -> list[torch.Tensor]:
    with torch.no_grad():
        return [a[0] for a in eager(ids, output_attentions=True).attentions]  # per layer [Hq, L, L]


def compress_only(model, technique, ids):
    """Prefill with the technique and return its cache (one token generated, nothing decoded)."""
    with technique.applied(model) as cache:
        greedy_generate(model, ids, cache, max_new_tokens=1)
    return cache


def kept(layer) -> list[set[int]]:
    return [set(layer.positions[0, h].tolist()) for h in range(layer.positions.shape[1])]


def snapkv_reference_scores(attn: torch.Tensor, kv_heads: int, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV's prefix scores written out plainly: window votes, pooled, averaged per KV group.

    attn: [Hq, L, L] -> [Hkv, L - window].
    """
    q_heads, length, _ = attn.shape
    groups = q_heads // kv_heads
    votes = attn[:, length - window :, : length - window].sum(dim=1)  # [Hq, L-w]
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(votes[:, None, :], kernel, stride=1, padding=kernel // 2)[:, 0]
    return torch.stack([pooled[h * groups : (h + 1) * groups].mean(dim=0) for h in range(kv_heads)])


def assert_valid_top_k(kept_set: set[int], scores: torch.Tensor, k: int, always: set[int]) -> None:
    """`kept_set` is `always` plus a top-k of `scores` (ties, common after max pooling, may go either way)."""
    assert always <= kept_set and len(kept_set) == len(always) + k
    chosen = sorted(kept_set - always)
    dropped = sorted(set(range(scores.shape[0])) - set(chosen))
    assert scores[chosen].min() >= scores[dropped].max() - 1e-6


@pytest.mark.parametrize("window,kernel,pooling,budget", [(8, 5, "avgpool", 40), (4, 7, "maxpool", 24), (16, 1, "avgpool", 100)])
def test_snapkv_keeps_what_the_window_votes_for(tiny_model, eager_attentions, window, kernel, pooling, budget):
    model, _ = tiny_model
    ids = prompt(model, 150, seed=window)
    technique = build_technique("snapkv", {"window_size": window, "kernel_size": kernel, "pooling": pooling,
                                           "max_capacity_prompt": budget})
    cache = compress_only(model, technique, ids)
    kv_heads = model.config.num_key_value_heads
    for layer, attn in zip(cache.layers, full_attention(eager_attentions, ids)):
        scores = snapkv_reference_scores(attn, kv_heads, window, kernel, pooling)
        for head, kept_set in enumerate(kept(layer)):
            assert_valid_top_k(kept_set, scores[head], budget - window, set(range(150 - window, 150)))
            if pooling == "avgpool":  # no plateaus: the choice is unique
                assert kept_set == set(scores[head].topk(budget - window).indices.tolist()) | set(range(150 - window, 150))
        assert layer.keys.shape[-2] == layer.values.shape[-2] == budget  # exactly the budget, every head


def test_h2o_keeps_heavy_hitters_and_recent_tokens(tiny_model, eager_attentions):
    model, _ = tiny_model
    ids = prompt(model, 120, seed=5)
    budget, recent = 30, 15
    cache = compress_only(model, build_technique("h2o", {"max_capacity_prompt": budget, "recent_fraction": 0.5}), ids)
    kv_heads = model.config.num_key_value_heads
    for layer, attn in zip(cache.layers, full_attention(eager_attentions, ids)):
        groups = attn.shape[0] // kv_heads
        received = attn.sum(dim=1)  # [Hq, L]: attention each key got from every query
        for h in range(kv_heads):
            scores = received[h * groups : (h + 1) * groups].mean(dim=0)
            assert_valid_top_k(kept(layer)[h], scores[: 120 - recent], budget - recent, set(range(120 - recent, 120)))


def test_h2o_stays_at_its_budget_while_decoding(tiny_model):
    model, _ = tiny_model
    technique = build_technique("h2o", {"max_capacity_prompt": 24, "recent_fraction": 0.25})
    with technique.applied(model) as cache:
        run = greedy_generate(model, prompt(model, 90, seed=6), cache, max_new_tokens=12)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 24 and layer.scores.shape[-1] == 24
        fed = 90 + len(run.tokens) - 1  # the last generated token is never fed back
        recent = set(range(fed - 6, fed))  # 25% of 24: the newest six entries are protected
        assert all(recent <= positions for positions in kept(layer))


def test_pyramidkv_budgets_shrink_with_depth_and_match_the_total(tiny_model):
    model, _ = tiny_model
    technique = build_technique("pyramidkv", {"window_size": 4, "max_capacity_prompt": 40, "beta": 4})
    cache = compress_only(model, technique, prompt(model, 200, seed=7))
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    expected = [technique.layer_budget(i, len(lengths), 200) for i in range(len(lengths))]
    assert lengths == expected
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert abs(sum(lengths) - 40 * len(lengths)) <= len(lengths)  # same total as SnapKV's uniform 40


@pytest.mark.parametrize("name,params", [
    ("snapkv", {"max_capacity_prompt": 512}),
    ("pyramidkv", {"max_capacity_prompt": 512}),
    ("h2o", {"max_capacity_prompt": 512}),
    ("snapkv", {"max_capacity_prompt": 1.0}),
])
def test_budget_covering_the_prompt_equals_dense(tiny_model, name, params):
    model, _ = tiny_model
    ids = prompt(model, 70, seed=8)
    dense = build_technique("dense", {}).generate(model, ids, 10)
    run = build_technique(name, params).generate(model, ids, 10)
    assert run.tokens == dense.tokens
    question = ids[:, 60:]
    split_dense = build_technique("dense", {}).generate(model, ids[:, :60], 10, question_ids=question)
    split = build_technique(name, params).generate(model, ids[:, :60], 10, question_ids=question)
    assert split.tokens == split_dense.tokens == dense.tokens


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o"])
def test_compressed_generation_is_deterministic_and_smaller(tiny_model, name):
    model, _ = tiny_model
    ids = prompt(model, 160, seed=9)
    technique = build_technique(name, {"max_capacity_prompt": 32, **({"window_size": 8} if name != "h2o" else {})})
    first, second = technique.generate(model, ids, 8), technique.generate(model, ids, 8)
    assert first.tokens == second.tokens and len(first.tokens) == 8
    dense = build_technique("dense", {}).generate(model, ids, 8)
    assert first.kv_bytes < dense.kv_bytes / 3
    # Context-only placement: the question arrives after compression and is appended in full.
    split = technique.generate(model, ids[:, :140], 8, question_ids=ids[:, 140:])
    assert len(split.tokens) == 8


def test_attention_hooks_are_removed(tiny_model):
    """Our hook is installed once per layer while applied, and only ours is removed afterwards
    (transformers keeps hooks of its own once hidden states have been requested)."""
    model, _ = tiny_model

    def hooks() -> list[set[int]]:
        return [set(layer.self_attn._forward_hooks) for layer in model.model.layers]

    before, implementation = hooks(), model.config._attn_implementation
    technique = build_technique("snapkv", {"max_capacity_prompt": 16, "window_size": 4})
    with technique.applied(model):
        assert all(len(during - kept) == 1 for during, kept in zip(hooks(), before))
        assert model.config._attn_implementation == "paretoray_sdpa"
    technique.generate(model, prompt(model, 40), 3)
    assert hooks() == before
    assert model.config._attn_implementation == implementation


@pytest.mark.parametrize("capacity,window,beta,prompt_len,layers,expected", [
    # C <= L < 2 (C - w): the reference keeps SnapKV's uniform C in every layer (not a clamped pyramid).
    (1024, 32, 20, 1536, 30, [1024] * 30),
    # L >= 2 (C - w): min = 96 // 20 = 4, max = 192 - 4 = 188, steps = (188 - 4) // 29 = 6: 188 - 6 i + 32.
    (128, 32, 20, 2048, 30, [188 - 6 * i + 32 for i in range(30)]),
    # The clamp: max = 64 - 1 = 63 >= L - w = 48, so max = 48, min = 64 - 48 = 16, steps = 32 // 29 = 1.
    (64, 32, 20, 80, 30, [48 - i + 32 for i in range(30)]),
    # L < C: nothing compressed.
    (1024, 32, 20, 900, 4, [900] * 4),
])
def test_pyramidkv_budgets_follow_the_reference_formulas(capacity, window, beta, prompt_len, layers, expected):
    technique = build_technique("pyramidkv", {"window_size": window, "max_capacity_prompt": capacity, "beta": beta})
    assert [technique.layer_budget(i, layers, prompt_len) for i in range(layers)] == expected
