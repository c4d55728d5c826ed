"""MoA: a heterogeneous elastic span per head, S_h(N) = alpha_h + beta_h * N, from a profiled plan.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv:2406.14909; reference code thu-nics/MoA). A plan is searched for a density budget and the
prompt lengths a trial serves: its mean KV density is held within [0.9 D, D] at each of them and
<= D at twice the longest (`paretoray.actors.moa_plan` reads it). The technique asks for it in
`prepare` through `artifacts.provide("moa_plan", ...)`: the builder the controller installed
(`paretoray.recipes.moa.build_plan`) profiles the model once per machine and searches the plan, or
they are made ahead with `paretoray moa profile` and `paretoray moa plan --lengths`. Every head
keeps one 64-token sink block and its span of recent tokens, both at prefill and in its KV cache
(`elastic_attention`).

Spans are fixed from the prompt length N at prefill (the reference sizes them for N plus the
generation budget; our generations are short next to N).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from paretoray.actors import artifacts
from paretoray.actors.models import model_identity
from paretoray.actors.moa_plan import BLOCK, Plan
from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.elastic_attention import ElasticSpans

# Keyed by the model's identity (models.model_identity), not its name: two models named alike differ.
_PLANS: dict[tuple[str, float, tuple[int, ...]], Plan] = {}  # (model, density, served lengths) -> plan
_SERVING: dict[tuple[str, float], tuple[int, ...]] = {}  # (model, density) -> lengths of the trial prepared last


def plan_for(model: PreTrainedModel, density: float, lengths: list[int] | tuple[int, ...]) -> Plan:
    """The model's plan at this density for these served lengths (built by the installed builder if needed)."""
    identity = model_identity(model)
    key = (identity, round(density, 4), tuple(sorted(set(lengths))))
    if key not in _PLANS:
        path = artifacts.provide("moa_plan", model=model, density=density, lengths=list(key[2]))
        plan = Plan.load(path)
        if plan.sinks != BLOCK:
            raise ValueError(f"{path}: sinks {plan.sinks} != {BLOCK}")
        if plan.model not in (None, identity):  # None: a plan made ahead by hand, trusted as before
            raise ValueError(f"{path}: the MoA plan was searched for another model; build it for this one "
                             "(`paretoray moa profile`, then `paretoray moa plan`)")
        _PLANS[key] = plan
    return _PLANS[key]


@register
@dataclass(frozen=True)
class MoA(ElasticSpans):
    density: float = param("float", 0.5, low=0.05, high=1.0,
                           doc="mean share of the KV cache kept over all heads at every prompt length served "
                               "(the plan's budget, also held at twice the longest; reference: 0.5)")

    name = "moa"
    examples = {"covers": {"density": 1.0}, "compresses": {"density": 0.8}}  # 64-token blocks: 0.8 is the least at 160 tokens
    trial_timeout_s = 7200.0  # the first trial may profile the model's heads (minutes to an hour on a CPU)

    def sinks(self) -> int:
        return BLOCK

    def _key(self, model: PreTrainedModel) -> tuple[str, float]:
        return model_identity(model), round(self.density, 4)

    def prepare(self, model: PreTrainedModel, served_lengths: list[int]) -> None:
        """Fetch the plan for the trial's prompt lengths; the trial's generations use it, whatever
        their length (the runner's short warm-up prompt included)."""
        plan_for(model, self.density, served_lengths)
        _SERVING[self._key(model)] = tuple(sorted(set(served_lengths)))

    def prepare_for_prompt(self, model: PreTrainedModel, prompt_len: int) -> None:
        if self._key(model) not in _SERVING:  # called without prepare (a test, a benchmark): plan for this length
            plan_for(model, self.density, [prompt_len])

    def plan(self, model: PreTrainedModel, prompt_len: int) -> Plan:
        return plan_for(model, self.density, _SERVING.get(self._key(model), (prompt_len,)))

    def layer_spans(self, model: PreTrainedModel, layer_idx: int, prompt_len: int) -> list[int]:
        return [rule.span(prompt_len) for rule in self.plan(model, prompt_len).rules(layer_idx)]
