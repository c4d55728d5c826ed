"""RULER's frequent words extraction (Hsieh et al. 2024; NVIDIA/RULER
`scripts/data/synthetic/freq_words_extraction.py`).

A coded text of made-up words whose counts follow a Zipf (zeta) law: the word of rank k appears
int(N * k^-alpha / zeta(alpha)) times in N words. The top-ranked word is the noise token "..."; the
answer is the next three. Scored as RULER does (`string_match_all`): the fraction of the three
words found in the output, case-insensitive.
"""

from __future__ import annotations

import random
import string
from typing import Any

from pydantic import Field

from paretoray.actors.tasks.base import LengthsConfig, Sample, TaskInputError, register_task
from paretoray.actors.tasks.haystack import RecallTask, fit_text

# RULER's template and answer prefix (scripts/data/synthetic/constants.py), cut where the context goes.
INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
QUESTION = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

NOISE_WORD = "..."  # RULER's rank-1 word, "treated as noise"
ANSWERS = 3


class FrequentWordsConfig(LengthsConfig):
    alpha: float = Field(2.0, gt=1.0, le=10.0, description="Zipf exponent of the word counts (zeta distribution)")
    coded_wordlen: int = Field(6, ge=3, le=16, description="letters in each made-up word")
    vocab_size: int | None = Field(
        None,
        ge=ANSWERS + 2,
        le=100_000,
        description="made-up words (the noise word included); default RULER's context_length // 50, at least 5",
    )
    places_needles = False  # nothing to place at a depth: `depths` is refused



def zipf_counts(num_words: int, vocab_size: int, alpha: float) -> list[int]:
    """RULER's counts: rank k (from 1) appears int(num_words * k^-alpha / zeta(alpha)) times.

    Unlike RULER, a tie between the last answer and the words ranked below it (possible when the
    text is short) is broken by lowering theirs, so the question keeps a single answer.
    """
    from scipy.special import zeta

    total = float(zeta(alpha))
    counts = [int(num_words * k**-alpha / total) for k in range(1, vocab_size + 1)]
    cap = counts[ANSWERS] - 1
    return counts[: ANSWERS + 1] + [max(0, min(c, cap)) for c in counts[ANSWERS + 1 :]]


@register_task
class FrequentWords(RecallTask):
    """RULER's frequent words extraction (fwe: `alpha: 2.0`).

    Each sample draws `vocab_size` distinct words of `coded_wordlen` random lowercase letters (RULER:
    context_length // 50 of them, here at least 5) and puts "..." at rank 1; the text is the words,
    each repeated its Zipf count, shuffled and joined by spaces. The number of words N is the largest
    that fits the length (RULER steps N by 1/32 of the length; this fits to the word).
    """

    name = "frequent_words"
    summary = "RULER frequent words extraction: the 3 most frequent coded words of a Zipf stream; recall"
    Config = FrequentWordsConfig
    default_max_new_tokens = 50
    has_lengths = True

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        cfg: FrequentWordsConfig = self.config  # type: ignore[assignment]
        question = QUESTION + ANSWER_PREFIX
        samples = []
        for length in cfg.context_lengths:
            vocab_size = cfg.vocab_size or max(ANSWERS + 2, length // 50)
            last = None  # the previous sample's fit at this length: where the next one's search starts
            for _, index in cfg.cells():
                sample_id = f"{self.name}/ctx{length}/s{index}"
                rng = random.Random(f"{seed}/{sample_id}")
                vocab: list[str] = []
                seen: set[str] = set()
                while len(vocab) < vocab_size - 1:
                    word = "".join(rng.choices(string.ascii_lowercase, k=cfg.coded_wordlen))
                    if word not in seen:
                        seen.add(word)
                        vocab.append(word)
                vocab = [NOISE_WORD] + vocab

                def render(n: int, vocab: list[str] = vocab, sample_id: str = sample_id) -> str:
                    words = [w for w, c in zip(vocab, zipf_counts(n, len(vocab), cfg.alpha)) for _ in range(c)]
                    random.Random(f"{seed}/{sample_id}/order{n}").shuffle(words)
                    return INTRO + " ".join(words)

                n, prompt_ids, question_ids = fit_text(
                    self.name, tokenizer, length, render, question, probe=64, start=last
                )
                last = n
                if zipf_counts(n, vocab_size, cfg.alpha)[ANSWERS] < 1:
                    raise TaskInputError(
                        "context_lengths",
                        f"context_length {length} is too small for task {self.name!r}: its {n} words are too few "
                        f"for the third answer word to appear once at alpha {cfg.alpha}",
                    )
                answers = vocab[1 : ANSWERS + 1]
                samples.append(self.sample(sample_id, length, render(n) + question, prompt_ids, question_ids, answers))
        return samples

