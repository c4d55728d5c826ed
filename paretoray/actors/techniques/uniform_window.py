"""A uniform sliding window for every head: MoA's baseline at the same average density.

The comparison MoA's paper draws (its "uniform" attention, as StreamingLLM's window with sinks):
every KV head keeps `sinks` initial tokens and the same span, chosen so that sinks + span is
`density` of the prompt: the share of the KV cache kept, the density MoA's plans are budgeted in. It runs on the same per-head cache and attention as `moa`
(`elastic_attention`), so a front of the two compares the plans alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.elastic_attention import ElasticSpans, kv_heads, span_for_density


@register
@dataclass(frozen=True)
class UniformWindow(ElasticSpans):
    density: float = param("float", 0.5, low=0.001, high=1.0, doc="share of the prompt's KV cache kept (sinks + span over N), as moa's density")
    sink_tokens: int = param("int", 64, low=0, high=4096, doc="initial tokens every head keeps (MoA: one 64-token block)")

    name = "uniform_window"
    # Covering needs room for the generated tokens too: sinks + span = density * N alone would evict them.
    examples = {"covers": {"density": 1.0, "sink_tokens": 256}, "compresses": {"density": 0.5, "sink_tokens": 8}}

    def sinks(self) -> int:
        return self.sink_tokens

    def layer_spans(self, model: PreTrainedModel, layer_idx: int, prompt_len: int) -> list[int]:
        return [span_for_density(self.density, self.sink_tokens, prompt_len)] * kv_heads(model)
