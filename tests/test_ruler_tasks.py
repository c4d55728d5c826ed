"""RULER's synthetic families: niah, variable_tracking, common_words, frequent_words.

Prompts are fitted to each length with the tiny tokenizer (about one token per character, so the
lengths here are larger than a real tokenizer would need), are seeded, hold their answers the
intended number of times, and score as RULER's string_match_all.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from pydantic import ValidationError

from paretoray.actors.metrics import METRICS
from paretoray.actors.tasks import TaskInputError, build_task, task_class
from paretoray.actors.tasks import common_words as cw
from paretoray.actors.tasks import frequent_words as fw
from paretoray.actors.tasks import variable_tracking as vt
from paretoray.actors.tasks.haystack import FILLER
from tests.tiny import make_tiny_tokenizer

# Per task: settings that fit the tiny tokenizer, and how far below each length a prompt may end
# (about one haystack unit: a noise line, an uncommon word's entries, a few coded words).
CASES = {
    "niah": ({"context_lengths": [256, 500, 1024]}, 48),
    "variable_tracking": ({"context_lengths": [500, 1024], "fewshot_tokens": 0}, 48),
    "common_words": ({"context_lengths": [1500, 2048]}, 48),
    "frequent_words": ({"context_lengths": [500, 1024]}, 48),
}
BUDGETS = {"niah": 128, "variable_tracking": 30, "common_words": 120, "frequent_words": 50}


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def build(tok, name: str, seed: int = 0, **settings):
    return build_task(name, settings).build(tok, seed)


def split(tok, sample) -> tuple[str, str]:
    """(context, question) texts of a sample; the question is what question_ids decode to."""
    question = tok.decode(list(sample.question_ids))
    assert sample.prompt.endswith(question)
    return sample.prompt[: len(sample.prompt) - len(question)], question


# -- shared behaviour ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_prompts_fit_each_length(tok, name):
    settings, slack = CASES[name]
    samples = build(tok, name, **settings)
    lengths = settings["context_lengths"]
    assert [s.context_length for s in samples] == [n for n in lengths for _ in range(2)]
    for s in samples:
        assert s.context_length - slack <= len(s.prompt_ids) <= s.context_length, (s.sample_id, len(s.prompt_ids))
        context, question = split(tok, s)
        # Context and question are tokenized apart, the context with special tokens.
        assert s.prompt_ids == tok(context).input_ids + tok(question, add_special_tokens=False).input_ids
        assert s.context_ids == tok(context).input_ids
        assert s.answers and s.expected == s.answers


@pytest.mark.parametrize("name", list(CASES))
def test_seeded_and_deterministic(tok, name):
    settings, _ = CASES[name]
    settings = {**settings, "context_lengths": settings["context_lengths"][:1]}
    first = build(tok, name, seed=3, **settings)
    random.seed(12345)  # the global random state plays no part
    again = build(tok, name, seed=3, **settings)
    other = build(tok, name, seed=4, **settings)
    assert [s.to_json() for s in first] == [s.to_json() for s in again]
    assert all(a.prompt != b.prompt and a.answers != b.answers for a, b in zip(first, other))
    # Two samples of one length differ too.
    assert first[0].prompt != first[1].prompt


@pytest.mark.parametrize("name", list(CASES))
def test_declarations_and_metrics(tok, name):
    cls = task_class(name)
    assert cls.has_lengths and cls.default_max_new_tokens == BUDGETS[name]
    assert cls.summary and "\n" not in cls.summary
    settings, _ = CASES[name]
    task = build_task(name, {**settings, "context_lengths": settings["context_lengths"][:1], "samples_per_length": 1})
    sample = task.build(tok, 0)[0]
    for output in (" ".join(sample.answers), "", sample.answers[0]):
        scores = task.score(sample, output)
        assert "accuracy" in scores and set(scores) <= set(METRICS)
        assert 0.0 <= scores["accuracy"] <= 1.0


@pytest.mark.parametrize("name", list(CASES))
def test_too_short_a_length_is_an_input_error(tok, name):
    with pytest.raises(TaskInputError) as error:
        build(tok, name, context_lengths=[64], samples_per_length=1)
    assert error.value.field == "context_lengths" and "64" in str(error.value)


@pytest.mark.parametrize(
    "name, settings",
    [
        ("niah", {"type_needle_k": "letters"}),
        ("niah", {"type_needle_v": "number"}),
        ("niah", {"num_needle_k": 0}),
        ("niah", {"num_needle_v": 17}),
        ("niah", {"num_needle_q": 0}),
        ("niah", {"haystack": "poem"}),
        ("niah", {"variant": "single"}),
        ("niah", {"num_needle_k": "4"}),
        ("variable_tracking", {"num_chains": 0}),
        ("variable_tracking", {"num_hops": 0}),
        ("variable_tracking", {"fewshot_tokens": -1}),
        ("variable_tracking", {"depths": [0.5]}),
        ("common_words", {"freq_cw": 3, "freq_ucw": 3}),
        ("common_words", {"freq_cw": 2}),  # RULER's long-context freq_ucw (3) would beat it
        ("common_words", {"num_cw": 0}),
        ("common_words", {"num_fewshot": -1}),
        ("common_words", {"depths": [0.5]}),
        ("frequent_words", {"alpha": 1.0}),
        ("frequent_words", {"coded_wordlen": 2}),
        ("frequent_words", {"vocab_size": 4}),
        ("frequent_words", {"depths": [0.5]}),
    ],
)
def test_bad_settings_are_rejected(name, settings):
    with pytest.raises(ValidationError):
        build_task(name, {"context_lengths": [1024], **settings})


# -- niah ----------------------------------------------------------------------------------------


def test_niah_single_needle_and_singular_wording(tok):
    for s in build(tok, "niah", context_lengths=[1024], depths=[0.0, 0.5, 1.0], samples_per_length=1):
        context, question = split(tok, s)
        (value,) = s.answers
        assert re.fullmatch(r"\d{7}", value) and context.count(value) == 1
        key = re.search(r"for (\S+) mentioned", question).group(1)
        assert re.fullmatch(r"[a-z]+-[a-z]+", key)
        assert (context + "\n").count(f"\nOne of the special magic numbers for {key} is: {value}.\n") == 1
        assert context.startswith("A special magic number is hidden within the following text.")
        assert question == (
            f"\nWhat is the special magic number for {key} mentioned in the provided text?"
            f" The special magic number for {key} mentioned in the provided text is"
        )
        # The noise haystack is RULER's sentence block, one per line; the needle sits at the depth.
        assert FILLER.strip() + "\n" in context
        start = context.index("\n") + 1  # after the intro
        assert abs((context.index(value) - start) / (len(context) - start) - s.depth) < 0.1


def test_niah_multikey_multivalue_multiquery(tok):
    samples = build(tok, "niah", context_lengths=[1024], num_needle_k=4, num_needle_v=2, num_needle_q=2, samples_per_length=2)
    for s in samples:
        context, question = split(tok, s)
        assert len(s.answers) == 4 and len(set(s.answers)) == 4
        assert context.startswith("Some special magic numbers are hidden")
        keys = re.search(r"for (\S+), and (\S+) mentioned", question).groups()
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", context)
        assert len(needles) == 8 and len({k for k, _ in needles}) == 4
        # Every value of both asked keys is expected, and each appears once.
        assert sorted(s.answers) == sorted(v for k, v in needles if k in keys)
        assert all(context.count(v) == 1 for v in s.answers)
        assert question.startswith(f"\nWhat are all the special magic numbers for {keys[0]}, and {keys[1]} mentioned")
        assert question.endswith("mentioned in the provided text are")
    # RULER raises the key count to the number of keys asked for.
    (s,) = build(tok, "niah", context_lengths=[1024], num_needle_q=3, samples_per_length=1)
    assert len(re.findall(r"One of the special magic numbers", s.prompt)) == 3 and len(s.answers) == 3


def test_niah_needle_haystack_and_uuids(tok):
    samples = build(
        tok, "niah", context_lengths=[1024], haystack="needle", type_needle_k="uuids", type_needle_v="uuids", samples_per_length=1
    )
    context, question = split(tok, samples[0])
    lines = context.split("\n")[1:]
    assert len(lines) > 5 and all(re.fullmatch(r"One of the special magic uuids for [0-9a-f-]{36} is: [0-9a-f-]{36}\.", x) for x in lines)
    key = re.search(r"for (\S+) mentioned", question).group(1)
    assert context.count(key) == 1  # distractors never reuse the asked key
    assert context.count(samples[0].answer) == 1 and question.startswith("\nWhat is the special magic uuid for")


def test_niah_essay_and_file_haystacks(tok, tmp_path):
    essay = build(tok, "niah", context_lengths=[1024], haystack="essay", num_needle_k=4, samples_per_length=1)[0]
    assert 1024 - 200 <= len(essay.prompt_ids) <= 1024 and FILLER not in essay.prompt
    assert len(re.findall(r"One of the special magic numbers for \S+ is: \d{7}\.[ \n]", essay.prompt)) == 4
    text = tmp_path / "haystack.txt"
    text.write_text("The owl flew over the quiet barn at night. Rain fell on the old stone bridge. " * 3, encoding="utf-8")
    (s,) = build(tok, "niah", context_lengths=[500], haystack={"path": str(text)}, samples_per_length=1)
    assert 500 - 64 <= len(s.prompt_ids) <= 500
    assert "barn at night. Rain fell" in s.prompt and s.prompt.count(s.answer) == 1
    with pytest.raises(TaskInputError) as error:
        build(tok, "niah", context_lengths=[500], haystack={"path": str(tmp_path / "missing.txt")})
    assert error.value.field == "haystack.path"


def test_niah_scores_recall_of_all_values(tok):
    task = build_task("niah", {"context_lengths": [1024], "num_needle_v": 4, "samples_per_length": 1})
    s = task.build(tok, 0)[0]
    values = list(s.answers)
    assert task.score(s, " " + ", ".join(values) + ".") == {"accuracy": 1.0}
    assert task.score(s, f" {values[2]} and {values[0]}") == {"accuracy": 0.5}
    assert task.score(s, " 1234567") == {"accuracy": 0.0}
    words = build_task("niah", {"context_lengths": [1024], "type_needle_v": "words", "samples_per_length": 1})
    w = words.build(tok, 0)[0]
    assert re.fullmatch(r"[a-z]+-[a-z]+", w.answer)
    assert words.score(w, f"It is {w.answer.upper()}.") == {"accuracy": 1.0}  # case-insensitive


# -- variable_tracking ---------------------------------------------------------------------------


def chain_of(context: str, names: tuple[str, ...], value: str) -> list[int]:
    """Where each statement of a chain sits in the context (asserting it is there, once)."""
    statements = [f"VAR {names[0]} = {value}\n"] + [f"VAR {b} = VAR {a} \n" for a, b in zip(names, names[1:])]
    assert all(context.count(x) == 1 for x in statements), statements
    return [context.index(x) for x in statements]


def test_variable_tracking_chains(tok):
    for s in build(tok, "variable_tracking", context_lengths=[1024], num_chains=2, num_hops=3, fewshot_tokens=0):
        context, question = split(tok, s)
        value = re.search(r"assigned the value (\d{5}) in the text above", question).group(1)
        assert len(s.answers) == 4 and all(re.fullmatch(r"[A-Z]{5}", n) for n in s.answers)
        places = chain_of(context + "\n", s.answers, value)
        assert places == sorted(places)  # the chain reads in order
        assert len(re.findall(r"^VAR [A-Z]{5} = \d{5}$", context, re.M)) == 2  # a second chain distracts
        assert len(set(re.findall(r"VAR ([A-Z]{5}) =", context))) == 8
        assert question.endswith(f"4 variables are assigned the value {value}, they are: ")
        assert context.startswith(vt.INTRO) and FILLER.strip() + "\n" in context


def test_variable_tracking_worked_example(tok):
    samples = build(tok, "variable_tracking", context_lengths=[1024, 1500])
    for s in samples:
        assert s.context_length - 48 <= len(s.prompt_ids) <= s.context_length
        context, question = split(tok, s)
        assert context.count(vt.INTRO) == 2
        example, task = context.split("\n\n" + vt.INTRO)
        assert example.startswith(vt.INTRO)
        shot = re.search(r"they are:  ((?:[A-Z]{3} ?){5})$", example).group(1).split()
        shot_value = re.search(r"assigned the value (\d{5}) in the text above", example).group(1)
        chain_of(example + "\n", tuple(shot), shot_value)
        value = re.search(r"the value (\d{5}) in", question).group(1)
        assert value != shot_value
        chain_of(task + "\n", s.answers, value)
    # The example is laid out once; every sample gives it fresh names and a fresh number.
    examples = [s.prompt.split("\n\n" + vt.INTRO)[0] for s in samples]
    assert len(set(examples)) == len(samples)
    assert len({re.sub(r"\d{5}", "N", re.sub(r"[A-Z]{3}", "X", e)) for e in examples}) == 1
    with pytest.raises(TaskInputError) as error:
        build(tok, "variable_tracking", context_lengths=[500])
    assert error.value.field == "context_lengths" and "fewshot_tokens" in str(error.value)
    with pytest.raises(TaskInputError) as error:
        build(tok, "variable_tracking", context_lengths=[1024], fewshot_tokens=100)
    assert error.value.field == "fewshot_tokens"


def test_variable_tracking_essay_and_scoring(tok, tmp_path):
    text = tmp_path / "story.md"
    text.write_text("The owl flew over the quiet barn at night. Rain fell on the old stone bridge.\n", encoding="utf-8")
    for haystack in ("essay", {"path": str(text)}):
        task = build_task("variable_tracking", {"context_lengths": [1024], "fewshot_tokens": 0, "haystack": haystack})
        s = task.build(tok, 0)[0]
        assert 1024 - 200 <= len(s.prompt_ids) <= 1024
        assert f"VAR {s.answers[1]} = VAR {s.answers[0]}." in s.prompt and " \n" not in s.prompt
    assert "barn at night. Rain fell" in s.prompt
    names = list(s.answers)
    assert task.score(s, " " + " ".join(names)) == {"accuracy": 1.0}
    assert task.score(s, " " + " ".join(names[:3]).lower()) == pytest.approx({"accuracy": 0.6})
    assert task.score(s, " ABCDE") == {"accuracy": 0.0}


# -- common_words --------------------------------------------------------------------------------


def counts_of(listing: str) -> Counter:
    items = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))  # numbered 1, 2, 3...
    return Counter(word for _, word in items)


def test_common_words_counts(tok):
    for s in build(tok, "common_words", context_lengths=[1500]):
        context, question = split(tok, s)
        assert question == (
            "\nQuestion: What are the 10 most common words in the above list?"
            " Answer: The top 10 words that appear most often in the list are:"
        )
        example, listing = context.split("\n" + cw.INTRO)
        # RULER below 4096 tokens: common words 6 times, the others once.
        counts = counts_of(listing)
        assert {w: counts[w] for w in s.answers} == {w: 6 for w in s.answers}
        assert set(counts.values()) == {6, 1} and len(counts) > 10
        # The worked example first: 20 words, 10 of them 3 times, then the question and its answer.
        assert example.startswith(cw.INTRO)
        shot_list, shot_answer = example[len(cw.INTRO) :].split(question + " ")
        shot = counts_of(shot_list)
        assert sorted(shot.values()) == [1] * 10 + [3] * 10
        assert counts_of(shot_answer) == Counter({w: 1 for w, c in shot.items() if c == 3})
        assert not set(shot) & set(counts)  # the example's words are not the task's


def test_common_words_long_regime_and_settings(tok):
    (s,) = build(tok, "common_words", context_lengths=[4096], num_cw=2, num_fewshot=0, samples_per_length=1)
    assert 4096 - 48 <= len(s.prompt_ids) <= 4096 and s.prompt.startswith(cw.INTRO)
    counts = counts_of(split(tok, s)[0])
    assert {counts[w] for w in s.answers} == {30} and set(counts.values()) == {30, 3}  # RULER's cwe from 4096 tokens
    assert "What are the 2 most common words" in s.prompt
    (s,) = build(tok, "common_words", context_lengths=[1024], freq_cw=4, freq_ucw=2, num_cw=3, num_fewshot=0, samples_per_length=1)
    counts = counts_of(split(tok, s)[0])
    assert {counts[w] for w in s.answers} == {4} and set(counts.values()) == {4, 2}


def test_common_words_scoring(tok):
    task = build_task("common_words", {"context_lengths": [1500], "samples_per_length": 1})
    s = task.build(tok, 0)[0]
    words = list(s.answers)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    assert task.score(s, " " + listing) == {"accuracy": 1.0}
    assert task.score(s, " " + listing.upper()) == {"accuracy": 1.0}
    assert task.score(s, " " + ", ".join(words[:5])) == pytest.approx({"accuracy": 0.5})
    assert task.score(s, " 1. zzzz 2. qqqq") == {"accuracy": 0.0}


# -- frequent_words ------------------------------------------------------------------------------


def test_frequent_words_zipf_stream(tok):
    for s in build(tok, "frequent_words", context_lengths=[1024]):
        context, question = split(tok, s)
        assert context.startswith(fw.INTRO) and question.endswith("the three most frequently appeared words are:")
        counts = Counter(context[len(fw.INTRO) :].split())
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..." and len(s.answers) == 3
        assert set(ranked[1:4]) == set(s.answers) and all(re.fullmatch(r"[a-z]{6}", w) for w in s.answers)
        # The answers are strictly more frequent than every other coded word.
        rest = [c for w, c in counts.items() if w not in s.answers and w != "..."]
        assert min(counts[w] for w in s.answers) > max(rest, default=0)
        # RULER's counts: rank k appears int(N * k^-2 / zeta(2)) times, for the N that fits.
        total = sum(counts.values())
        assert any(
            sorted(c for c in fw.zipf_counts(n, 1024 // 50, 2.0) if c) == sorted(counts.values()) for n in range(total, 2 * total)
        )


def test_frequent_words_settings_and_scoring(tok):
    (s,) = build(tok, "frequent_words", context_lengths=[1024], alpha=1.5, coded_wordlen=4, vocab_size=8, samples_per_length=1)
    counts = Counter(split(tok, s)[0][len(fw.INTRO) :].split())
    assert len(counts) <= 8 and all(len(w) == 4 for w in counts if w != "...")
    task = build_task("frequent_words", {"context_lengths": [500], "samples_per_length": 1})
    s = task.build(tok, 0)[0]
    a, b, c = s.answers
    assert task.score(s, f" {a}, {b.upper()} and {c}.") == {"accuracy": 1.0}
    assert task.score(s, f" {b} ....") == pytest.approx({"accuracy": 1 / 3})
    assert task.score(s, " ... ... ...") == {"accuracy": 0.0}


def test_zipf_counts_break_a_tie_below_the_answers():
    # 45 words at alpha 2: ranks 4 and 5 would both appear once (RULER's counts); the fifth drops.
    assert fw.zipf_counts(45, 6, 2.0) == [27, 6, 3, 1, 0, 0]
    assert fw.zipf_counts(1000, 6, 2.0)[:4] == [607, 151, 67, 37]
