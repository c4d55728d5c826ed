"""RULER's common words extraction (Hsieh et al. 2024; NVIDIA/RULER
`scripts/data/synthetic/common_words_extraction.py`).

A numbered list of words in which `num_cw` common words each appear `freq_cw` times and every other
word `freq_ucw` times; the question asks for the `num_cw` most common. The list is fitted to the
length by its number of uncommon words. Scored as RULER does (`string_match_all`): the fraction of
the common words found in the output, case-insensitive.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field, model_validator

from paretoray.actors.tasks.base import LengthsConfig, Sample, register_task
from paretoray.actors.tasks.haystack import RecallTask, essay_words, fit_text

# RULER's template and answer prefix (scripts/data/synthetic/constants.py; "10" there is num_cw here).
INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
QUESTION = "\nQuestion: What are the {num_cw} most common words in the above list?"
ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"

# RULER switches to lighter repetitions below 4096 tokens (max_seq_length < 4096 there).
SHORT_BELOW = 4096
SHORT = {"freq_cw": 6, "freq_ucw": 1, "example": (20, 3, 1)}  # example: (words, freq_cw, freq_ucw)
LONG = {"freq_cw": 30, "freq_ucw": 3, "example": (40, 10, 3)}

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class CommonWordsConfig(LengthsConfig):
    freq_cw: int | None = Field(
        None, ge=2, le=1000, description="times each common word appears; default RULER's: 30, or 6 below 4096 tokens"
    )
    freq_ucw: int | None = Field(
        None, ge=1, le=999, description="times each uncommon word appears; default RULER's: 3, or 1 below 4096 tokens"
    )
    num_cw: int = Field(10, ge=1, le=100, description="common words, all asked for")
    num_fewshot: int = Field(1, ge=0, le=8, description="RULER's worked examples before the task")
    places_needles = False  # nothing to place at a depth: `depths` is refused


    @model_validator(mode="after")
    def _common_beats_uncommon(self) -> CommonWordsConfig:
        for regime in (SHORT, LONG):
            cw = regime["freq_cw"] if self.freq_cw is None else self.freq_cw
            ucw = regime["freq_ucw"] if self.freq_ucw is None else self.freq_ucw
            if cw <= ucw:
                unset = " (RULER's default for the unset one)" if None in (self.freq_cw, self.freq_ucw) else ""
                raise ValueError(
                    f"common words must appear more often than the others: freq_cw {cw} <= freq_ucw {ucw}{unset}"
                )
        return self


class _Words:
    """A sample's words in drawing order: the English vocabulary shuffled, then made-up words if it runs out."""

    def __init__(self, rng: random.Random):
        self.words = list(essay_words())
        rng.shuffle(self.words)
        self.seen = set(self.words)
        self.rng = rng

    def __getitem__(self, span: slice) -> list[str]:
        while len(self.words) < span.stop:
            word = "".join(self.rng.choice(_CONSONANTS) + self.rng.choice(_VOWELS) for _ in range(3))
            if word not in self.seen:
                self.seen.add(word)
                self.words.append(word)
        return self.words[span]


def numbered(items: list[str]) -> str:
    """RULER's list format: "1. word 2. word ..."."""
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(items))


def word_list(common: list[str], uncommon: list[str], freq_cw: int, freq_ucw: int, rng: random.Random) -> str:
    items = common * freq_cw + uncommon * freq_ucw
    rng.shuffle(items)
    return numbered(items)


@register_task
class CommonWords(RecallTask):
    """RULER's common words extraction (cwe: `freq_cw: 30`, `freq_ucw: 3`, `num_cw: 10`).

    As in RULER, below 4096 tokens the list uses 6 and 1 repetitions (when `freq_cw` / `freq_ucw` are
    unset) and each worked example has 20 words (10 common ones 3 times, the rest once), from 4096
    tokens on 40 words (10 and 3 times). The examples come first, each followed by its answer, then
    the task. Words are English words of the Python documentation's prose (`essay_words`; RULER
    draws from the `wonderwords` noun, adjective and verb lists), distinct within a prompt, followed
    by made-up pronounceable words at lengths that need more than about 1,900 distinct words.
    """

    name = "common_words"
    summary = "RULER common words extraction: the num_cw (10) most repeated words of a numbered list; recall"
    Config = CommonWordsConfig
    default_max_new_tokens = 120
    has_lengths = True

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        cfg: CommonWordsConfig = self.config  # type: ignore[assignment]
        question = QUESTION.format(num_cw=cfg.num_cw) + ANSWER_PREFIX.format(num_cw=cfg.num_cw)
        samples = []
        for length in cfg.context_lengths:
            regime = SHORT if length < SHORT_BELOW else LONG
            freq_cw = regime["freq_cw"] if cfg.freq_cw is None else cfg.freq_cw
            freq_ucw = regime["freq_ucw"] if cfg.freq_ucw is None else cfg.freq_ucw
            shot_words, shot_cw, shot_ucw = regime["example"]
            num_shot_cw = min(cfg.num_cw, shot_words)
            last = None  # the previous sample's fit at this length: where the next one's search starts
            for _, index in cfg.cells():
                sample_id = f"{self.name}/ctx{length}/s{index}"
                rng = random.Random(f"{seed}/{sample_id}")
                words = _Words(random.Random(f"{seed}/{sample_id}/words"))
                shots = []
                for j in range(cfg.num_fewshot):
                    drawn = words[j * shot_words : (j + 1) * shot_words]
                    text = word_list(drawn[:num_shot_cw], drawn[num_shot_cw:], shot_cw, shot_ucw, rng)
                    shots.append(INTRO + text + question + " " + numbered(drawn[:num_shot_cw]) + "\n")
                first = cfg.num_fewshot * shot_words
                common = words[first : first + cfg.num_cw]
                start = first + cfg.num_cw
                prefix = "".join(shots) + INTRO

                def render(n: int, common=common, words=words, start=start, prefix=prefix, sample_id=sample_id) -> str:
                    order = random.Random(f"{seed}/{sample_id}/order{n}")
                    return prefix + word_list(common, words[start : start + n], freq_cw, freq_ucw, order)

                n, prompt_ids, question_ids = fit_text(self.name, tokenizer, length, render, question, start=last)
                last = n
                samples.append(self.sample(sample_id, length, render(n) + question, prompt_ids, question_ids, common))
        return samples

