"""RULER's needle-in-a-haystack family (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?"; NVIDIA/RULER `scripts/data/synthetic/niah.py`).

Needles "One of the special magic {numbers} for {key} is: {value}." hide in a haystack; the prompt
asks for every value of one or more keys and ends with RULER's answer prefix, so the model goes on
with the values. Scored as RULER scores it (`string_match_all`): the fraction of the expected values
found in the output, case-insensitive.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator

from paretoray.actors.tasks.base import Sample, register_task
from paretoray.actors.tasks.haystack import (
    FILLER,
    HaystackConfig,
    HaystackFiles,
    RecallTask,
    essay_words,
    fit_text,
    haystack_units,
    interleave,
)

# RULER's template (scripts/data/synthetic/constants.py), cut where the context goes, and its needle.
INTRO = (
    "Some special magic {type_needle_v} are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n"
)
QUESTION = "\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

NeedleType = Literal["words", "numbers", "uuids"]


def singular(template: str) -> str:
    """RULER's rewording of its template when a single value is asked for ("Some ... are" -> "A ... is")."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def draw(kind: str, rng: random.Random) -> str:
    """A key or value of one of RULER's kinds: a 7-digit number, a two-word compound, or a UUID."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        words = essay_words()
        return f"{rng.choice(words)}-{rng.choice(words)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def draw_distinct(kind: str, rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """`count` fresh draws, none already in `taken` (which they join)."""
    found: list[str] = []
    while len(found) < count:
        item = draw(kind, rng)
        if item not in taken:
            taken.add(item)
            found.append(item)
    return found


def spoken_list(items: list[str]) -> str:
    """RULER's join of several queried keys: "a, b, and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


