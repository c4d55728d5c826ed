"""Pass-key retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", in LM-Infinite's form).

A five-digit key hides once in the repeated noise filler; the prompt asks for it. Scored by exact
match of the first run of digits in the output.
"""

from __future__ import annotations

import random
import re
from typing import Any

from paretoray.actors.tasks.base import LengthsConfig, Sample, Task, register_task
from paretoray.actors.tasks.haystack import Layout, build_fitted

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def first_number_matches(answer: str, output: str) -> float:
    """1.0 if the first run of digits in the output is exactly the answer."""
    match = re.search(r"\d+", output)
    return float(match is not None and match.group() == answer)


@register_task
class Passkey(Task):
    name = "passkey"
    summary = "one 5-digit key in repeated filler (Landmark Attention); exact match"
    Config = LengthsConfig
    has_lengths = True

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        def layout(rng: random.Random, depth: float) -> Layout:
            key = str(rng.randint(10000, 99999))
            return Layout(INTRO, [(depth, NEEDLE.format(key=key))], QUESTION, key)

        return build_fitted(self.name, tokenizer, self.config, seed, layout)

    def score(self, sample: Sample, output: str, reference: str | None = None) -> dict[str, float]:
        return {"accuracy": first_number_matches(sample.answer, output)}
