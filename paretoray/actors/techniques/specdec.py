"""Speculative decoding with a fixed candidate length gamma (the draft proposes gamma tokens per round).

Leviathan et al., ICML 2023; Chen et al., 2023. Lossless: greedy outputs equal the target's own
greedy decoding, sampled outputs follow the target's distribution (see `speculative.verify`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.speculative import TEMPERATURE, DraftPolicy, Speculative


@dataclass
class FixedLength(DraftPolicy):
    gamma: int

    def stop(self, proposed: int, draft_hidden: torch.Tensor) -> bool:
        return proposed >= self.gamma


@register
@dataclass(frozen=True)
class SpecDec(Speculative):
    gamma: int = param("int", 4, low=1, high=32, doc="candidate tokens the draft proposes per round")
    temperature: float = TEMPERATURE.field()

    name = "specdec"
    examples = {"covers": {}, "one_candidate": {"gamma": 1}}

    def policy(self, draft: PreTrainedModel, target: PreTrainedModel) -> DraftPolicy:
        return FixedLength(self.gamma)
