"""Speculative decoding on tiny random models: lossless greedy, a sampling verifier that
reproduces the target distribution, SpecDec++'s stopping rule, and exact cache rollback."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from paretoray.actors.generation import with_cache
from paretoray.actors.techniques import build_technique
from paretoray.actors.techniques.specdec_pp import AcceptanceHead, ThresholdPolicy
from paretoray.actors.techniques.speculative import DRAFT_VOCAB, DraftHead, speculative_generate, verify


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A 1-layer random draft sharing the tiny target's tokenizer, with a random acceptance head."""
    from tests.tiny import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp("draft") / "tiny-draft", num_layers=1, seed=1)
    torch.manual_seed(0)
    AcceptanceHead(hidden_size=64, num_layers=3).save(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def prompt(model, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (1, length), generator=generator)


@pytest.mark.parametrize("name,params", [
    ("specdec", {"gamma": 1}), ("specdec", {"gamma": 3}), ("specdec", {"gamma": 8}),
    ("specdec_pp", {"threshold": 0.2, "max_gamma": 6}), ("specdec_pp", {"threshold": 0.9, "max_gamma": 12}),
])
def test_greedy_is_lossless(tiny_model, draft, name, params):
    target, _ = tiny_model
    technique = build_technique(name, params)
    for seed in range(3):
        ids = prompt(target, 40, seed)
        expected = target.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 40:].tolist()
        run = technique.generate(target, ids, 20, draft=draft)
        assert run.tokens == expected
        assert run.stats["target_calls"] >= 1 and run.stats["accepted"] <= run.stats["drafted"]
        assert len(run.step_s) == 19


def test_greedy_draft_equal_to_target_accepts_everything(tiny_model):
    target, _ = tiny_model
    run = build_technique("specdec", {"gamma": 4}).generate(target, prompt(target, 30, 9), 21, draft=target)
    assert run.stats["accepted"] == run.stats["drafted"]  # every round: 4 accepted + 1 bonus token
    assert run.stats["target_calls"] == 4


@pytest.fixture(scope="module")
def restricted_draft(tmp_path_factory):
    """A 1-layer random draft whose head predicts over 150 of the 400 tokens only."""
    from safetensors.torch import save_file

    from tests.tiny import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp("draft") / "restricted", num_layers=1, seed=3)
    kept = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:150].sort().values
    save_file({"token_ids": kept}, str(folder / DRAFT_VOCAB))
    torch.manual_seed(1)
    AcceptanceHead(hidden_size=64, num_layers=3).save(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), set(kept.tolist())


@pytest.mark.parametrize("name,params", [("specdec", {"gamma": 3}), ("specdec_pp", {"threshold": 0.5, "max_gamma": 8})])
def test_a_draft_restricted_to_a_sub_vocabulary_stays_lossless(tiny_model, restricted_draft, name, params):
    from paretoray.actors.techniques.specdec import FixedLength
    from paretoray.actors.techniques.speculative import Sampler, propose

    target, _ = tiny_model
    draft, kept = restricted_draft
    assert len(DraftHead.of(draft).weight) == 150
    for temperature in (0.0, 1.0):
        sampler = Sampler.of(temperature, 0, torch.device("cpu"))
        proposal = propose(draft, DraftHead.of(draft), FixedLength(30), sampler, prompt(target, 20, 1)[0],
                           DynamicCache(config=draft.config), room=30)
        assert set(proposal.tokens.tolist()) <= kept  # the draft can only propose its head's tokens
    for seed in range(2):
        ids = prompt(target, 40, seed)
        expected = target.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 40:].tolist()
        assert build_technique(name, params).generate(target, ids, 20, draft=draft).tokens == expected


def test_draft_head_spreads_sub_vocabulary_probabilities_back_over_the_vocabulary():
    head = DraftHead(torch.randn(3, 8), torch.tensor([1, 4, 6]), vocab_size=10)
    full = head.full(torch.tensor([0.2, 0.3, 0.5]))
    assert full.tolist() == pytest.approx([0, 0.2, 0, 0, 0.3, 0, 0.5, 0, 0, 0])
    assert head.token(1) == 4 and head.logits(torch.randn(8)).shape == (3,)


@pytest.mark.parametrize("k,restricted", [(1, False), (3, False), (2, True)])
def test_sampling_verifier_reproduces_the_target_distribution(k, restricted):
    vocab, samples = 6, 40_000
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(k + 1, vocab, generator=generator).pow(3).softmax(-1)  # target rows
    q = torch.rand(k, vocab, generator=generator).pow(3).softmax(-1)  # draft rows, quite different
    if restricted:  # a sub-vocabulary draft: tokens it cannot propose must still come out at rate p
        q[:, :2] = 0
        q = q / q.sum(-1, keepdim=True)
    counts = torch.zeros(vocab)
    for _ in range(samples):
        tokens = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(k)]
        accepted, following = verify(p, q, tokens, generator)
        first = tokens[0] if accepted >= 1 else following
        counts[first] += 1
    observed = counts / samples
    # Each frequency is a mean of `samples` Bernoulli draws: 5 standard errors is a 1-in-a-million miss.
    tolerance = 5 * (p[0] * (1 - p[0]) / samples).sqrt()
    assert (observed - p[0]).abs().le(tolerance).all(), (observed, p[0])


