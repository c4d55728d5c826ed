"""Seeded long-context retrieval workloads with exact-match scoring.

Two synthetic needle-in-a-haystack tasks, rendered as raw completion prompts:

* ``passkey``: the pass-key retrieval prompt of Mohtashami & Jaggi 2023,
  "Landmark Attention: Random-Access Infinite Context Length for Transformers",
  in the form also used by LM-Infinite (Han et al. 2023).
* ``multikey_niah``: the multi-key needle-in-a-haystack task of RULER
  (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
  Language Models?"), with the passkey filler as haystack.

Every prompt is fitted to a token budget with the caller's tokenizer, so one
sample set measures the same context length the model actually sees.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from paretoray.actors.prompts import DECODING_TASKS, as_chat, make_prompts

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards.\n"
)
NIAH_NEEDLE = "One of the special magic numbers for {word} is: {number}. "
NIAH_QUESTION = (
    "\nWhat is the special magic number for {word} mentioned in the provided text? "
    "The special magic number for {word} mentioned in the provided text is"
)

WORDS: tuple[str, ...] = (
    "apple", "river", "mountain", "candle", "window", "garden", "silver", "forest",
    "ocean", "pencil", "rabbit", "thunder", "violet", "bridge", "castle", "desert",
    "engine", "feather", "glacier", "harbor", "island", "jacket", "kettle", "ladder",
    "meadow", "needle", "orange", "pepper", "quartz", "rocket", "saddle", "tunnel",
    "umbrella", "valley", "wagon", "yellow", "zebra", "anchor", "basket", "cactus",
    "dolphin", "empty", "falcon", "gentle", "hollow", "iron", "jungle", "kingdom",
    "lemon", "marble", "narrow", "olive", "puzzle", "quiet", "ribbon", "shadow",
    "timber", "urban", "velvet", "walnut", "young", "zipper", "amber", "bright",
    "copper", "dusty", "eager", "fancy", "golden", "happy", "icy", "jolly",
    "lively", "mighty", "noble", "proud", "rapid", "sunny", "tiny", "vivid",
    "wild", "brave", "calm", "clever", "crimson", "distant", "frozen", "green",
    "humble", "lucky", "modern", "purple", "rustic", "scarlet", "silent", "smooth",
    "swift", "tender", "warm", "wooden",
)


@dataclass(frozen=True)
class Sample:
    sample_id: str
    task: str
    prompt: str
    prompt_ids: list[int]  # context tokens followed by `question_ids`
    answer: str
    context_length: int
    depth: float
    question_ids: list[int] = ()  # the question, tokenized on its own: the last tokens of prompt_ids

    @property
    def context_ids(self) -> list[int]:
        """The prompt without its question: what a context-only placement compresses."""
        return self.prompt_ids[: len(self.prompt_ids) - len(self.question_ids)]


@dataclass(frozen=True)
class _Layout:
    """A prompt before the haystack size is known: needles sit at haystack fractions."""

    intro: str
    needles: list[tuple[float, str]]
    question: str
    answer: str

    def render(self, n_reps: int, with_question: bool = True) -> str:
        slots: list[list[str]] = [[] for _ in range(n_reps + 1)]
        for fraction, text in self.needles:
            slots[round(fraction * n_reps)].append(text)
        parts = [self.intro]
        for i, slot in enumerate(slots):
            parts.extend(slot)
            if i < n_reps:
                parts.append(FILLER)
        if with_question:
            parts.append(self.question)
        return "".join(parts)


def _passkey(rng: random.Random, depth: float, num_keys: int) -> _Layout:
    key = str(rng.randint(10000, 99999))
    return _Layout(PASSKEY_INTRO, [(depth, PASSKEY_NEEDLE.format(key=key))], PASSKEY_QUESTION, key)


def _multikey_niah(rng: random.Random, depth: float, num_keys: int) -> _Layout:
    if not 1 <= num_keys <= len(WORDS):
        raise ValueError(f"num_keys must be in [1, {len(WORDS)}], got {num_keys}")
    words = rng.sample(WORDS, num_keys)
    numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), num_keys)]
    # The first key is the queried one; distractors land anywhere in the haystack.
    positions = [depth] + [rng.random() for _ in range(num_keys - 1)]
    needles = [(p, NIAH_NEEDLE.format(word=w, number=n)) for p, w, n in zip(positions, words, numbers)]
    return _Layout(NIAH_INTRO, needles, NIAH_QUESTION.format(word=words[0]), numbers[0])


TASKS: dict[str, Callable[[random.Random, float, int], _Layout]] = {
    "passkey": _passkey,
    "multikey_niah": _multikey_niah,
}


def _fit_repetitions(n_tokens: Callable[[int], int], budget: int, block_tokens: int, base_tokens: int) -> int:
    """Largest n with n_tokens(n) <= budget, assuming n_tokens is increasing and n_tokens(0) fits."""
    lo, hi = 0, None  # n_tokens(lo) fits, n_tokens(hi) does not
    guess = (budget - base_tokens) // block_tokens
    while hi is None or hi - lo > 1:
        if lo < guess and (hi is None or guess < hi):
            n = guess
        else:
            n = lo + 1 if hi is None else (lo + hi) // 2
        used = n_tokens(n)
        if used <= budget:
            lo = n
        else:
            hi = n
        # Each block costs almost exactly block_tokens (only the joins can merge
        # differently), so extrapolating lands within a step or two of the answer.
        guess = n + (budget - used) // block_tokens
        if used <= budget and guess == n:
            guess = n + 1
    return lo


def build_decoding_samples(task: str, tokenizer: Any, count: int, seed: int) -> list[Sample]:
    """Chat prompts from a shipped template set (instructions, arithmetic, code) with no fixed answer:
    they are scored by equality with the target's own greedy output (`answer` is empty)."""
    samples = []
    for index, prompt in enumerate(make_prompts(task, count, seed)):
        text = as_chat(tokenizer, prompt)
        # A chat template already spells out its special tokens.
        ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
        samples.append(Sample(f"{task}/s{index}", task, text, ids, "", len(ids), 0.0))
    return samples


