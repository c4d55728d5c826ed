"""A uniform sliding window for every head: MoA's baseline at the same average density.

The comparison MoA's paper draws (its "uniform" attention, as StreamingLLM's window with sinks):
every KV head keeps `sinks` initial tokens and the same span, chosen so that sinks + span is
`density` of the prompt: the share of the KV cache kept, the density MoA's plans are budgeted in. It runs on the same per-head cache and attention as `moa`
(`elastic_attention`), so a front of the two compares the plans alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from paretoray.actors.techniques.base import Param, register
from paretoray.actors.techniques.elastic_attention import ElasticSpans, kv_heads, span_for_density


@register
@dataclass(frozen=True)
class UniformWindow(ElasticSpans):
    density: float = 0.5
    sink_tokens: int = 64

    name = "uniform_window"
    params = {
        "density": Param("float", 0.5, low=0.001, high=1.0, doc="share of the prompt's KV cache kept (sinks + span over N), as moa's density"),
        "sink_tokens": Param("int", 64, low=0, high=4096, doc="initial tokens every head keeps (MoA: one 64-token block)"),
    }

    def sinks(self) -> int:
        return self.sink_tokens

    def layer_spans(self, model: PreTrainedModel, layer_idx: int, prompt_len: int) -> list[int]:
        return [span_for_density(self.density, self.sink_tokens, prompt_len)] * kv_heads(model)