class NiahConfig(HaystackConfig):
    num_needle_k: int = Field(1, ge=1, le=100, description="keys hidden (RULER raises it to num_needle_q if lower)")
    num_needle_v: int = Field(1, ge=1, le=16, description="values hidden for each key, one needle each")
    num_needle_q: int = Field(1, ge=1, le=16, description="keys asked for in one question")
    type_needle_k: NeedleType = Field(
        "words", description="keys: words (two-word compounds) | numbers (7 digits) | uuids"
    )
    type_needle_v: NeedleType = Field("numbers", description="values: numbers (7 digits) | words | uuids")
    haystack: str | HaystackFiles = Field(
        "noise",
        description="noise (RULER's repeated sentences) | essay (prose shipped with Python) | "
        "needle (RULER's distractor needles) | {path: FILE}",
    )

    @field_validator("haystack", mode="before")
    @classmethod
    def _known_haystack(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("noise", "essay", "needle"):
            raise ValueError(f"expected noise, essay, needle or {{path: FILE}}, got {value!r}")
        return value


@register_task
class Niah(RecallTask):
    """RULER's NIAH family; its knobs are RULER's own (`scripts/synthetic.yaml`).

    * `num_needle_k` keys are hidden, each with `num_needle_v` values (one needle per value);
      `num_needle_q` distinct keys are asked for at once (the key count is raised to `num_needle_q`
      if lower, as RULER does). The expected answer is every value of every asked key.
    * `type_needle_k` / `type_needle_v`: `words` (two words of the essay vocabulary joined by "-",
      RULER's adjective-noun pairs), `numbers` (7 digits) or `uuids`.
    * `haystack`: `noise` (RULER's sentence block, one per line), `essay` (prose sentences), `needle`
      (every haystack line is a distractor needle with a fresh key and value, RULER's
      niah_multikey_2/3) or `{path: FILE}`.
    * When one value is asked for, the prompt is in the singular ("A special magic number ..."), as
      RULER rewords it.

    RULER's eight NIAH tasks, as settings here: niah_single_1 = defaults; niah_single_2 =
    `haystack: essay`; niah_single_3 = essay with `type_needle_v: uuids`; niah_multikey_1 = essay with
    `num_needle_k: 4`; niah_multikey_2 = `haystack: needle`; niah_multikey_3 = needle with
    `type_needle_k: uuids, type_needle_v: uuids`; niah_multivalue = essay with `num_needle_v: 4`;
    niah_multiquery = essay with `num_needle_q: 4`.

    Placement: the first expected needle sits at the sample's depth (`depths`, or spread evenly over
    the samples); every other needle, asked for or not, at a uniformly random place (RULER places all
    needles at random).
    """

    name = "niah"
    summary = "RULER needle-in-a-haystack (single, multi-key, multi-value, multi-query); recall of the values"
    Config = NiahConfig
    default_max_new_tokens = 128
    has_lengths = True

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        cfg: NiahConfig = self.config  # type: ignore[assignment]
        num_keys = max(cfg.num_needle_k, cfg.num_needle_q)
        plural = cfg.num_needle_q * cfg.num_needle_v > 1
        kind_v = cfg.type_needle_v if plural else cfg.type_needle_v[:-1]
        intro = INTRO if plural else singular(INTRO)
        ask = QUESTION + ANSWER_PREFIX if plural else singular(QUESTION + ANSWER_PREFIX)
        line_haystack = cfg.haystack in ("noise", "needle")
        joiner = "\n" if line_haystack else " "
        essay_unit = None if line_haystack else haystack_units(cfg.haystack)

        samples = []
        for length in cfg.context_lengths:
            last = None  # the previous sample's fit at this length: where the next one's search starts
            for depth, index in cfg.cells():
                sample_id = f"{self.name}/ctx{length}/d{depth:g}/s{index}"
                rng = random.Random(f"{seed}/{sample_id}")
                taken_keys: set[str] = set()
                keys = draw_distinct(cfg.type_needle_k, rng, num_keys, taken_keys)
                taken_values: set[str] = set()
                values = [draw_distinct(cfg.type_needle_v, rng, cfg.num_needle_v, taken_values) for _ in keys]
                asked = rng.sample(range(num_keys), cfg.num_needle_q)
                answers = [v for i in asked for v in values[i]]
                first = (asked[0], values[asked[0]][0])
                needles = []
                for i, key in enumerate(keys):
                    for value in values[i]:
                        where = depth if (i, value) == first else rng.random()
                        needles.append((where, NEEDLE.format(type_needle_v=cfg.type_needle_v, key=key, value=value)))

                unit: Callable[[int], str]
                if cfg.haystack == "noise":
                    unit = lambda i: FILLER.strip()  # noqa: E731
                elif cfg.haystack == "needle":
                    unit = _distractors(random.Random(f"{seed}/{sample_id}/haystack"), cfg, taken_keys)
                else:
                    unit = lambda i, units=essay_unit: units(i).strip()  # type: ignore[misc]  # noqa: E731

                def render(n: int, needles: list = needles, unit: Callable[[int], str] = unit) -> str:
                    return intro.format(type_needle_v=kind_v) + joiner.join(interleave(n, needles, unit))

                question = ask.format(type_needle_v=kind_v, query=spoken_list([keys[i] for i in asked]))
                n, prompt_ids, question_ids = fit_text(self.name, tokenizer, length, render, question, start=last)
                last = n
                samples.append(self.sample(sample_id, length, render(n) + question, prompt_ids, question_ids, answers, depth=depth))
        return samples



def _distractors(rng: random.Random, cfg: NiahConfig, keys: set[str]) -> Callable[[int], str]:
    """Haystack line i of the `needle` haystack: a needle with a fresh key (never an asked-about one)."""
    lines: list[str] = []

    def unit(i: int) -> str:
        while len(lines) <= i:
            key = draw(cfg.type_needle_k, rng)
            if key in keys:
                continue
            lines.append(NEEDLE.format(type_needle_v=cfg.type_needle_v, key=key, value=draw(cfg.type_needle_v, rng)))
        return lines[i]

    return unit
