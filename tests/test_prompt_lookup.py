"""Prompt lookup decoding on tiny random models: the n-gram proposer by hand, lossless greedy
decoding (eager and compiled), a verifier that reproduces the target distribution with a
deterministic (one-hot) draft, consistent counters and exact cache rollback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from paretoray.actors.generation import with_cache
from paretoray.actors.techniques import build_technique
from paretoray.actors.techniques.prompt_lookup import lookup, lookup_generate, one_hot_proposal
from paretoray.actors.techniques.speculative import Sampler, verify

NEW = 30


def random_prompt(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def repetitive(tiny_model):
    """20 random tokens and the model's own 100 greedy tokens after them: a random tiny Llama
    settles into a cycle (a period of 12 tokens for this seed), so its continuation repeats text
    already in the prompt, as input-grounded generation does."""
    model, _ = tiny_model
    return model.generate(random_prompt(model, 20, 0), max_new_tokens=100, min_new_tokens=100, do_sample=False)


def greedy(model, ids: torch.Tensor, new: int = NEW) -> list[int]:
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, ids.shape[1]:].tolist()


# ---- the proposer ------------------------------------------------------------------------------


def proposed(tokens: list[int], ngram_size: int, max_candidates: int) -> list[int]:
    return lookup(np.array(tokens, dtype=np.int64), ngram_size, max_candidates).tolist()


def test_the_longest_matching_ngram_wins():
    tokens = [5, 2, 3, 7, 1, 3, 8, 4, 2, 3]  # suffix [2, 3] occurs at 1; [3] last occurs at 5
    assert proposed(tokens, 3, 3) == [7, 1, 3]  # [4, 2, 3] is nowhere earlier: the 2-gram decides
    assert proposed(tokens, 2, 3) == [7, 1, 3]
    assert proposed(tokens, 1, 3) == [8, 4, 2]  # the unigram's most recent occurrence


def test_the_most_recent_occurrence_wins_and_max_candidates_bounds_the_proposal():
    tokens = [1, 2, 5, 1, 2, 6, 9, 1, 2]
    assert proposed(tokens, 2, 10) == [6, 9, 1, 2]  # after the occurrence at 3, not the one at 0
    assert proposed(tokens, 2, 1) == [6]
    assert proposed(tokens, 2, 2) == [6, 9]


def test_no_match_proposes_nothing():
    assert proposed([1, 2, 3, 4], 3, 5) == []
    assert proposed([4], 3, 5) == []  # one token: nothing earlier to match
    assert proposed([9, 8, 7, 6, 9, 8, 7, 5], 4, 5) == []  # [7, 5], [5] nowhere earlier


def test_never_proposes_past_the_end_nor_matches_the_suffix_itself():
    assert proposed([1, 2, 1, 2], 2, 10) == [1, 2]  # what follows the match, up to the last token
    assert proposed([7, 7, 7], 2, 10) == [7]  # [7, 7] at 0: only one token follows it
    assert proposed([4, 4], 3, 10) == [4]  # n capped at length - 1
    assert proposed([1, 2, 1, 2], 2, 0) == []  # no room left in the budget: no search


# ---- lossless greedy decoding ------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    {}, {"ngram_size": 1, "max_candidates": 1}, {"ngram_size": 2, "max_candidates": 5}, {"ngram_size": 4, "max_candidates": 16},
])
def test_greedy_is_lossless(tiny_model, repetitive, params):
    model, _ = tiny_model
    technique = build_technique("prompt_lookup", params)
    for ids in (repetitive, random_prompt(model, 60, 1)):
        run = technique.generate(model, ids, NEW)
        assert run.tokens == greedy(model, ids)
        assert len(run.step_s) == NEW - 1
        assert not run.compiled
    assert technique.generate(model, repetitive, NEW).stats["accepted"] > 0


def test_counters_on_a_repetitive_prompt(tiny_model, repetitive):
    model, _ = tiny_model
    stats = build_technique("prompt_lookup", {}).generate(model, repetitive, NEW).stats
    assert stats["draft_calls"] == 0  # no draft model
    assert 0 < stats["accepted"] <= stats["drafted"]
    # The prefill gives the first token, each round its accepted tokens plus the target's own next
    # one; proposals are capped so that no round overshoots the budget.
    assert 1 + stats["accepted"] + stats["target_calls"] == NEW
    assert stats["target_calls"] / (NEW - 1) < 0.5  # well under one target forward per token


def test_stops_at_end_of_sequence(tiny_model, repetitive):
    model, _ = tiny_model
    expected = greedy(model, repetitive)
    eos = expected[12]  # a token of the cycle: proposed, accepted, and the generation ends there
    run = build_technique("prompt_lookup", {}).generate(model, repetitive, NEW, {eos})
    assert run.tokens == expected[: expected.index(eos) + 1]


def test_compiled_gives_the_eager_tokens(tiny_model, repetitive):
    """One case: compiling the target's verification graphs takes 10-60 s on this CPU."""
    model, _ = tiny_model
    technique = build_technique("prompt_lookup", {"ngram_size": 2, "max_candidates": 5})
    eager = technique.generate(model, repetitive, NEW)
    compiled = technique.generate(model, repetitive, NEW, compiled=True)
    assert compiled.compiled and compiled.tokens == eager.tokens == greedy(model, repetitive)
    assert compiled.stats == eager.stats
    assert len(compiled.step_s) + (compiled.warmup_s > 0) <= NEW - 1


