import hashlib
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from paretoray.actors.tasks import Sample, TaskInputError, available_tasks, build_task, task_class
from paretoray.actors.tasks import multikey_niah as mk
from paretoray.actors.tasks import passkey as pk
from paretoray.actors.tasks.base import describe_config
from paretoray.actors.tasks.cache import cached_samples
from paretoray.actors.tasks.haystack import FILLER
from paretoray.actors.tasks.passkey import first_number_matches as score_exact_match
from tests.tiny import make_tiny_tokenizer, save_tiny_llama

TASKS = ("passkey", "multikey_niah")


class wl:  # the prompt parts, as the tests name them
    FILLER = FILLER
    PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION = pk.INTRO, pk.NEEDLE, pk.QUESTION
    NIAH_INTRO, NIAH_NEEDLE, NIAH_QUESTION, WORDS = mk.INTRO, mk.NEEDLE, mk.QUESTION, mk.WORDS


def build_samples(task, tokenizer, lengths, per_length, depths, seed, num_keys=None):
    settings = {"samples_per_length": per_length}
    if lengths:
        settings["context_lengths"] = lengths
    if depths is not None:
        settings["depths"] = depths
    if num_keys is not None:
        settings["num_keys"] = num_keys
    return build_task(task, settings).build(tokenizer, seed)

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
        assert list(s.prompt_ids) == s.context_ids + list(s.question_ids)
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
    samples = build_samples(task, tok, [1024], 1, depths, seed=5, num_keys=1 if task == "multikey_niah" else None)
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
    with pytest.raises(ValueError, match=">= 64"):
        build_samples(task, tok, [16], 1, None, seed=0)
    with pytest.raises(TaskInputError, match="too small") as err:
        build_samples(task, tok, [64], 1, None, seed=0, num_keys=30 if task == "multikey_niah" else None)
    assert err.value.field == "context_lengths"


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


# Digests of the prompts the tasks gave before they became one file each (paretoray/actors/workloads.py,
# 2026-11-30): a ported task must give identical prompts, ids, questions and answers for the same seed.
PINNED = {
    ("passkey", '{"context_lengths": [256, 700], "samples_per_length": 3}', 0): "0540b87505a95972",
    ("passkey", '{"context_lengths": [256, 700], "samples_per_length": 3}', 7): "2fc335138cccded3",
    ("passkey", '{"context_lengths": [512], "depths": [0.0, 0.3, 1.0], "samples_per_length": 2}', 0): "415736d225be18cb",
    ("passkey", '{"context_lengths": [512], "depths": [0.0, 0.3, 1.0], "samples_per_length": 2}', 7): "fa5f6ba278bce945",
    ("multikey_niah", '{"context_lengths": [300, 1024], "num_keys": 5, "samples_per_length": 2}', 0): "ba1f170d5a3d472e",
    ("multikey_niah", '{"context_lengths": [300, 1024], "num_keys": 5, "samples_per_length": 2}', 7): "cab0f2b0afebd76f",
    ("multikey_niah", '{"context_lengths": [400], "samples_per_length": 3}', 0): "726b30f311daf87a",
    ("multikey_niah", '{"context_lengths": [400], "samples_per_length": 3}', 7): "e0474e3da101c4ac",
    ("instructions", '{"samples_per_length": 4}', 0): "c98ea9bf90927c66",
    ("instructions", '{"samples_per_length": 4}', 7): "07e2c7aab2e9ccd9",
    ("arithmetic", '{"samples_per_length": 3}', 0): "e88256de0332b982",
    ("arithmetic", '{"samples_per_length": 3}', 7): "4bd252f11776f393",
    ("code", '{"samples_per_length": 3}', 0): "9bc5f71da214ebab",
    ("code", '{"samples_per_length": 3}', 7): "066975962fb9e954",
    ("mixed", '{"samples_per_length": 5}', 0): "bd236c166a09a51e",
    ("mixed", '{"samples_per_length": 5}', 7): "03a2071b28b7f0e7",
}


@pytest.mark.parametrize("task,settings,seed", sorted(PINNED))
def test_ported_tasks_give_identical_prompts(tok, task, settings, seed):
    samples = build_task(task, json.loads(settings)).build(tok, seed)
    rows = [[s.sample_id, s.prompt, list(s.prompt_ids), list(s.question_ids), s.answer] for s in samples]
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16] == PINNED[(task, settings, seed)]


def test_registry_lists_every_task_with_its_fields():
    tasks = available_tasks()
    for name in ("passkey", "multikey_niah", "instructions", "arithmetic", "code", "mixed"):
        assert name in tasks and tasks[name].summary
    fields = {row[0]: row for row in describe_config(task_class("multikey_niah").Config)}
    assert fields["context_lengths"][2] == "required"
    assert fields["num_keys"][2] == "4" and ">=1" in fields["num_keys"][1]


def test_task_config_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        build_task("passkey", {"context_lengths": [512], "num_keys": 3})
    assert err.value.errors()[0]["loc"] == ("num_keys",)
    with pytest.raises(ValidationError) as err:
        build_task("multikey_niah", {"context_lengths": [512], "num_keys": 0})
    assert err.value.errors()[0]["loc"] == ("num_keys",)


