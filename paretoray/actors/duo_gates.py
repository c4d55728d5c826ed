"""DuoAttention's learned gates as the actors read them: one value in [0, 1] per KV head.

Torch-free: the gates file is JSON. The offline half that trains them (`paretoray.recipes.duo`)
imports this module; nothing here imports the recipes.

A gate near 1 marks a retrieval head (it needs the whole context), near 0 a streaming head (sinks
and a recent window serve it). Deployment ranks all KV heads of the model together by gate and
keeps the top `retrieval_share` of them dense (`retrieval_heads`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "duo-gates-1"


@dataclass
class Gates:
    """Per (layer, KV head) gate, the model they were trained on and how; saved as JSON.

    `recipe`: the training settings (`paretoray.recipes.duo.Recipe`, as a dict); `history`: per
    step, [distillation loss, mean |gate|] (the two terms of the training loss)."""

    gates: list[list[float]]
    model: str  # models.model_identity of the model trained on
    name: str = ""  # the model's folder or hub name, for people
    recipe: dict = field(default_factory=dict)
    history: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    format: str = FORMAT

    def __post_init__(self) -> None:
        rows = self.gates
        if not rows or not all(isinstance(row, list) and row and len(row) == len(rows[0]) for row in rows):
            raise ValueError("gates must be a non-empty [layers][kv_heads] table")
        if not all(isinstance(g, (int, float)) and not isinstance(g, bool) and 0.0 <= g <= 1.0 for row in rows for g in row):
            raise ValueError("every gate must be a number in [0, 1]")

    def retrieval_heads(self, share: float) -> list[list[bool]]:
        """[layers][kv_heads]: True for the round(share * heads) heads of highest gate, counted over
        the whole model (round half up); ties go to the earlier head in layer-major order."""
        flat = [g for row in self.gates for g in row]
        keep = set(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[: retrieval_count(share, len(flat))])
        width = len(self.gates[0])
        return [[layer * width + h in keep for h in range(width)] for layer in range(len(self.gates))]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(asdict(self)))
        staging.replace(path)  # a reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> Gates:
        """Plain JSON: nothing but numbers, strings and lists is read (ValueError for anything else)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a DuoAttention gates file of this version")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{path}: not a DuoAttention gates file of this version ({error})") from None


def retrieval_count(share: float, heads: int) -> int:
    """round(share * heads), halves up: the number of retrieval heads a share gives."""
    return min(heads, max(0, math.floor(share * heads + 0.5)))
