"""RULER's variable tracking (Hsieh et al. 2024; NVIDIA/RULER `scripts/data/synthetic/variable_tracking.py`).

Chains of assignments, `VAR ABCDE = 12345` then `VAR FGHIJ = VAR ABCDE` and so on, hide among the
haystack's lines; the question gives the first chain's number and asks for every variable that holds
it. As in RULER, a worked example of the task (one shot, with 3-letter names, fitted to
`fewshot_tokens`) comes first. Scored as RULER does (`string_match_all`): the fraction of the
chain's variable names found in the output, case-insensitive.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any

from pydantic import Field

from paretoray.actors.tasks.base import Sample, register_task
from paretoray.actors.tasks.haystack import (
    FILLER,
    HaystackConfig,
    RecallTask,
    fit_text,
    haystack_units,
    interleave,
)

# RULER's template and answer prefix (scripts/data/synthetic/constants.py), cut where the context goes.
INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = "\nQuestion: Find all variables that are assigned the value {query} in the text above."
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are: "
)


class VariableTrackingConfig(HaystackConfig):
    num_chains: int = Field(1, ge=1, le=32, description="chains of assignments; the first one is asked about")
    num_hops: int = Field(
        4, ge=1, le=64, description="assignments after the first in each chain (num_hops + 1 variables)"
    )
    fewshot_tokens: int = Field(
        500, ge=0, le=100_000, description="tokens of RULER's one-shot worked example before the task (0: none)"
    )
    places_needles = False  # nothing to place at a depth: `depths` is refused



class _Chains:
    """The chains of one prompt: names (distinct), statements, and their random places in the haystack."""

    def __init__(
        self,
        rng: random.Random,
        num_chains: int,
        num_hops: int,
        name_len: int,
        places: list[list[float]] | None = None,
        avoid: frozenset[str] = frozenset(),
    ):
        names: list[str] = []
        while len(names) < num_chains * (num_hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
            if name not in names:
                names.append(name)
        self.names = [names[i * (num_hops + 1) : (i + 1) * (num_hops + 1)] for i in range(num_chains)]
        values: list[str] = []
        while len(values) < num_chains:
            value = str(rng.randint(10000, 99999))
            if value not in values and value not in avoid:
                values.append(value)
        self.values = values
        # Each chain's statements at sorted random places, so every chain reads in order.
        self.places = places or [sorted(rng.random() for _ in range(num_hops + 1)) for _ in range(num_chains)]

    def renamed(self, rng: random.Random) -> _Chains:
        """The same chains at the same places with fresh names and numbers (RULER re-randomizes its example)."""
        return _Chains(rng, len(self.names), len(self.names[0]) - 1, len(self.names[0][0]), self.places)

    def needles(self, line_haystack: bool) -> list[tuple[float, str]]:
        found = []
        for names, value, places in zip(self.names, self.values, self.places):
            # RULER's statements: the noise haystack takes them as lines (the trailing space is RULER's);
            # prose takes them as sentences.
            texts = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
            if not line_haystack:
                texts = [t.strip() + "." for t in texts]
            found.extend(zip(places, texts))
        found.sort(key=lambda item: item[0])  # stable: a chain's statements stay in order
        return found

    def question(self) -> str:
        value = self.values[0]
        return QUESTION.format(query=value) + ANSWER_PREFIX.format(num_v=len(self.names[0]), query=value)


@register_task
class VariableTracking(RecallTask):
    """RULER's variable tracking (vt: `num_chains: 1`, `num_hops: 4`, noise haystack).

    Every variable name is 5 capital letters (3 in the worked example) and names are distinct; each
    chain starts from its own 5-digit number. On the noise haystack every statement and every noise
    block is its own line, as in RULER; on prose (`essay`, `{path: FILE}`) the statements are
    sentences. The answer is the `num_hops + 1` names of the first chain. The worked example is laid
    out once per build (fitted to `fewshot_tokens` with the same haystack) and takes fresh names and a
    fresh number in every sample, as RULER re-randomizes its one example.
    """

    name = "variable_tracking"
    summary = "RULER variable tracking: name every variable bound to a number through a chain; recall"
    Config = VariableTrackingConfig
    default_max_new_tokens = 30
    has_lengths = True

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        cfg: VariableTrackingConfig = self.config  # type: ignore[assignment]
        line_haystack = cfg.haystack == "noise"
        joiner = "\n" if line_haystack else " "
        if line_haystack:
            unit: Callable[[int], str] = lambda i: FILLER.strip()  # noqa: E731
        else:
            units = haystack_units(cfg.haystack)
            unit = lambda i: units(i).strip()  # noqa: E731

        def render(chains: _Chains, n: int) -> str:
            return INTRO + joiner.join(interleave(n, chains.needles(line_haystack), unit))

        # RULER's worked example: laid out once, renamed in every sample.
        example: _Chains | None = None
        n_example = 0
        if cfg.fewshot_tokens:
            example = _Chains(random.Random(f"{seed}/{self.name}/example"), cfg.num_chains, min(10, cfg.num_hops), 3)
            n_example, _, _ = fit_text(
                self.name, tokenizer, cfg.fewshot_tokens, lambda n: render(example, n), example.question(),
                field="fewshot_tokens", what="fewshot_tokens",
            )
        hint = f" with the {cfg.fewshot_tokens}-token worked example (lower fewshot_tokens)" if example else ""

        samples = []
        for length in cfg.context_lengths:
            last = None  # the previous sample's fit at this length: where the next one's search starts
            for _, index in cfg.cells():
                sample_id = f"{self.name}/ctx{length}/s{index}"
                rng = random.Random(f"{seed}/{sample_id}")
                prefix, avoid = "", frozenset()
                if example is not None:
                    shot = example.renamed(rng)
                    # RULER: the example's prompt, its answer after one more space, a newline, then the task.
                    prefix = render(shot, n_example) + shot.question() + " " + " ".join(shot.names[0]) + "\n\n"
                    avoid = frozenset(shot.values)
                chains = _Chains(rng, cfg.num_chains, cfg.num_hops, 5, avoid=avoid)

                def context(n: int, prefix: str = prefix, chains: _Chains = chains) -> str:
                    return prefix + render(chains, n)

                question = chains.question()
                n, prompt_ids, question_ids = fit_text(
                    self.name, tokenizer, length, context, question, start=last, hint=hint
                )
                last = n
                samples.append(self.sample(sample_id, length, context(n) + question, prompt_ids, question_ids, chains.names[0], joiner=" "))
        return samples