def test_samples_are_cached_per_tokenizer_and_settings(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path))
    task = build_task("passkey", {"context_lengths": [300], "samples_per_length": 2})
    first = cached_samples(task, tok, seed=3, window=1024)
    files = list((tmp_path / "samples").glob("passkey-*.json"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(type(task), "build", lambda self, *a, **k: calls.append(a) or [])
    assert cached_samples(task, tok, seed=3, window=1024) == first and not calls  # read back, not rebuilt
    assert first[0].question_ids == tuple(first[0].question_ids) and isinstance(first[0], Sample)
    monkeypatch.undo()
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path))
    cached_samples(task, tok, seed=4, window=1024)  # another seed: another entry
    cached_samples(build_task("passkey", {"context_lengths": [300], "samples_per_length": 3}), tok, seed=3, window=1024)
    assert len(list((tmp_path / "samples").glob("passkey-*.json"))) == 3


def test_a_prompt_longer_than_the_window_names_the_sample(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path))
    task = build_task("passkey", {"context_lengths": [512], "samples_per_length": 1})
    with pytest.raises(TaskInputError, match=r"passkey/ctx512/d0.5/s0: .* exceed the model's window of 480") as err:
        cached_samples(task, tok, seed=0, window=480, budget=8)
    assert err.value.field == "context_lengths"


def test_suite_runs_each_entry_with_its_own_scorer_and_budget(tok):
    from pydantic import ValidationError

    suite = build_task("suite", {"tasks": {
        "passkey": {"context_lengths": [256]},
        "mk": {"task": "multikey_niah", "context_lengths": [300], "samples_per_length": 1, "max_new_tokens": 5},
    }})
    samples = suite.build(tok, 0)
    assert [(s.group, s.max_new_tokens) for s in samples] == [("passkey", 8), ("passkey", 8), ("mk", 5)]
    assert samples[2].sample_id.startswith("mk:multikey_niah/ctx300")
    assert suite.has_lengths and suite.context_lengths == [256, 300]
    assert all(suite.score(s, f" {s.answer}.")["accuracy"] == 1.0 for s in samples)
    alone = build_task("passkey", {"context_lengths": [256]}).build(tok, 0)
    assert [s.prompt for s in samples[:2]] == [s.prompt for s in alone]  # the same prompts as the task alone
    with pytest.raises(ValidationError, match=r"tasks.x.context_lengths: .*>= 64.*tasks.y: unknown task 'nope'"):
        build_task("suite", {"tasks": {"x": {"task": "passkey", "context_lengths": [8]}, "y": {"task": "nope"}}})
    with pytest.raises(ValidationError, match="cannot contain a suite"):
        build_task("suite", {"tasks": {"s": {"task": "suite", "tasks": {}}}})


def test_metrics_break_down_by_suite_entry():
    from paretoray.actors.metrics import aggregate

    rows = [{"group": "a", "accuracy": 1.0, "dense_accuracy": 1.0}, {"group": "b", "accuracy": 0.0, "dense_accuracy": 1.0},
            {"group": "b", "accuracy": 1.0, "dense_accuracy": 0.0}]
    out = aggregate(rows)
    assert out["accuracy/a"] == 1.0 and out["accuracy/b"] == 0.5 and out["dense_accuracy/b"] == 0.5


def test_a_suite_entry_budget_is_reserved_when_its_rows_are_fitted(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"context": "word " * 2000, "question": "Which word?", "answer": "word"}) + "\n")
    suite = build_task("suite", {"tasks": {"d": {"task": "dataset", "path": str(data), "truncate": "middle",
                                                 "max_new_tokens": 256}}})
    (sample,) = cached_samples(suite, tok, seed=0, window=1024)
    assert sample.max_new_tokens == 256 and len(sample.prompt_ids) + 256 <= 1024


def test_suite_errors_name_the_entry(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path))
    suite = build_task("suite", {"tasks": {"pk": {"task": "passkey", "context_lengths": [512]}}})
    with pytest.raises(TaskInputError) as err:
        cached_samples(suite, tok, seed=0, window=300)
    assert err.value.field == "tasks.pk.context_lengths" and "passkey/ctx512" in str(err.value)


def test_your_own_haystack_file_keys_the_cached_samples(tok, tmp_path, monkeypatch):
    from paretoray.actors.tasks.cache import samples_key

    text = tmp_path / "hay.txt"
    text.write_text("The river bends twice before the old mill. " * 50)
    task = build_task("niah", {"context_lengths": [256], "samples_per_length": 1, "haystack": {"path": str(text)}})
    before = samples_key(task, tok, 0, None, None)
    text.write_text("A different story about a lighthouse keeper. " * 50)
    assert samples_key(task, tok, 0, None, None) != before


def test_repeated_lengths_or_depths_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lengths repeat"):
        build_task("passkey", {"context_lengths": [1024, 1024]})
    with pytest.raises(ValidationError, match="depths repeat"):
        build_task("passkey", {"context_lengths": [1024], "depths": [0.5, 0.5]})
