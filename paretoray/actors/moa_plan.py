"""A MoA plan as the actors read it: one elastic rule (alpha, beta) per KV head, and its spans.

Torch-free: the plan file is JSON. The offline half that writes it (profiling and the plan search)
lives in `paretoray.recipes.moa`, which imports this module; nothing here imports the recipes.

A rule keeps, at prompt length N (nb = ceil(N / 64) blocks), n = max(1, int(alpha // 64 + beta * nb))
blocks of recent tokens: a span of 64 n tokens, beside the 64-token sink block every head keeps.
Its density at N is the share of the KV cache it holds, min(N, 64 + span) / N: at multiples of 64
this is the reference's "kv" density, min(n + 1, nb) / nb.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

BLOCK = 64  # tokens per block: the sink block, and the unit of every span


@dataclass(frozen=True)
class Rule:
    alpha: int  # tokens
    beta: float

    def blocks(self, n_tokens: int) -> int:
        """Blocks of recent tokens kept (the query's own block included) at length n_tokens."""
        nb = math.ceil(n_tokens / BLOCK)
        return max(1, int(self.alpha // BLOCK + self.beta * nb))

    def span(self, n_tokens: int) -> int:
        """The rule's window in tokens at length n_tokens (sinks not included)."""
        return self.blocks(n_tokens) * BLOCK

    def density(self, n_tokens: int) -> float:
        """Share of a prompt of n_tokens the head's KV cache holds: sinks and span, at most all."""
        return min(n_tokens, BLOCK + self.span(n_tokens)) / n_tokens


@dataclass
class Plan:
    """One elastic rule per (layer, KV head) and the sink size; saved as JSON.

    `lengths`: the prompt lengths whose mean density the search kept within [0.9 D, D] (the lengths
    it was made to serve); `extend_length`: a longer length also held to <= D, as the reference
    constrains 16K beside its 2K-8K profile; `profiled_lengths`: where its loss was measured.
    """

    alphas: list[list[int]]
    betas: list[list[float]]
    sinks: int = BLOCK
    density: float = 0.5
    lengths: list[int] = field(default_factory=list)
    extend_length: int | None = None
    profiled_lengths: list[int] = field(default_factory=list)
    predicted_loss: dict[str, float] = field(default_factory=dict)  # per profiled length: summed influence dropped
    achieved_density: dict[str, float] = field(default_factory=dict)  # per constrained length: mean over heads
    model: str | None = None  # models.model_identity of the model profiled (None: a plan of an earlier version)

    def rules(self, layer: int) -> list[Rule]:
        return [Rule(a, b) for a, b in zip(self.alphas[layer], self.betas[layer])]

    def mean_density(self, n_tokens: int) -> float:
        """Mean KV density over every head at a prompt of n_tokens, served or not."""
        densities = [rule.density(n_tokens) for layer in range(len(self.alphas)) for rule in self.rules(layer)]
        return sum(densities) / len(densities)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(asdict(self), indent=1))
        staging.replace(path)  # a reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Plain JSON: nothing but numbers, strings and lists is read (ValueError for anything else)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a MoA plan")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{path}: not a MoA plan of this version ({error})") from None