def test_rollback_leaves_the_cache_equal_to_a_fresh_prefill(tiny_model, repetitive):
    model, _ = tiny_model
    cache = DynamicCache(config=model.config)
    # Long proposals on a random prompt: mostly rejected, so the cache is cropped every round.
    run = lookup_generate(build_technique("prompt_lookup", {"ngram_size": 1, "max_candidates": 8}), model,
                          random_prompt(model, 60, 2), NEW, set(), cache=cache)
    assert run.stats["accepted"] < run.stats["drafted"]
    sequence = random_prompt(model, 60, 2)[0].tolist() + run.tokens
    assert cache.get_seq_length() == len(sequence) - 1  # all but the last token, not fed yet
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([sequence[:-1]]), **with_cache(model, fresh), use_cache=True)
    for kept, reference in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(kept.keys, reference.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kept.values, reference.values, rtol=1e-4, atol=1e-5)


def test_refuses_teacher_forcing_and_serves_context_only_placement_as_one_prompt(tiny_model):
    model, _ = tiny_model
    technique, ids = build_technique("prompt_lookup", {}), random_prompt(model, 20, 3)
    with pytest.raises(ValueError, match="fidelity"):
        technique.generate(model, ids, 4, forced_tokens=[5, 6, 7, 8])
    question = random_prompt(model, 5, 4)
    split = technique.generate(model, ids, 6, question_ids=question).tokens
    assert split == build_technique("dense", {}).generate(model, torch.cat([ids, question], dim=-1), 6).tokens
    assert not technique.capabilities()["measures_fidelity"]  # so the runner never teacher-forces it


# ---- sampling ----------------------------------------------------------------------------------


def test_one_hot_draft_verification_reproduces_the_target_distribution():
    """A lookup proposal is a deterministic draft: q_i is one-hot on d_i. The first committed token
    must follow p_1, and the second, in the rounds that accepted d_1, p_2."""
    vocab, samples = 6, 20_000
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(3, vocab, generator=generator).pow(3).softmax(-1)  # target rows for [last, d_1, d_2]
    candidates = np.array([int(p[0].argsort()[3]), int(p[1].argsort()[2])])  # middling, neither certain
    proposal = one_hot_proposal(torch.from_numpy(candidates), vocab, Sampler.of(1.0, 0, torch.device("cpu")))
    assert proposal.q.tolist() == torch.eye(vocab)[candidates].tolist()
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(samples):
        accepted, following = verify(p, proposal.q, candidates.tolist(), generator)
        first[candidates[0] if accepted >= 1 else following] += 1
        if accepted >= 1:
            second[candidates[1] if accepted >= 2 else following] += 1
    for counts, target in ((first, p[0]), (second, p[1])):
        n = counts.sum()
        # Each frequency is a mean of n Bernoulli draws: 5 standard errors is a 1-in-a-million miss.
        tolerance = 5 * (target * (1 - target) / n).sqrt()
        assert ((counts / n) - target).abs().le(tolerance).all(), (counts / n, target)


