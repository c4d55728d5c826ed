"""The baseline: full attention with the full KV cache (transformers' `DynamicCache`)."""

from __future__ import annotations

from dataclasses import dataclass

from paretoray.actors.techniques.base import Technique, register


@register
@dataclass(frozen=True)
class Dense(Technique):
    # No hyperparameters: the reference every other technique is compared with.
    name = "dense"
    phase = "none"
    lossless = True
    is_reference = True
    rollback = True  # transformers' DynamicCache crops exactly
