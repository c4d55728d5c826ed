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
    static_decode = True
    provides = ("kv_cache",)
    batched = True

    def static_cache(self, model, cache, steps, release=False):
        from paretoray.actors.static_decode import convert, dynamic_to_static

        return convert(model, cache, lambda layer: dynamic_to_static(layer, steps), release)