def test_stopping_rule_stops_when_rejection_probability_exceeds_threshold():
    """The reference's indexing (hf_generation.py): at draft step j the head has scored candidates
    1..j-1 only; step 1's factor is 1 (the state there is the verified last token)."""
    hidden = torch.zeros(1)
    for threshold in (0.05, 0.2, 0.5):
        probs = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]  # the head's p_accept of candidates 1, 2, 3 ...
        expected = next(k for k in range(1, 8) if 1 - math.prod(probs[: k - 1]) > threshold)
        feed = iter(probs)
        policy = ThresholdPolicy(lambda h: next(feed), threshold, min_gamma=1, max_gamma=20)
        policy.begin_round()
        stopped_at = next(k for k in range(1, 8) if policy.stop(k, hidden))
        assert stopped_at == expected
    # The bounds win over the threshold: at least min_gamma, at most max_gamma proposals.
    policy = ThresholdPolicy(lambda h: 0.01, 0.1, min_gamma=3, max_gamma=5)
    policy.begin_round()
    assert [policy.stop(k, hidden) for k in (1, 2, 3)] == [False, False, True]
    # However confident it is that everything is rejected, the head cannot stop a round at 1
    # candidate: the first factor is the verified token's.
    policy = ThresholdPolicy(lambda h: 0.0, 0.01, min_gamma=1, max_gamma=5)
    policy.begin_round()
    assert [policy.stop(k, hidden) for k in (1, 2)] == [False, True]
    policy = ThresholdPolicy(lambda h: 1.0, 0.1, min_gamma=1, max_gamma=4)
    policy.begin_round()
    assert [policy.stop(k, hidden) for k in (1, 2, 3, 4)] == [False, False, False, True]


class _Recording:
    """A drafting policy that stops after `gamma` proposals and records the states it was shown."""

    def __init__(self, gamma: int):
        self.gamma, self.seen = gamma, []

    def begin_round(self) -> None:
        self.seen.append([])

    def stop(self, proposed: int, draft_hidden: torch.Tensor) -> bool:
        self.seen[-1].append(draft_hidden.clone())
        return proposed >= self.gamma


def test_the_policy_sees_the_state_after_each_earlier_candidate_was_fed(tiny_model, draft):
    """What SpecDec++'s head scores: at draft step j, the draft's state after its input
    [committed..., d_1..d_{j-1}], i.e. after candidate j - 1 (at j = 1, after the last committed token)."""
    from paretoray.actors.techniques.speculative import Sampler, propose

    target, _ = tiny_model
    ids = prompt(target, 25, 8)[0]
    policy = _Recording(gamma=4)
    proposal = propose(draft, DraftHead.of(draft), policy, Sampler.of(0.0, 0, torch.device("cpu")), ids,
                       DynamicCache(config=draft.config), room=4)
    candidates = proposal.tokens.tolist()
    with torch.no_grad():
        for j, state in enumerate(policy.seen[0], start=1):
            fed = torch.cat([ids, torch.tensor(candidates[: j - 1], dtype=torch.long)])
            expected = draft.base_model(fed[None]).last_hidden_state[0, -1]
            torch.testing.assert_close(state, expected, rtol=1e-4, atol=1e-5)


def test_rollback_leaves_caches_equal_to_a_fresh_prefill(tiny_model, draft):
    target, _ = tiny_model
    ids = prompt(target, 35, 4)
    target_cache, draft_cache = DynamicCache(config=target.config), DynamicCache(config=draft.config)
    technique = build_technique("specdec", {"gamma": 5})
    run = speculative_generate(technique, target, draft, ids, 24, set(), target_cache=target_cache, draft_cache=draft_cache)
    assert run.stats["accepted"] < run.stats["drafted"]  # rejections happened: rollback was exercised
    sequence = ids[0].tolist() + run.tokens
    for model, cache in ((target, target_cache), (draft, draft_cache)):
        held = cache.get_seq_length()
        fresh = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.tensor([sequence[:held]]), **with_cache(model, fresh), use_cache=True)
        for kept, reference in zip(cache.layers, fresh.layers):
            torch.testing.assert_close(kept.keys, reference.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(kept.values, reference.values, rtol=1e-4, atol=1e-5)
    assert target_cache.get_seq_length() == len(sequence) - 1  # all but the last token, not fed yet


def test_sampling_runs_and_is_seeded(tiny_model, draft):
    target, _ = tiny_model
    technique = build_technique("specdec", {"gamma": 3, "temperature": 1.0})
    ids = prompt(target, 30, 5)
    first = technique.generate(target, ids, 15, draft=draft, seed=7)
    again = technique.generate(target, ids, 15, draft=draft, seed=7)
    assert first.tokens == again.tokens and len(first.tokens) == 15


@pytest.mark.slow
def test_lossless_on_smollm2_with_a_short_prompt():
    """The real default model: greedy specdec and specdec_pp reproduce its own greedy output.

    The draft is SmolLM2's first two layers, untrained (losslessness must not depend on the draft)."""
    from paretoray.recipes.draft import truncated_copy
    from paretoray.actors.models import load_model
    from paretoray.actors.prompts import as_chat
    from paretoray.actors.techniques.specdec_pp import _HEADS

    target, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    draft = truncated_copy(target, 2).eval()
    torch.manual_seed(0)
    head = AcceptanceHead(target.config.hidden_size)
    _HEADS[str(draft.name_or_path)] = head.eval()  # an untrained head: any stopping rule must stay lossless
    ids = tokenizer(as_chat(tokenizer, "What is the capital of France?"), return_tensors="pt").input_ids
    # Plain greedy generation up to its end-of-sequence token (no min_new_tokens: that would mask EOS).
    expected = target.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = {tokenizer.eos_token_id}
    for technique in (build_technique("specdec", {"gamma": 3}), build_technique("specdec_pp", {"threshold": 0.5, "max_gamma": 6})):
        assert technique.generate(target, ids, 24, eos, draft=draft).tokens == expected
    assert "Paris" in tokenizer.decode(expected)