def build_samples(
    task: str,
    tokenizer: Any,
    context_lengths: list[int],
    samples_per_length: int,
    depths: list[float] | None,
    seed: int,
    num_keys: int = 4,
) -> list[Sample]:
    """Build prompts whose token count is within one filler block (+8) below each length.

    Decoding tasks (the prompt sets) ignore lengths and depths: `samples_per_length` prompts.
    """
    if task in DECODING_TASKS:
        return build_decoding_samples(task, tokenizer, samples_per_length, seed)
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; available tasks: {', '.join(sorted(TASKS))}")
    if samples_per_length < 1:
        raise ValueError(f"samples_per_length must be >= 1, got {samples_per_length}")
    if depths is None:
        cells = [((i + 0.5) / samples_per_length, i) for i in range(samples_per_length)]
    else:
        if any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths must lie in [0, 1], got {depths}")
        cells = [(d, j) for d in depths for j in range(samples_per_length)]

    def encode(text: str, special: bool = True) -> list[int]:
        return tokenizer(text, add_special_tokens=special).input_ids

    # Marginal cost of one block in steady state, ignoring the edges of the run.
    block_tokens = max(1, len(encode(FILLER * 4, False)) - len(encode(FILLER * 3, False)))

    samples = []
    for length in context_lengths:
        for depth, index in cells:
            sample_id = f"{task}/ctx{length}/d{depth:g}/s{index}"
            # String seeds are hashed with SHA-512, so they are stable across processes.
            layout = TASKS[task](random.Random(f"{seed}/{sample_id}"), depth, num_keys)
            # Context and question are tokenized apart, so a context-only placement (compress the
            # context, then ask) and a query-aware one see exactly the same tokens.
            question_ids = encode(layout.question, False)
            cache: dict[int, list[int]] = {}

            def n_tokens(n: int) -> int:
                if n not in cache:
                    cache[n] = encode(layout.render(n, with_question=False)) + question_ids
                return len(cache[n])

            base_tokens = n_tokens(0)
            if base_tokens > length:
                raise ValueError(
                    f"context_length {length} is too small for task {task!r}: "
                    f"intro, needles and question alone take {base_tokens} tokens"
                )
            n_reps = _fit_repetitions(n_tokens, length, block_tokens, base_tokens)
            samples.append(
                Sample(
                    sample_id=sample_id,
                    task=task,
                    prompt=layout.render(n_reps),
                    prompt_ids=cache[n_reps],
                    answer=layout.answer,
                    context_length=length,
                    depth=depth,
                    question_ids=question_ids,
                )
            )
    return samples


def score_exact_match(answer: str, generated_text: str) -> float:
    """1.0 if the first run of digits in the generation is exactly the answer."""
    match = re.search(r"\d+", generated_text)
    return float(match is not None and match.group() == answer)
