"""DuoAttention: retrieval heads keep the whole KV cache, streaming heads sinks + a recent window.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads" (ICLR 2025; reference code mit-han-lab/duo-attention). Which KV heads are retrieval heads
is learned once per model: a gate per KV head, trained with the model frozen on synthetic passkey
retrieval (`paretoray.recipes.duo`, kind "duo_gates": built on first use by the builder the
controller installs, or ahead with `python -m paretoray.recipes.duo --model MODEL`). At deployment
the heads of the whole model are ranked by gate and the top `retrieval_share` of them
(round(share x heads)) stay dense; every other head keeps `sink_size` first tokens and its
`recent_size` most recent ones (the reference's `sparsity` is 1 - retrieval_share; it deploys
with 64 sinks and 256 recent tokens).

This is a per-head span plan on MoA's mechanism (`elastic_attention`): a retrieval head's span is
longer than any text, a streaming head's is `recent_size`. Query i of a streaming head sees key j
iff j <= i and (j < sink_size or i - j < recent_size), at prefill (the banded mask) and while
decoding (a ring of recent_size slots beside the sinks); its cache holds exactly sink_size +
recent_size entries. A retrieval head attends and caches like dense attention.

Deviations: the reference prefills in chunks (32K tokens in its needle test), so its streaming
heads see the whole chunk and only later chunks are banded; here they are banded from the first
token, as in its training forward; and its decoding step attends the streaming cache of
sinks + recent plus the new token (one key more than its training band), ours keeps the band
i - j < recent_size. Heads with equal gates are ranked in layer-major order (the
reference adds random noise). A question after the context (`context_only`) is fed one token
per forward (`question_by_token`): the outputs are those of one banded chunk, its prefill time
is longer than one chunk's.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from paretoray.actors import artifacts
from paretoray.actors.duo_gates import Gates, retrieval_count
from paretoray.actors.models import model_identity
from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.elastic_attention import ElasticSpans, kv_heads

FULL_SPAN = 1 << 30  # a retrieval head's span: longer than any text, so it never evicts

# Keyed by the model's identity (models.model_identity), not its name: two models named alike differ.
_GATES: dict[str, Gates] = {}


def gates_for(model: PreTrainedModel) -> Gates:
    """The model's trained gates (built by the installed builder if needed), refused if trained on another model."""
    identity = model_identity(model)
    if identity not in _GATES:
        path = artifacts.provide("duo_gates", model=model)
        gates = Gates.load(path)
        if gates.model != identity:
            raise ValueError(f"{path}: DuoAttention's gates were trained on another model; train them for this one "
                             "(`python -m paretoray.recipes.duo --model MODEL`, or delete the file)")
        shape = (model.config.num_hidden_layers, kv_heads(model))
        if (len(gates.gates), len(gates.gates[0])) != shape:
            raise ValueError(f"{path}: gates for {len(gates.gates)}x{len(gates.gates[0])} heads, the model has {shape}")
        _GATES[identity] = gates
    return _GATES[identity]


@register
@dataclass(frozen=True)
class DuoAttention(ElasticSpans):
    retrieval_share: float = param("float", 0.5, low=0.0, high=1.0,
                                   doc="share of all KV heads kept dense, those of highest learned gate "
                                       "(reference: 0.5 for GQA models, 0.25 for MHA; its sparsity = 1 - share)")
    sink_size: int = param("int", 64, low=0, high=4096, doc="first tokens every streaming head keeps (reference: 64)")
    recent_size: int = param("int", 256, low=1, high=65536,
                             doc="most recent tokens a streaming head keeps, its own included (reference: 256)")

    name = "duo_attention"
    examples = {"covers": {"retrieval_share": 1.0}, "compresses": {"retrieval_share": 0.5, "sink_size": 8, "recent_size": 32}}
    trial_timeout_s = 7200.0  # the first trial may train the model's gates (minutes on a CPU)
    context_only = True  # the heads' spans do not depend on the prompt: a question is appended as decoded tokens are
    question_by_token = True

    def sinks(self) -> int:
        return self.sink_size

    def retrieval_heads(self, model: PreTrainedModel) -> list[list[bool]]:
        """[layers][kv_heads]: True where the head stays dense. Shares keeping no head or every
        head need no gates."""
        layers, heads = model.config.num_hidden_layers, kv_heads(model)
        count = retrieval_count(self.retrieval_share, layers * heads)
        if count in (0, layers * heads):
            return [[count > 0] * heads for _ in range(layers)]
        return gates_for(model).retrieval_heads(self.retrieval_share)

    def prepare(self, model: PreTrainedModel, served_lengths: list[int]) -> None:
        self.retrieval_heads(model)

    def prepare_for_prompt(self, model: PreTrainedModel, prompt_len: int) -> None:
        self.retrieval_heads(model)  # outside inference mode: a first-use build trains here

    def layer_spans(self, model: PreTrainedModel, layer_idx: int, prompt_len: int) -> list[int]:
        return [FULL_SPAN if dense else self.recent_size for dense in self.retrieval_heads(model)[layer_idx]]
