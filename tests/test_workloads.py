import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from paretoray.actors import workloads as wl
from paretoray.actors.workloads import TASKS, build_samples, score_exact_match
from tests.tiny import make_tiny_tokenizer, save_tiny_llama

NIAH_NEEDLE_RE = re.compile(r"One of the special magic numbers for (\w+) is: (\d+)\. ")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def test_tiny_tokenizer_splits_digits(tok):
    ids = tok("The pass key is 71432.", add_special_tokens=True).input_ids
    assert ids[0] == tok.bos_token_id
    tokens = tok.convert_ids_to_tokens(ids)
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("71432")


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [256, 500, 1024])
def test_prompts_fit_the_window(tok, task, length):
    block = len(tok(wl.FILLER, add_special_tokens=False).input_ids)
    samples = build_samples(task, tok, [length], 3, [0.0, 0.5, 1.0], seed=7)
    assert len(samples) == 9
    for s in samples:
        # Context and question are tokenized apart; together they are the prompt.
        question = tok.decode(s.question_ids)
        assert question.startswith("\nWhat is") and s.prompt.endswith(question)
        assert s.context_ids == tok(s.prompt[: len(s.prompt) - len(question)], add_special_tokens=True).input_ids
        assert s.prompt_ids == s.context_ids + list(s.question_ids)
        assert length - (block + 8) <= len(s.prompt_ids) <= length
        assert s.context_length == length and s.task == task


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_and_seed_sensitive(tok, task):
    a = build_samples(task, tok, [300, 600], 3, None, seed=1)
    b = build_samples(task, tok, [300, 600], 3, None, seed=1)
    c = build_samples(task, tok, [300, 600], 3, None, seed=2)
    assert a == b
    assert [s.sample_id for s in a] == [s.sample_id for s in c]
    assert [s.answer for s in a] != [s.answer for s in c]


def test_default_depths_cover_the_haystack(tok):
    samples = build_samples("passkey", tok, [512, 1024], 4, None, seed=0)
    assert [s.depth for s in samples] == [0.125, 0.375, 0.625, 0.875] * 2
    assert samples[0].sample_id == "passkey/ctx512/d0.125/s0"
    assert len({s.sample_id for s in samples}) == len(samples)


def test_explicit_depths_repeat_per_depth(tok):
    samples = build_samples("passkey", tok, [400], 2, [0.1, 0.9], seed=0)
    assert [s.depth for s in samples] == [0.1, 0.1, 0.9, 0.9]
    assert len({s.answer for s in samples}) == 4


def test_passkey_prompt_contains_needle_and_answer(tok):
    for s in build_samples("passkey", tok, [512], 3, None, seed=3):
        assert re.fullmatch(r"[1-9]\d{4}", s.answer)
        assert s.prompt.startswith(wl.PASSKEY_INTRO)
        assert s.prompt.endswith(wl.PASSKEY_QUESTION)
        assert s.prompt.count(wl.PASSKEY_NEEDLE.format(key=s.answer)) == 1
        assert s.prompt.count(s.answer) == 2


@pytest.mark.parametrize("task", sorted(TASKS))
def test_needle_offset_increases_with_depth(tok, task):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    samples = build_samples(task, tok, [1024], 1, depths, seed=5, num_keys=1)
    needle = "The pass key is" if task == "passkey" else "One of the special magic numbers"
    offsets = [s.prompt.index(needle) for s in samples]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    intro = wl.PASSKEY_INTRO if task == "passkey" else wl.NIAH_INTRO
    assert offsets[0] == len(intro)
    # At depth 1 nothing but the needle separates the haystack from the question.
    assert not samples[-1].prompt[offsets[-1] :].count(wl.FILLER)


def test_multikey_needles(tok):
    for s in build_samples("multikey_niah", tok, [1024], 4, None, seed=11, num_keys=6):
        found = NIAH_NEEDLE_RE.findall(s.prompt)
        assert len(found) == 6
        words = [w for w, _ in found]
        assert len(set(words)) == 6 and set(words) <= set(wl.WORDS)
        assert len({n for _, n in found}) == 6 and all(len(n) == 7 for _, n in found)
        queried = re.search(r"special magic number for (\w+) mentioned", s.prompt).group(1)
        assert dict(found)[queried] == s.answer
        assert s.prompt.endswith(wl.NIAH_QUESTION.format(word=queried))


def test_score_exact_match():
    assert score_exact_match("71432", " 71432. Remember") == 1.0
    assert score_exact_match("71432", "71432") == 1.0
    assert score_exact_match("71432", " 7143") == 0.0
    assert score_exact_match("71432", " 714321") == 0.0
    assert score_exact_match("71432", " 12 then 71432") == 0.0
    assert score_exact_match("71432", " no digits here") == 0.0
    assert score_exact_match("71432", "") == 0.0


def test_unknown_task_lists_available(tok):
    with pytest.raises(KeyError) as err:
        build_samples("nope", tok, [512], 1, None, seed=0)
    assert all(name in str(err.value) for name in TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_too_small_context_raises(tok, task):
    with pytest.raises(ValueError, match="too small"):
        build_samples(task, tok, [16], 1, None, seed=0)


def test_tiny_llama_loads_and_runs(tmp_path):
    path = save_tiny_llama(tmp_path / "tiny", num_layers=1, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    sample = build_samples("passkey", tokenizer, [256], 1, None, seed=0)[0]
    question = tokenizer.decode(sample.question_ids)
    assert sample.context_ids == make_tiny_tokenizer()(sample.prompt[: -len(question)]).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([sample.prompt_ids])).logits
    assert model.dtype == torch.float32
    assert logits.shape == (1, len(sample.prompt_ids), len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("task", ["instructions", "arithmetic", "code"])
def test_decoding_tasks_are_seeded_prompt_sets_without_answers(tok, task):
    samples = build_samples(task, tok, [], 4, None, seed=2)
    assert len(samples) == 4 and all(s.answer == "" and s.task == task for s in samples)
    assert [s.prompt for s in samples] == [s.prompt for s in build_samples(task, tok, [], 4, None, seed=2)]
    assert all(s.prompt_ids == tok(s.prompt).input_ids for s in samples)  # no chat template here: raw text
