"""The narrow base every technique builds on: declared parameters, a registry, and generation.

A technique is a frozen dataclass whose fields are its hyperparameters. Each field is declared
with `param(kind, default, low=..., high=...)`, which writes its default once and records its
allowed range as a `Param`; `register` collects them into `cls.params` (used both to validate a
configured instance and to validate a sweep's search space). A technique registers itself by name,
declares its capabilities as class flags (`lossless`, `is_reference`, `rollback`, ...) and example
configurations (`examples`, run by tests/test_technique_contract.py), and either supplies a KV
cache (`new_cache`) to the shared greedy loop or overrides `generate` entirely (speculative
decoding does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from paretoray.actors.declarations import Param, ParamKind
from paretoray.actors.generation import BatchGeneration, Generation, cache_nbytes, decode, decode_batch, eager_step, prefill


def param(
    kind: ParamKind,
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[Any, ...] | None = None,
    log: bool = False,
    doc: str = "",
) -> Any:
    """Declare a technique's hyperparameter field: `threshold: float = param("float", 0.3, low=0, high=1)`.

    The default is written here once; `register` derives the class's `params` from these fields.
    """
    return Param(kind, default, low, high, choices, log, doc).field()


def _declared_params(cls: type) -> dict[str, Param]:
    """The `Param` of every field, in field order; a field declared without `param()` is an error."""
    declared = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("param")
        if not isinstance(spec, Param):
            raise TypeError(f"{cls.__qualname__}.{f.name}: declare hyperparameters with param(kind, default, ...)")
        if f.default is not spec.default and f.default != spec.default:
            raise TypeError(f"{cls.__qualname__}.{f.name}: default {f.default!r} differs from its Param's {spec.default!r}")
        declared[f.name] = spec
    return declared


_REGISTRY: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make a technique available to sweeps under `cls.name`."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"technique name {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    declared = _declared_params(cls)
    if "params" in vars(cls) and vars(cls)["params"] != declared:  # written by hand, as before param()
        raise TypeError(f"{cls.__qualname__}: `params` is derived from its param() fields; remove it")
    cls.params = declared
    for example, values in cls.examples.items():
        unknown = set(values) - set(declared)
        if unknown:
            raise TypeError(f"{cls.__qualname__}: example {example!r} sets undeclared parameter(s) {sorted(unknown)}")
        cls(**values)  # validated now: a broken example fails at import, not in the contract test
    _REGISTRY[cls.name] = cls
    return cls


class UnknownTechniqueError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def technique_class(name: str) -> type[Technique]:
    from paretoray.actors import techniques  # noqa: F401  (imports every technique module once)

    if "+" in name:
        from paretoray.actors.techniques.compose import composition_class

        return composition_class(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTechniqueError(f"unknown technique {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def available_techniques() -> dict[str, type[Technique]]:
    from paretoray.actors import techniques  # noqa: F401

    return dict(sorted(_REGISTRY.items()))


def reference_technique() -> Technique:
    """The registered baseline (`is_reference`): what every trial is paired with."""
    found = [cls for cls in available_techniques().values() if cls.is_reference]
    if len(found) != 1:
        raise TypeError(f"exactly one technique must declare is_reference = True, found {[c.name for c in found]}")
    return build_technique(found[0].name, {})


def build_technique(name: str, params: dict[str, Any]) -> Technique:
    """Instantiate a registered technique (or a composition `outer+inner`, its parameters named
    `member.param`); missing parameters take their declared defaults."""
    if "+" in name:
        from paretoray.actors.techniques.compose import compose

        return compose(name, params)
    cls = technique_class(name)
    unknown = set(params) - set(cls.params)
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {sorted(unknown)}; declared: {sorted(cls.params)}")
    values = {key: params.get(key, spec.default) for key, spec in cls.params.items()}
    for key, spec in cls.params.items():
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # validated (and refused) by the technique itself
        if spec.kind == "int" and float(value).is_integer():
            values[key] = int(value)
        elif spec.kind == "float":
            values[key] = float(value)
    return cls(**values)


def parse_technique(text: str) -> Technique:
    """`name`, `name:param=value,param=value`, or a `label` (`name(param=value,...)`), numbers
    parsed and anything else a string. A label round-trips: `parse_technique(t.label) == t` for
    parameters a label writes exactly (floats with at most 4 significant digits), and
    `parse_technique(t.label).label == t.label` always."""
    text = text.strip()
    if "+" in text:  # a composition's label: its members' labels joined by "+"
        from paretoray.actors.techniques.compose import Composition

        return Composition.of(tuple(parse_technique(part) for part in text.split("+")))
    if text.endswith(")") and "(" in text:
        name, _, args = text[:-1].partition("(")
        text = f"{name}:{args}"

    def value(raw: str) -> Any:
        for kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                pass
        return raw

    name, _, args = text.partition(":")
    pairs = (pair.partition("=") for pair in filter(None, args.split(",")))
    return build_technique(name, {key: value(raw) for key, _, raw in pairs})


@dataclass(frozen=True)
class Technique:
    """Base class. Subclasses are frozen dataclasses declaring `name` and their fields with `param()`.

    Capabilities are declared flags, read by the runner, the spec checks, the dashboards and the
    contract test (tests/test_technique_contract.py), never inferred from a technique's name.
    """

    name: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}  # derived by `register` from the param() fields
    phase: ClassVar[str] = "decode"  # what the technique changes: "none", "kv-cache", "decode" ...
    needs_draft: ClassVar[bool] = False  # generate() takes `draft=` (a second, smaller model); nothing more
    lossless: ClassVar[bool] = False  # greedy output equals dense's by construction, whatever the parameters
    is_reference: ClassVar[bool] = False  # the baseline every trial is timed and scored against (dense)
    uses_model: ClassVar[bool] = True  # False: `measure_without_model` replaces samples, dense reference and generation
    # The cache it decodes with (`applied`) supports rollback: `cache.crop(-n)` leaves exactly the state
    # of never having fed the last n tokens (what speculative decoding's verification needs). A cache
    # that cannot (it evicted or compressed) must raise on crop, never misbehave silently.
    rollback: ClassVar[bool] = False
    # Generation.kv_bytes is never above dense's for the same prompt and budget once it compresses.
    # False: it also counts a second model's cache (speculative decoding's draft), bounded instead
    # by dense's bytes for each model it holds a cache of.
    kv_within_dense: ClassVar[bool] = True
    # Example configurations, exercised by the contract test on a 160-token prompt and 8 new tokens:
    # "covers" keeps every token of that prompt and its generation (so greedy output equals dense's),
    # "compresses" (where meaningful) keeps clearly fewer KV bytes than dense. Values are written
    # with at most 4 significant digits, so that `label` round-trips them exactly.
    examples: ClassVar[dict[str, dict[str, Any]]] = {"covers": {}}
    # Seconds a trial of this family may run before the controller kills its actor (the spec's
    # `actors.trial_timeout_s: auto`): long enough for a first trial that also builds an artifact
    # on a CPU. After a finished trial, auto tightens it to 10x the technique's slowest.
    trial_timeout_s: ClassVar[float] = 3600.0
    # Per-sample statistics its generations add to a trial's rows (`Generation.stats` keys) beyond the
    # runner's own columns: a metric aggregated from them exists only for techniques that declare
    # them (`metrics.Needs.stats`; the spec refuses an objective no swept technique would report).
    reports: ClassVar[tuple[str, ...]] = ()
    # Decodes through the compiled static-shape step when asked (`generate(compiled=True)`):
    # `static_cache` turns its cache into fixed-size slot buffers after the prefill
    # (paretoray.actors.static_decode). False: it always decodes eagerly, and `static_note` says why.
    static_decode: ClassVar[bool] = False
    static_note: ClassVar[str] = ""
    # Compositions (techniques/compose.py: `outer+inner`, a technique built from techniques):
    # `provides` names what this technique can be to an outer one ("kv_cache": a KV cache chosen at
    # the prefill, handed on afterwards); `accepts` the kind of member it takes ("" : none);
    # `member_requires` the capability values its member must declare, each with the reason;
    # `member_shapes_output`: the member changes what this technique outputs (kv_quant stores the
    # member's entries) rather than only how fast it gets there (self_spec drafts over it).
    # `decode_evicts`: its cache drops entries while decoding (H2O, StreamingLLM's ring, MoA's spans).
    # `scores_per_head`: it is a prompt compressor whose `layer_budget` and `prefill_scores` give each
    # layer's budget and one score per position and KV head (kv_compression.PromptCompression), which
    # an outer technique may select from itself (adakv's budgets across heads).
    provides: ClassVar[tuple[str, ...]] = ()
    accepts: ClassVar[str] = ""
    member_requires: ClassVar[dict[str, tuple[Any, str]]] = {}
    member_shapes_output: ClassVar[bool] = True
    decode_evicts: ClassVar[bool] = False
    scores_per_head: ClassVar[bool] = False
    # Serves `query_placement: context_only` (the context prefilled, then the question); False: the
    # spec refuses that placement for it, with `context_only_note` as the reason.
    context_only: ClassVar[bool] = True
    context_only_note: ClassVar[str] = ""
    # Its cache takes a question after the context only one token per forward (a per-head ring
    # that appends as it decodes): the prefill feeds it so; the outputs are those of one chunk.
    question_by_token: ClassVar[bool] = False
    # Decodes B sequences together (`generate_batch`, the workload's batch_size > 1), each exactly as
    # it would alone. False: the spec refuses batch_size > 1 for it, giving `batch_note` as the reason.
    batched: ClassVar[bool] = False
    batch_note: ClassVar[str] = "decodes one sequence at a time"

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The class-level flags sweeps are checked against, as plain data (what
        `paretoray.actors.declarations` keeps without torch; flags that depend on an instance's
        parameters, as snapkv's kv_within_dense, are not among them).
        `measures_fidelity`: the runner teacher-forces dense's continuation through it when the
        workload asks for fidelity (the reference scores 1 by definition; a lossless technique's
        argmax is dense's, so nothing is measured and it reports no fidelity)."""
        return {
            "uses_model": cls.uses_model,
            "needs_draft": cls.needs_draft,
            "lossless": cls.lossless,
            "is_reference": cls.is_reference,
            "measures_fidelity": cls.is_reference or not cls.lossless,
            "reports": list(cls.reports),
            "trial_timeout_s": float(cls.trial_timeout_s),
            "static_decode": cls.static_decode,
            "provides": list(cls.provides),
            "accepts": cls.accepts,
            "member_requires": {key: list(value) for key, value in cls.member_requires.items()},
            "member_shapes_output": cls.member_shapes_output,
            "decode_evicts": cls.decode_evicts,
            "scores_per_head": cls.scores_per_head,
            "context_only": cls.context_only,
            "context_only_note": cls.context_only_note,
            "batched": cls.batched,
            "batch_note": "" if cls.batched else cls.batch_note,
        }

    def __post_init__(self) -> None:
        problems = [f"{key}: {why}" for key, spec in self.params.items() if (why := spec.check(getattr(self, key)))]
        if problems:
            raise ValueError(f"{self.name}: " + "; ".join(problems))

    @property
    def label(self) -> str:
        """A name that records the configuration, for run names and plot legends."""
        def show(value: Any) -> str:
            return f"{value:.4g}" if isinstance(value, float) else str(value)

        args = ",".join(f"{key}={show(getattr(self, key))}" for key in self.params)
        return f"{self.name}({args})" if args else self.name

    def measure_without_model(self) -> dict[str, float]:
        """The metrics of a technique that does no model work (`uses_model = False`)."""
        raise NotImplementedError(f"{self.name} uses the model; the runner measures it by generating")

    def prepare(self, model: PreTrainedModel, served_lengths: list[int]) -> None:
        """Called once per trial before any generation, with the prompt lengths (tokens) the trial
        will serve: a technique whose configuration depends on them (MoA's plan) fetches it here."""

    def prepare_for_prompt(self, model: PreTrainedModel, prompt_len: int) -> None:
        """Called before each generation outside inference mode, with its prompt's length: what
        `applied` needs for that prompt (MoA's spans for the length) is fetched here. An outer
        technique calls it for its member before using the member's `applied`."""

    def new_cache(self, model: PreTrainedModel) -> Cache:
        """The KV cache this technique decodes with; the default is the full (dense) cache."""
        return DynamicCache(config=model.config)

    def static_cache(self, model: PreTrainedModel, cache: Cache, steps: int, release: bool = False):
        """This technique's cache after the prefill as a `StaticDecodeCache` with room for `steps`
        more tokens, or None to decode eagerly (a state the static rules cannot continue exactly).
        The default converts every layer that offers `to_static(steps)`. `release`: free each eager
        layer once converted (the eager cache is not used again)."""
        from paretoray.actors.static_decode import convert

        if not self.static_decode or not cache.layers or any(not hasattr(layer, "to_static") for layer in cache.layers):
            return None
        return convert(model, cache, lambda layer: layer.to_static(steps), release)

    @torch.inference_mode()
    def generate(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: set[int] | None = None,
        forced_tokens: list[int] | None = None,
        question_ids: torch.Tensor | None = None,
        compiled: bool = False,
    ) -> Generation:
        """Greedy prefill + decode with this technique's cache (see `generation.greedy_generate`).

        `question_ids` given: `input_ids` is the context only, prefilled before the question.
        `compiled`: decode through the compiled static-shape step where the technique declares it
        can (`static_decode`); the prefill, with its scoring and compression hooks, stays eager.
        """
        from paretoray.actors import static_decode

        device = input_ids.device
        steps = len(forced_tokens) if forced_tokens is not None else max_new_tokens
        static = None
        with self.applied(model) as cache:
            first, prefill_s = prefill(model, input_ids, cache, question_ids, self.question_by_token)
            if compiled:
                static = self.static_cache(model, cache, steps, release=True)
            if static is None:
                tokens, step_s, warmup_s, agree = decode(
                    eager_step(model, cache), first, steps, device, eos_token_ids, forced_tokens)
                kv_bytes = cache_nbytes(cache)
        if static is not None:  # the technique's hooks are off now: the step sees only the static cache
            del cache
            with static_decode.static_attention_installed(model):
                tokens, step_s, warmup_s, agree = decode(
                    static_decode.compiled_step(model, static), first, steps, device, eos_token_ids, forced_tokens,
                    unmeasured=static_decode.warmup_watch(device))
            kv_bytes = cache_nbytes(static)
        return Generation(
            tokens=tokens,
            prefill_s=prefill_s,
            step_s=step_s,
            kv_bytes=kv_bytes,
            agreement=(agree / steps) if forced_tokens is not None and steps else None,
            compiled=static is not None,
            warmup_s=warmup_s,
        )

    @torch.inference_mode()
    def generate_batch(
        self,
        model: PreTrainedModel,
        prompts: list[torch.Tensor],
        max_new_tokens: int | list[int],
        eos_token_ids: set[int] | None = None,
        question_ids: list[torch.Tensor | None] | None = None,
        compiled: bool = False,
    ) -> BatchGeneration:
        """B sequences decoded together, each exactly as `generate` decodes it alone (greedy).

        prompts: B tensors [1, L_i] of any lengths (`question_ids`: B questions, each prompt then
        being its context alone, or None for a sequence prefilled whole); max_new_tokens: one
        budget, or one per sequence. Each sequence is prefilled alone with the technique applied (its
        scores, budgets and evictions are its own: no padding reaches a hook), its cache converted
        to static slots, and the B caches stacked into one of B rows (`static_decode.stack`: a row
        padded with disabled slots, each at its own position). Every step then decodes all B:
        through the compiled step when `compiled`, else the same step run eagerly. Needs
        `batched` (every batched technique decodes statically).
        """
        from paretoray.actors import static_decode

        if not self.batched:
            raise ValueError(f"{self.name} cannot decode a batch: {self.batch_note}")
        if question_ids is not None and len(question_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(question_ids)} questions")
        device = prompts[0].device
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        caches, firsts, prefill_s, alone = [], [], [], []
        for i, input_ids in enumerate(prompts):
            with self.applied(model) as cache:
                first, seconds = prefill(model, input_ids, cache, None if question_ids is None else question_ids[i],
                                         self.question_by_token)
                static = self.static_cache(model, cache, budgets[i], release=True)
            if static is None:
                raise ValueError(f"{self.name}: sequence {i} ({input_ids.shape[-1]} tokens) cannot continue on static "
                                 "slots, which a batch decodes with")
            del cache
            caches.append(static)
            firsts.append(first)
            prefill_s.append(seconds)
            alone.append(cache_nbytes(static))
        batch = static_decode.stack(model, caches)
        del caches
        with static_decode.static_attention_installed(model):
            tokens, step_s, active, warmup_s = decode_batch(
                static_decode.compiled_step(model, batch, compile=compiled), firsts, budgets, device, eos_token_ids,
                unmeasured=static_decode.warmup_watch(device) if compiled else None)
        return BatchGeneration(tokens=tokens, prefill_s=prefill_s, step_s=step_s, active=active,
                               kv_bytes=cache_nbytes(batch), kv_bytes_alone=alone,
                               stats=[{} for _ in prompts], compiled=compiled, warmup_s=warmup_s)

    @contextmanager
    def applied(self, model: PreTrainedModel) -> Iterator[Cache]:
        """The technique installed on `model` for one generation; always removed afterwards.

        The default installs nothing and yields a fresh cache; techniques that hook the model
        (to score attention at prefill, say) add their hooks here and remove them in `finally`.
        """
        yield self.new_cache(model)
