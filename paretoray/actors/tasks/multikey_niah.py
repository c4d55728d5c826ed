"""Multi-key needle in a haystack (RULER, Hsieh et al. 2024), on the passkey's noise filler.

`num_keys` word → 7-digit number needles; the first is asked for, the others distract. Scored by
exact match of the first run of digits in the output. (`niah` has RULER's full family.)
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from paretoray.actors.tasks.base import LengthsConfig, Sample, Task, register_task
from paretoray.actors.tasks.haystack import Layout, build_fitted
from paretoray.actors.tasks.passkey import first_number_matches

INTRO = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards.\n"
)
NEEDLE = "One of the special magic numbers for {word} is: {number}. "
QUESTION = (
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


class MultikeyConfig(LengthsConfig):
    num_keys: int = Field(4, ge=1, le=64, description="needles in the haystack; the first is asked for")


@register_task
class MultikeyNiah(Task):
    name = "multikey_niah"
    summary = "RULER multi-key NIAH on the noise filler; exact match of the asked number"
    Config = MultikeyConfig
    has_lengths = True

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        num_keys = self.config.num_keys

        def layout(rng: random.Random, depth: float) -> Layout:
            words = rng.sample(WORDS, num_keys)
            numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), num_keys)]
            # The first key is the queried one; distractors land anywhere in the haystack.
            positions = [depth] + [rng.random() for _ in range(num_keys - 1)]
            needles = [(p, NEEDLE.format(word=w, number=n)) for p, w, n in zip(positions, words, numbers)]
            return Layout(INTRO, needles, QUESTION.format(word=words[0]), numbers[0])

        return build_fitted(self.name, tokenizer, self.config, seed, layout)

    def score(self, sample: Sample, output: str, reference: str | None = None) -> dict[str, float]:
        return {"accuracy": first_number_matches(sample.answer, output)}
