"""The baseline: full attention with the full KV cache (transformers' `DynamicCache`)."""

from __future__ import annotations

from dataclasses import dataclass

from paretoray.actors.techniques.base import Technique, register


@register
@dataclass(frozen=True)
class Dense(Technique):
    name = "dense"
    params = {}  # no hyperparameters: the reference every other technique is compared with
    phase = "none"
    lossless = True
    is_reference = True
