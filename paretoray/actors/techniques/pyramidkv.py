"""PyramidKV: SnapKV's scores with layer budgets that shrink from the lower to the upper layers.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv:2406.02069; reference code Zefan-Cai/KVCache-Factory).

Three regimes, as the reference's `PyramidKVCluster.update_kv` has them (prompt length L,
capacity C, window w):
- L < C: nothing is compressed;
- C <= L < 2 (C - w): SnapKV's uniform budget, C entries in every layer (the pyramid would need
  more prefix than the prompt has);
- otherwise each layer keeps its window plus a prefix budget that falls linearly with depth from
  max = 2 (C - w) - min at the first layer to min = (C - w) // beta at the last, in steps of
  (max - min) // (layers - 1), so the total over layers is about SnapKV's uniform C; when max
  would exceed the prompt's prefix L - w it is clamped there and min raised to keep the total.

SnapKV's `gqa` rule applies unchanged: with `per_query_head` every query head keeps its layer's
budget of its own positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.kv_compression import budget_tokens
from paretoray.actors.techniques.snapkv import SnapKV


@register
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    beta: int = param("int", 20, low=1, high=1000, doc="steepness: the top layer keeps (C - w) / beta")

    name = "pyramidkv"

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        capacity = budget_tokens(self.max_capacity_prompt, prompt_len)
        window = min(self.window_size, prompt_len)
        if capacity >= prompt_len:
            return prompt_len
        average = max(capacity - window, 0)
        if prompt_len < 2 * average:  # too short for the pyramid: the reference keeps SnapKV's uniform C
            return window + average
        low = average // self.beta
        high = 2 * average - low
        if high >= prompt_len - window:
            high = prompt_len - window
            low = 2 * average - high
        step = (high - low) // max(num_layers - 1, 1)
        return window + high - layer_idx * step
