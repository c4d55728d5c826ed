"""SpecDec++: adaptive candidate length from an acceptance-prediction head on the draft.

Huang et al., "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths"
(arXiv:2405.19715; reference code Kaffaljidhmah2/SpecDec_pp).

A small head on the draft's last hidden state predicts, for each proposed token, the
probability that the target accepts it. Drafting stops as soon as the predicted probability that
at least one proposal of this round is rejected, 1 - prod(p_accept), exceeds `threshold` (the
paper shows the optimal policy is such a threshold), bounded to [min_gamma, max_gamma]
candidates per round (the reference's `--bound 2 20`).

The head, as in the reference: `num_layers` residual blocks x + SiLU(Linear(x)) and a Linear to two
classes, class 0 = rejected, class 1 = accepted. The reference builds its blocks as
`[ResBlock(h)] * num_layers`, one module repeated, so the blocks share their weights; we keep that.
It is trained by `paretoray train-acceptance-head` and stored beside the draft as
`acceptance_head.safetensors` with `acceptance_head.json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from paretoray.actors.techniques.base import Param, register
from paretoray.actors.techniques.speculative import TEMPERATURE, DraftPolicy, Speculative

HEAD_WEIGHTS, HEAD_CONFIG = "acceptance_head.safetensors", "acceptance_head.json"


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class AcceptanceHead(nn.Module):
    """hidden [..., H] -> logits [..., 2] (0: rejected, 1: accepted)."""

    def __init__(self, hidden_size: int, num_layers: int = 3):
        super().__init__()
        self.config = {"hidden_size": hidden_size, "num_layers": num_layers}
        block = ResidualBlock(hidden_size)  # one block applied num_layers times, as the reference does
        self.model = nn.Sequential(*([block] * num_layers), nn.Linear(hidden_size, 2))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model(hidden)

    def accept_probability(self, hidden: torch.Tensor) -> float:
        weight = self.model[-1].weight
        return float(self(hidden.to(weight.dtype)).float().softmax(-1)[..., 1])

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_model

        folder = Path(folder)
        save_model(self, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_CONFIG).write_text(json.dumps(self.config))

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> AcceptanceHead:
        from safetensors.torch import load_model

        folder = Path(folder)
        if not (folder / HEAD_WEIGHTS).exists():
            raise FileNotFoundError(
                f"no acceptance head in {folder}: train one with `paretoray train-acceptance-head` (it saves {HEAD_WEIGHTS} there)"
            )
        head = cls(**json.loads((folder / HEAD_CONFIG).read_text()))
        load_model(head, str(folder / HEAD_WEIGHTS), strict=False)  # the shared block is stored once
        return head.to(device).eval()


@dataclass
class ThresholdPolicy(DraftPolicy):
    """Stop once 1 - prod(p_accept) > threshold (within [min_gamma, max_gamma] proposals)."""

    accept_probability: Callable[[torch.Tensor], float]
    threshold: float
    min_gamma: int
    max_gamma: int
    log_all_accepted: float = field(default=0.0)

    def begin_round(self) -> None:
        self.log_all_accepted = 0.0

    def stop(self, proposed: int, draft_hidden: torch.Tensor) -> bool:
        p = min(max(self.accept_probability(draft_hidden), 1e-12), 1.0)
        self.log_all_accepted += math.log(p)
        if proposed >= self.max_gamma:
            return True
        return proposed >= self.min_gamma and 1.0 - math.exp(self.log_all_accepted) > self.threshold


_HEADS: dict[str, AcceptanceHead] = {}  # one load per draft per process


@register
@dataclass(frozen=True)
class SpecDecPP(Speculative):
    threshold: float = 0.3
    max_gamma: int = 20
    min_gamma: int = 2
    temperature: float = 0.0

    name = "specdec_pp"
    params = {
        "threshold": Param("float", 0.3, low=0.0, high=1.0, doc="stop drafting once P(some proposal rejected) exceeds this (reference: 0.3)"),
        "max_gamma": Param("int", 20, low=1, high=64, doc="most candidates per round (reference bound: 20)"),
        "min_gamma": Param("int", 2, low=1, high=64, doc="fewest candidates per round (reference bound: 2)"),
        "temperature": TEMPERATURE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_gamma > self.max_gamma:
            raise ValueError(f"{self.name}: min_gamma ({self.min_gamma}) must not exceed max_gamma ({self.max_gamma})")

    def policy(self, draft: PreTrainedModel) -> DraftPolicy:
        folder = str(draft.name_or_path)
        if folder not in _HEADS:
            _HEADS[folder] = AcceptanceHead.load(folder, device=draft.device)
        return ThresholdPolicy(_HEADS[folder].accept_probability, self.threshold, self.min_gamma, self.max_gamma)
