"""Compositions: a technique built from techniques, `outer+inner`.

The first member takes the rest as its member: `kv_quant+snapkv` (SnapKV chooses the entries kept
at the prefill, kv_quant stores them quantized), `self_spec+snapkv` (the model drafts over a SnapKV
cache of itself and verifies with its full cache), `self_spec+kv_quant+snapkv` if the members
allow it. Which pairs fit is declared, not coded here: an outer technique `accepts` a kind of
member, a member `provides` kinds, and the outer's `member_requires` lists the capabilities its
member must declare, each with the reason (`declarations.composition_declaration` checks them
all and is what the spec's validation reports).

A composition is a `Technique` like any other: the runner and the controller see a name
(`kv_quant+snapkv`), parameters (`kv_quant.bits`, `snapkv.max_capacity_prompt`: each member's,
swept as usual), capabilities (derived from the members') and a label naming every member's
parameters (`kv_quant(bits=4,...)+snapkv(...)`). Generating asks the outer member to generate
with `member=` the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from transformers import PreTrainedModel

from paretoray.actors.declarations import SEPARATOR, CompositionError, _declare, composition_declaration
from paretoray.actors.techniques.base import Technique, available_techniques, build_technique


@dataclass(frozen=True)
class Composition(Technique):
    """Members, outermost first. Built with `compose(name, params)` or `Composition.of(members)`."""

    members: tuple[Technique, ...] = ()
    name: ClassVar[str] = ""
    examples: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def of(cls, members: tuple[Technique, ...]) -> Composition:
        return composition_class("+".join(m.name for m in members))(members=members)

    def __post_init__(self) -> None:
        if [m.name for m in self.members] != self.name.split("+"):
            raise ValueError(f"{self.name}: members {[m.name for m in self.members]} do not match the name")

    @property
    def outer(self) -> Technique:
        return self.members[0]

    @property
    def inner(self) -> Technique:
        """What the outer member takes: the last member, or the composition of the rest."""
        rest = self.members[1:]
        return rest[0] if len(rest) == 1 else Composition.of(rest)

    @property
    def label(self) -> str:
        return "+".join(m.label for m in self.members)

    def values(self) -> dict[str, Any]:
        """Every member's parameters, `member.param` -> value (what a trial records)."""
        return {f"{m.name}{SEPARATOR}{key}": getattr(m, key) for m in self.members for key in m.params}

    def __getattr__(self, key: str) -> Any:  # `record["params"]` reads getattr(technique, key) per declared key
        member, sep, param = key.partition(SEPARATOR)
        if sep:
            for m in self.__dict__.get("members", ()):
                if m.name == member:
                    return getattr(m, param)
        raise AttributeError(key)

    def prepare(self, model: PreTrainedModel, served_lengths: list[int]) -> None:
        for member in self.members:
            member.prepare(model, served_lengths)

    def static_cache(self, model, cache, steps, release=False):
        return self.outer.static_cache(model, cache, steps, release)

    def generate_batch(self, model, prompts, max_new_tokens, eos_token_ids=None, question_ids=None, compiled=False, **extra):
        if not self.batched:
            raise ValueError(f"{self.name} cannot decode a batch: {self.batch_note}")
        return self.outer.generate_batch(model, prompts, max_new_tokens, eos_token_ids, question_ids=question_ids,
                                         compiled=compiled, member=self.inner, **extra)

    def generate(self, model, input_ids, max_new_tokens, eos_token_ids=None, forced_tokens=None, question_ids=None,
                 compiled=False, **extra):
        return self.outer.generate(model, input_ids, max_new_tokens, eos_token_ids, forced_tokens=forced_tokens,
                                   question_ids=question_ids, compiled=compiled, member=self.inner, **extra)


@cache
def composition_class(name: str) -> type[Composition]:
    """The class of composition `name`, its flags and parameters derived from its members'
    declarations; raises `CompositionError` (a ValueError) saying why the members do not fit."""
    registry = {n: _declare(c) for n, c in available_techniques().items()}
    declared = composition_declaration(name, registry)
    caps = declared.capabilities
    outer = available_techniques()[name.split("+")[0]]
    attrs = {
        "name": name,
        "params": declared.params,
        "phase": declared.phase,
        "uses_model": caps["uses_model"],
        "needs_draft": caps["needs_draft"],
        "lossless": caps["lossless"],
        "reports": tuple(caps["reports"]),
        "trial_timeout_s": caps["trial_timeout_s"],
        "static_decode": caps["static_decode"],
        "decode_evicts": caps["decode_evicts"],
        "kv_within_dense": outer.kv_within_dense,
        "provides": outer.provides,
        "accepts": outer.accepts,
        "member_requires": outer.member_requires,
        "member_shapes_output": outer.member_shapes_output,
        "__module__": __name__,
    }
    attrs["batched"] = caps.get("batched", False)
    attrs["batch_note"] = caps.get("batch_note", "")
    return type(f"Composition[{name}]", (Composition,), attrs)


def compose(name: str, params: dict[str, Any]) -> Composition:
    """A composition from its name and `member.param` values (a member's parameter not given takes
    its default). Raises ValueError naming an unknown parameter or a composition that does not fit."""
    cls = composition_class(name)
    unknown = set(params) - set(cls.params)
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {sorted(unknown)}; declared: {sorted(cls.params)}")
    parts = name.split("+")
    members = tuple(
        build_technique(part, {key.partition(SEPARATOR)[2]: value for key, value in params.items()
                               if key.partition(SEPARATOR)[0] == part})
        for part in parts
    )
    return cls(members=members)


__all__ = ["Composition", "CompositionError", "compose", "composition_class"]