def test_sampling_runs_is_seeded_and_accepts(tiny_model, repetitive):
    model, _ = tiny_model
    technique = build_technique("prompt_lookup", {"temperature": 0.03})  # the random model's logits are flat
    first = technique.generate(model, repetitive, NEW, seed=7)
    again = technique.generate(model, repetitive, NEW, seed=7)
    assert first.tokens == again.tokens and len(first.tokens) == NEW
    assert 0 < first.stats["accepted"] <= first.stats["drafted"]


def test_sampled_tokens_follow_the_target_distribution_end_to_end(tiny_model, repetitive):
    """The first verified token (the second generated), over many seeds, against its exact
    marginal sum_t1 p(t1 | prompt) p(t2 | prompt, t1). At temperature 0.05 the lookup's proposal
    is the target's likeliest token with probability about 0.7, so accepting it always, or
    resampling a rejection without removing it, would be far outside the tolerance."""
    model, _ = tiny_model
    temperature, samples = 0.05, 1000
    technique = build_technique("prompt_lookup", {"ngram_size": 2, "max_candidates": 2, "temperature": temperature})
    counts = torch.zeros(model.config.vocab_size)
    drafted = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a thousand tiny generations: on 2 shared cores one thread is several times faster
    try:
        for seed in range(samples):
            run = technique.generate(model, repetitive, 3, seed=seed)
            counts[run.tokens[1]] += 1
            drafted += run.stats["drafted"] > 0
    finally:
        torch.set_num_threads(threads)
    assert drafted > samples // 2  # most first rounds verified a proposal
    with torch.no_grad():
        first = torch.softmax(model(repetitive).logits[0, -1] / temperature, -1)  # [V]
        every = torch.arange(model.config.vocab_size)[:, None]
        batch = torch.cat([repetitive.expand(len(every), -1), every], dim=1)  # [V, L + 1]: each t1
        second = torch.softmax(model(batch, logits_to_keep=1).logits[:, -1] / temperature, -1)  # [V, V]
    marginal = first @ second
    tolerance = 5 * (marginal * (1 - marginal) / samples).sqrt() + 1e-3
    assert ((counts / samples) - marginal).abs().le(tolerance).all()


def test_a_sweep_of_it_needs_no_draft_and_reports_speculative_metrics(tmp_path):
    import yaml

    from paretoray.orchestrator.spec import load_spec

    spec = {
        "name": "pld",
        "model": "smollm2-135m",  # no `draft:` — prompt lookup has none
        "workload": {"task": "passkey", "context_lengths": [256]},
        "techniques": {"prompt_lookup": {"ngram_size": [1, 3], "max_candidates": {"low": 2, "high": 16}}},
        "objectives": {"acceptance_rate": "maximize", "speedup": "maximize"},
        "constraints": ["target_calls_per_token <= 1"],
        "trials": 2,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert load_spec(path).model.draft is None


def test_a_batch_gives_every_row_its_own_greedy_tokens(tiny_model, repetitive):
    """Rows whose lookups propose different numbers of tokens (padded in one verification) and
    accept different numbers each round: each row's tokens are the model's own."""
    model, _ = tiny_model
    rows = [repetitive, random_prompt(model, 50, 7), repetitive[:, :90]]
    budgets = [30, 20, 25]
    for params in ({}, {"ngram_size": 2, "max_candidates": 3}):
        technique = build_technique("prompt_lookup", params)
        batch = technique.generate_batch(model, rows, budgets)
        assert batch.tokens == [build_technique("dense", {}).generate(model, ids, n).tokens for ids, n in zip(rows, budgets)]
        assert sum(batch.active) == sum(len(t) - 1 for t in batch.tokens)
        assert batch.stats[0]["accepted"] > 0
