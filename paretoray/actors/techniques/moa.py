"""MoA: a heterogeneous elastic span per head, S_h(N) = alpha_h + beta_h * N, from a profiled plan.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv:2406.14909; reference code thu-nics/MoA). The plan for a density budget is searched from
the model's profile (`paretoray.actors.moa`); both are built on first use and cached under
`$PARETORAY_CACHE/moa/MODEL/` (the profile once per model, a plan per budget), or made ahead with
`paretoray moa profile` and `paretoray moa plan`. Every head keeps one 64-token sink block and its
span of recent tokens, both at prefill and in its KV cache (`elastic_attention`).

Spans are fixed from the prompt length N at prefill (the reference sizes them for N plus the
generation budget; our generations are short next to N).
"""

from __future__ import annotations

import fcntl
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.elastic_attention import ElasticSpans

_PLANS: dict[tuple[str, float], object] = {}


def moa_dir(model: PreTrainedModel) -> Path:
    from paretoray.actors.models import cache_root

    return cache_root() / "moa" / Path(str(model.name_or_path)).name


def plan_for(model: PreTrainedModel, density: float):
    """The model's plan at this density: loaded, or searched from its profile (profiled on first use)."""
    from paretoray.actors.moa import BLOCK, DEFAULT_LENGTHS, Plan, Profile, profile_model, search_plan

    key = (str(model.name_or_path), round(density, 4))
    if key in _PLANS:
        return _PLANS[key]
    folder = moa_dir(model)
    plan_path = folder / f"plan-density{density:.4f}.json"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:  # actors on one machine profile once, not once each
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not plan_path.exists():
            profile_path = folder / "profile.pt"
            if not profile_path.exists():
                print(f"moa: profiling {model.name_or_path} once at {DEFAULT_LENGTHS} tokens; cached in {folder}",
                      file=sys.stderr, flush=True)
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(model.name_or_path))
                profile_model(model, tokenizer, DEFAULT_LENGTHS).save(profile_path)
            search_plan(Profile.load(profile_path), density).save(plan_path)
    plan = Plan.load(plan_path)
    if plan.sinks != BLOCK:
        raise ValueError(f"{plan_path}: sinks {plan.sinks} != {BLOCK}")
    _PLANS[key] = plan
    return plan


@register
@dataclass(frozen=True)
class MoA(ElasticSpans):
    density: float = param("float", 0.5, low=0.05, high=1.0,
                           doc="mean share of the KV cache kept over all heads at every profiled length (the plan's budget; reference: 0.5)")

    name = "moa"
    examples = {"covers": {"density": 1.0}, "compresses": {"density": 0.8}}  # 64-token blocks: 0.8 is the least at 160 tokens

    def sinks(self) -> int:
        from paretoray.actors.moa import BLOCK

        return BLOCK

    def layer_spans(self, model: PreTrainedModel, layer_idx: int, prompt_len: int) -> list[int]:
        return [rule.span(prompt_len) for rule in plan_for(model, self.density).rules(layer_idx)]
