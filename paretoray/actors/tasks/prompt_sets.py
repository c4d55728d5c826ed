"""Decoding sets: chat prompts from the templates the project ships (`paretoray.actors.prompts`).

They have no fixed answer; a technique is scored by equality of its output with the dense model's
own greedy output on the same prompt (what a lossless speculative decoder must reproduce).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from paretoray.actors.prompts import as_chat, make_prompts
from paretoray.actors.tasks.base import Sample, Task, TaskConfig, register_task


class PromptSetConfig(TaskConfig):
    samples_per_length: int = Field(2, ge=1, le=10_000, description="prompts to draw (the name is shared with the long-context tasks)")


class _PromptSet(Task):
    Config = PromptSetConfig
    scored_by_reference = True
    default_max_new_tokens = 64

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        samples = []
        for index, prompt in enumerate(make_prompts(self.name, self.config.samples_per_length, seed)):
            text = as_chat(tokenizer, prompt)
            # A chat template already spells out its special tokens.
            ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
            samples.append(Sample(f"{self.name}/s{index}", self.name, text, ids, "", len(ids), 0.0))
        return samples

    def score(self, sample: Sample, output: str, reference: str | None = None) -> dict[str, float]:
        return {"accuracy": float(reference is not None and output == reference)}


@register_task
class Instructions(_PromptSet):
    name = "instructions"
    summary = "chat instructions (poems, facts, emails); scored as equality with dense's greedy output"


@register_task
class Arithmetic(_PromptSet):
    name = "arithmetic"
    summary = "arithmetic word problems; scored as equality with dense's greedy output"


@register_task
class Code(_PromptSet):
    name = "code"
    summary = "Python function requests; scored as equality with dense's greedy output"


@register_task
class Everyday(_PromptSet):
    name = "everyday"
    summary = ("20 everyday requests in styles the templates and the draft's recipe never use (advice, recipes, "
               "translation, trivia); scored as equality with dense's greedy output")


@register_task
class Mixed(_PromptSet):
    name = "mixed"
    summary = "instructions, arithmetic and code in turn; scored as equality with dense's greedy output"
