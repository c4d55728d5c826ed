"""The sweep spec: YAML declares, pydantic validates at the boundary, frozen values inside.

Structure is checked by pydantic (strict, no unknown keys); meaning is checked against the
registries: technique names and their declared parameter ranges, metric names and their
directions (and whether every swept technique reports them), workload task names, the model's
context window. Every error names the file, the field path and what was expected.

Every input gets an answer in bounded time and memory: the file is read up to `MAX_FILE_BYTES`
as UTF-8, YAML is read by a safe loader that refuses duplicate keys, nesting deeper than
`MAX_DEPTH`, more than `MAX_ALIASES` aliases and documents that expand beyond `MAX_NODES` nodes;
numbers must be finite and integers below 2**63 in magnitude; an error's text is capped. Nothing
here imports torch: technique declarations come from `paretoray.actors.declarations`.
"""

from __future__ import annotations

import codecs
import math
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from paretoray.actors.declarations import SEPARATOR, CompositionError, Param, composition_declaration, technique_declarations
from paretoray.actors.metrics import metric_direction, metric_names, unproduced
from paretoray.actors.tasks import task_class
from paretoray.actors.workload import BATCH_DIMENSION, BATCH_SIZE, Workload

MAX_FILE_BYTES = 1 << 20  # a sweep file is a few KB
MAX_DEPTH = 32  # nested mappings and lists
MAX_ALIASES = 64  # YAML aliases (*name) in one file
MAX_NODES = 10_000  # values in the document once every alias is expanded (a sweep has about 100)
MAX_INT = 2**63  # integers anywhere in a spec: |x| < MAX_INT
MAX_NAME = 100  # characters of a sweep's name
MAX_TRIALS = 100_000
MAX_SEED = 2**32 - 1  # what numpy's and Optuna's samplers take
MAX_GRID_POINTS = 1_000_000  # values of one stepped range
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# An error's text: at most this many problems, each line cut to this many characters.
MAX_PROBLEMS_SHOWN = 20
MAX_LINE = 400

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlong = 40
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6
_short.maxlevel = 3


def short_repr(value: Any) -> str:
    """repr of any input, bounded in length and in the time it takes (a nested or aliased structure too)."""
    try:
        return _short.repr(value)
    except Exception:  # a number too long for str(), say
        return f"<{type(value).__name__}>"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SpecError(ValueError):
    """An invalid sweep file: every problem with its field path. Its text is capped (a few KB)."""

    def __init__(self, source: str, problems: list[tuple[str, str]], kind: str = "invalid sweep spec"):
        self.source, self.problems = source, problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = [_cut(f"{source}: {kind} ({count})", MAX_LINE)]
        lines += [_cut(f"  {path or '<file>'}: {message}", MAX_LINE) for path, message in problems[:MAX_PROBLEMS_SHOWN]]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            lines.append(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        super().__init__("\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    id: str = Field(min_length=1, max_length=4096, description="registry name (smollm2-135m), local directory, or Hugging Face id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = Field("sdpa", max_length=100)
    draft: str | None = Field(None, min_length=1, max_length=4096, description="draft model for speculative techniques (same tokenizer): registry name (smollm2-135m-draft, built on first use), path or hub id")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="decode through a compiled static-shape step (torch.compile; CUDA graphs on a GPU), dense and "
        "every technique that declares it can; auto: on a GPU, and on a CPU when each actor's paired check finds "
        "it at least 10% faster per token. Compile time is recorded apart, never inside a measured step",
    )


# The workload section: the settings every task shares, plus the task's own (validated by `validate`
# against the task's Config, so errors name `workload.FIELD`). One definition, read by the runner too.
WorkloadSpec = Workload


class SamplerSpec(_Strict):
    name: Literal["nsga2", "tpe", "gp", "random", "grid"] = "nsga2"
    seed: int | None = Field(0, ge=0, le=MAX_SEED)
    population_size: int | None = Field(None, ge=2, le=MAX_TRIALS, description="nsga2 only")
    n_startup_trials: int | None = Field(None, ge=1, le=MAX_TRIALS, description="tpe and gp only")


class ActorsSpec(_Strict):
    count: int = Field(1, ge=1, le=4096)
    num_gpus: float = Field(
        0.0, ge=0, le=64,
        description="GPUs per actor: a fraction (0.25) packs small models on one GPU; a whole number > 1 reserves "
        "that many GPUs on one node as a placement group",
    )
    num_cpus: float = Field(1.0, gt=0, le=1024)
    spread: bool = Field(False, description="place actors on as many nodes as possible (Ray's SPREAD strategy)")
    trial_timeout_s: float | str = Field(
        "auto",
        description="seconds a trial may run before its actor is killed and replaced and the trial retried (then "
        "recorded failed 'timed out'); auto: each technique family's declared timeout until the technique has "
        "finished a trial in this sweep, then 10x its slowest (at least 300 s, at most the declared)",
    )
    max_trial_retries: int = Field(
        1, ge=0, le=10, description="times a trial whose actor died is sent to another actor before it is recorded failed"
    )

    @field_validator("trial_timeout_s")
    @classmethod
    def _timeout(cls, value: float | str) -> float | str:
        if isinstance(value, str):
            if value != "auto":
                raise ValueError(f"expected 'auto' or a number of seconds, got {value!r}")
            return value
        if not math.isfinite(value) or not 0 < value <= 7 * 86400:
            raise ValueError(f"expected a finite number of seconds greater than 0 and at most 604800 (a week), got {value!r}")
        return float(value)

    @field_validator("num_gpus")
    @classmethod
    def _whole_gpus_above_one(cls, gpus: float) -> float:
        # Ray can share one GPU between actors, but cannot give an actor a GPU and a part of another.
        if gpus > 1 and not float(gpus).is_integer():
            raise ValueError(f"above 1, GPUs per actor must be a whole number (a fraction only packs actors on one GPU), got {gpus}")
        return gpus


class SweepSpec(_Strict):
    name: str | None = Field(None, max_length=MAX_NAME, pattern=NAME_PATTERN)
    description: str = Field("", max_length=10_000)
    model: ModelSpec
    workload: WorkloadSpec
    techniques: dict[str, dict[str, Any]] = Field(min_length=1, max_length=64)
    objectives: dict[str, Literal["minimize", "maximize"]] = Field(min_length=1, max_length=16)
    constraints: list[str] = Field([], max_length=64)
    sampler: SamplerSpec = SamplerSpec()
    trials: int = Field(ge=1, le=MAX_TRIALS)
    actors: ActorsSpec = ActorsSpec()

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: ModelSpec) -> ModelSpec:
        from paretoray.actors.registry import is_local, looks_like_path, registry_names

        for ref in (model.id, model.draft):
            if ref and ref not in registry_names() and looks_like_path(ref) and not is_local(ref):
                raise ValueError(f"no such model directory {short_repr(ref)}; registry names: {', '.join(registry_names())}")
        return model

    @field_validator("techniques", mode="before")
    @classmethod
    def _empty_technique_body(cls, value: Any) -> Any:
        # `dense:` with nothing after it reads as None in YAML: it means "no parameters".
        if isinstance(value, dict):
            return {name: ({} if body is None else body) for name, body in value.items()}
        return value


@dataclass(frozen=True)
class Dimension:
    """One parameter of one technique as the sweep searches it."""

    name: str
    kind: Literal["fixed", "int", "float", "categorical"]
    value: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @property
    def is_finite(self) -> bool:
        return self.kind in ("fixed", "categorical") or self.step is not None or (self.kind == "int" and not self.log)

    @property
    def size(self) -> int | None:
        """How many values a grid over this dimension has (None: not a finite grid)."""
        if self.kind == "fixed":
            return 1
        if self.kind == "categorical":
            return len(self.choices)
        if not self.is_finite:
            return None
        return int((self.high - self.low) // (self.step or 1)) + 1


def grid_size(space: dict[str, list[Dimension]]) -> int | None:
    total = 0
    for dims in space.values():
        points = 1
        for dim in dims:
            if dim.size is None:
                return None
            points *= dim.size
        total += points
    return total


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: Literal[">=", "<="]
    bound: float

    def violation(self, metrics: dict[str, float]) -> float:
        """Optuna's convention: feasible when <= 0. A metric the trial did not produce (or NaN) makes it
        infeasible: never a crash (relative_accuracy is absent where dense scores 0, say)."""
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return math.inf
        return self.bound - value if self.op == ">=" else value - self.bound

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w/]*)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def _dimension(path: str, name: str, declared: Param, entry: Any, problems: list[tuple[str, str]]) -> Dimension | None:
    def checked(value: Any, where: str) -> bool:
        why = declared.check(value)
        if why:
            problems.append((where, f"{why} (allowed: {declared.describe()})"))
        return why is None

    if isinstance(entry, dict):
        keys = set(entry)
        if keys == {"choices"}:
            entry = entry["choices"]
        elif not keys <= {"low", "high", "log", "step"} or not {"low", "high"} <= keys:
            problems.append((path, "expected a value, a list of choices, {choices: [...]}, or {low, high[, log][, step]}"))
            return None
        else:
            if declared.kind == "categorical":
                problems.append((path, f"a categorical parameter takes choices, not a range (allowed: {declared.describe()})"))
                return None
            ok = checked(entry["low"], f"{path}.low") & checked(entry["high"], f"{path}.high")
            log = entry.get("log", declared.log)
            step = entry.get("step")
            if not isinstance(log, bool):
                problems.append((f"{path}.log", f"expected true or false, got {short_repr(log)}"))
                ok = False
            if ok and entry["low"] > entry["high"]:
                problems.append((path, f"low ({entry['low']}) must not exceed high ({entry['high']})"))
                ok = False
            if ok and log and entry["low"] <= 0:
                problems.append((f"{path}.low", f"a log-scale range needs low > 0, got {entry['low']}"))
                ok = False
            if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step)
                                     or step <= 0 or abs(step) >= MAX_INT):
                problems.append((f"{path}.step", f"expected a positive number, got {short_repr(step)}"))
                ok = False
            if ok and step is not None and log:
                problems.append((path, "use either log or step, not both"))
                ok = False
            if ok and step is not None and (entry["high"] - entry["low"]) / step + 1 > MAX_GRID_POINTS:
                problems.append((f"{path}.step", f"{step} makes more than {MAX_GRID_POINTS:,} values in [{entry['low']}, {entry['high']}]"))
                ok = False
            if not ok:
                return None
            return Dimension(name, declared.kind, low=entry["low"], high=entry["high"], log=log, step=step)
    if isinstance(entry, list):
        if not entry:
            problems.append((path, "an empty list of choices"))
            return None
        if all([checked(choice, f"{path}[{i}]") for i, choice in enumerate(entry)]):
            return Dimension(name, "categorical", choices=tuple(entry))
        return None
    if checked(entry, path):
        return Dimension(name, "fixed", value=entry)
    return None


def batch_dimension(spec: SweepSpec, problems: list[tuple[str, str]]) -> Dimension | None:
    """A swept `workload.batch_size` (a list or a range) as the dimension every technique's space gets."""
    if not spec.workload.swept_batch:
        return None
    dim = _dimension("workload.batch_size", BATCH_DIMENSION, BATCH_SIZE, spec.workload.batch_size, problems)
    if dim is not None and spec.sampler.name == "grid" and not dim.is_finite:
        problems.append(("workload.batch_size", "the grid sampler needs finite dimensions: give choices or a step"))
    return dim


def search_space(spec: SweepSpec) -> dict[str, list[Dimension]]:
    """Each technique's dimensions, checked against what the technique declares; a swept
    `workload.batch_size` is one more dimension of every technique (`workload.BATCH_DIMENSION`)."""
    problems: list[tuple[str, str]] = []
    batch = batch_dimension(spec, problems)
    registry = technique_declarations()
    space: dict[str, list[Dimension]] = {}
    for technique, body in spec.techniques.items():
        batched = True
        if "+" in technique:  # a composition: each member's parameters under the member's name
            try:
                composed = composition_declaration(technique, registry)
                declared, batched = composed.params, bool(composed.capabilities.get("batched", True))
            except CompositionError as error:
                problems.append((f"techniques.{technique}", str(error).partition(": ")[2]))
                continue
            members = technique.split("+")
            flat: dict[str, Any] = {}
            for member, member_body in body.items():
                if member not in members:
                    problems.append((f"techniques.{technique}.{member}", f"not a member; write each member's parameters "
                                     f"under its name: {', '.join(members)}"))
                elif member_body is not None and not isinstance(member_body, dict):
                    problems.append((f"techniques.{technique}.{member}", f"expected the member's parameters (a mapping), "
                                     f"got {short_repr(member_body)}"))
                else:
                    flat.update({f"{member}{SEPARATOR}{name}": entry for name, entry in (member_body or {}).items()})
            body = flat
        elif technique not in registry:
            problems.append((f"techniques.{technique}", f"unknown technique; available: {', '.join(registry)}"))
            continue
        else:
            declared = registry[technique].params
            batched = bool(registry[technique].capabilities.get("batched", True)) or not registry[technique].uses_model
        dims = []
        for name, entry in body.items():
            path = f"techniques.{technique}.{name}"
            if name not in declared:
                known = ", ".join(f"{k} ({p.describe()})" for k, p in declared.items()) or "none"
                problems.append((path, f"unknown parameter; {technique} declares: {known}"))
                continue
            dim = _dimension(path, name, declared[name], entry, problems)
            if dim is not None:
                dims.append(dim)
                if spec.sampler.name == "grid" and not dim.is_finite:
                    problems.append((path, "the grid sampler needs finite dimensions: give choices or a step"))
        if batch is not None and not batched and _allows_one(batch):
            dims.append(Dimension(BATCH_DIMENSION, "fixed", value=1))  # it decodes one sequence at a time (see notes)
        elif batch is not None:
            dims.append(batch)  # a technique that cannot batch and a range without 1: refused by _check_batch
        space[technique] = dims
    if problems:
        raise SpecError("<spec>", problems)
    return space


def constraints(spec: SweepSpec) -> list[Constraint]:
    parsed, problems = [], []
    for i, text in enumerate(spec.constraints):
        match = _CONSTRAINT.match(text) if len(text) <= 200 else None
        if not match:
            problems.append((f"constraints[{i}]", f"expected 'METRIC >= NUMBER' or 'METRIC <= NUMBER', got {short_repr(text)}"))
            continue
        metric, op, bound = match.groups()
        if metric_direction(metric) is None:
            problems.append((f"constraints[{i}]", f"unknown metric {short_repr(metric)}; available: {', '.join(metric_names())}"))
            continue
        if not math.isfinite(float(bound)):
            problems.append((f"constraints[{i}]", f"expected a finite bound, got {bound}"))
            continue
        parsed.append(Constraint(metric, op, float(bound)))  # type: ignore[arg-type]
    if problems:
        raise SpecError("<spec>", problems)
    return parsed


def _check_objectives(spec: SweepSpec) -> list[tuple[str, str]]:
    problems = []
    registry = technique_declarations(spec.techniques)
    needing = [name for name in spec.techniques if name in registry and registry[name].needs_draft]
    if needing and spec.model.draft is None:
        problems.append(("model.draft", f"{', '.join(needing)} need a draft model: set model: {{id: ..., draft: PATH}}"))
    for name, direction in spec.objectives.items():
        expected = metric_direction(name)
        if expected is None:
            problems.append((f"objectives.{name}", f"unknown metric; available: {', '.join(metric_names())}"))
        elif direction != expected:
            problems.append(
                (f"objectives.{name}", f"expected {expected} ({name} is {'higher' if expected == 'maximize' else 'lower'}-is-better), got {direction}")
            )
    return problems


def _check_produced(spec: SweepSpec, task: Any) -> list[tuple[str, str]]:
    """An objective or a constraint must name a metric that every swept technique reports on this
    workload (as the metric's registry entry declares): otherwise every trial of some technique would
    miss it (a KeyError, or a constraint no trial can meet)."""
    registry = technique_declarations(spec.techniques)
    swept = {name: registry[name] for name in spec.techniques if name in registry}
    named = [(f"objectives.{name}", name) for name in spec.objectives]
    for i, text in enumerate(spec.constraints):
        match = _CONSTRAINT.match(text) if len(text) <= 200 else None
        if match:
            named.append((f"constraints[{i}]", match.group(1)))
    problems = []
    for path, metric in named:
        if metric_direction(metric) is None:
            continue  # refused as unknown already
        missing: dict[str, list[str]] = {}
        for technique, declared in swept.items():
            why = unproduced(metric, declared.capabilities, spec.workload, task)
            if why:
                missing.setdefault(why, []).append(technique)
        for why, techniques in missing.items():
            problems.append((path, f"{metric} is never reported by {', '.join(techniques)}: {why}"))
    return problems


def _allows_one(dim: Dimension) -> bool:
    """Whether a batch-size dimension includes 1."""
    if dim.kind == "fixed":
        return dim.value == 1
    if dim.kind == "categorical":
        return 1 in dim.choices
    return dim.low <= 1 and (dim.step is None or float(1 - dim.low) % dim.step == 0)


def _unbatched(spec: SweepSpec) -> dict[str, str]:
    """Techniques of the sweep that cannot decode a batch, with the reason."""
    registry = technique_declarations(spec.techniques)
    return {name: registry[name].capabilities.get("batch_note") or "it decodes one sequence at a time"
            for name in spec.techniques
            if name in registry and registry[name].uses_model and not registry[name].capabilities.get("batched", True)}


def notes(spec: SweepSpec) -> list[str]:
    """What a valid sweep does that its YAML does not say outright (printed by validate and run)."""
    out = []
    if spec.workload.swept_batch:
        for name, why in _unbatched(spec).items():
            out.append(f"{name} runs at batch_size 1 only ({why})")
    return out


def _check_batch(spec: SweepSpec) -> list[tuple[str, str]]:
    """A batch size above 1 only for techniques that declare they decode batches (`batched`); a
    swept batch size that includes 1 runs those at 1 only (`notes` says so)."""
    largest = spec.workload.max_batch
    if largest <= 1:
        return []
    registry = technique_declarations(spec.techniques)
    problems = []
    for name in spec.techniques:
        declared = registry.get(name)
        if declared is None or not declared.uses_model or declared.capabilities.get("batched"):
            continue  # unknown: refused elsewhere; no model work: nothing to batch
        if spec.workload.swept_batch:
            dim = batch_dimension(spec, [])
            if dim is not None and _allows_one(dim):
                continue  # restricted to batch_size 1 in its space
        why = declared.capabilities.get("batch_note") or "it decodes one sequence at a time"
        problems.append(("workload.batch_size", f"{name} cannot decode a batch (batch_size up to {largest}): {why}"))
    return problems


def _check_window(spec: SweepSpec, task: Any) -> list[tuple[str, str]]:
    """Each requested context length plus its generation budget must fit the model's window (read from
    its config without loading it; unknown windows, a hub model not on this machine, are not checked)."""
    from paretoray.actors.registry import model_window

    requests = task.length_requests()
    window = model_window(spec.model.id) if requests else None
    if window is None:
        return []
    too_long: dict[tuple[str, int], list[int]] = {}
    for field, length, budget in requests:
        budget = spec.workload.max_new_tokens or budget
        if length + budget > window:
            too_long.setdefault((field, budget), []).append(length)
    return [(f"workload.{field}", f"{', '.join(map(str, lengths))} prompt tokens + {budget} new tokens exceed the context window of "
             f"{short_repr(spec.model.id)} ({window} tokens)") for (field, budget), lengths in too_long.items()]


def _check_task(spec: SweepSpec) -> tuple[list[tuple[str, str]], Any]:
    """The task's own settings against its Config, then its input files (read, not tokenized), then
    its lengths against the model's window. Returns the problems and the configured task (None if invalid)."""
    workload = spec.workload
    try:
        config = task_class(workload.task).Config.model_validate(workload.task_settings())
    except ValidationError as error:
        return _pydantic_problems(error, prefix="workload."), None
    task = task_class(workload.task)(config)
    if task.budgets_per_sample and workload.max_new_tokens is not None:
        return [("workload.max_new_tokens", f"task {task.name!r} takes a budget per entry (tasks.NAME.max_new_tokens), "
                 "not one for the whole workload")], task
    problems = [(f"workload.{field}" if field else "workload", message) for field, message in task.check()]
    return problems + _check_window(spec, task), task


def _check_placement(spec: SweepSpec) -> list[tuple[str, str]]:
    """context_only placement only for techniques that declare they serve it."""
    if spec.workload.query_placement != "context_only":
        return []
    registry = technique_declarations(spec.techniques)
    return [(f"techniques.{name}", f"{name} cannot serve query_placement: context_only: "
             f"{registry[name].capabilities.get('context_only_note') or 'it does not declare it'}")
            for name in spec.techniques if name in registry and not registry[name].capabilities.get("context_only", True)]


def validate(spec: SweepSpec, source: str = "<spec>") -> SweepSpec:
    """Semantic checks; raises SpecError with every problem found."""
    problems, task = _check_task(spec)
    problems += _check_objectives(spec)
    problems += _check_batch(spec)
    for check in (search_space, constraints):
        try:
            check(spec)
        except SpecError as error:
            problems += error.problems
    problems += _check_produced(spec, task)
    problems += _check_placement(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


def check_name(value: str, source: str = "--name") -> str:
    """A sweep name as the YAML's `name` takes it (it names folders and studies: no path may escape)."""
    problem = None
    if not isinstance(value, str) or not value:
        problem = "expected a non-empty name"
    elif len(value) > MAX_NAME:
        problem = f"at most {MAX_NAME} characters, got {len(value)}"
    elif not re.fullmatch(NAME_PATTERN, value):
        problem = f"expected letters, digits, '_', '.' or '-', starting with a letter or digit, got {short_repr(value)}"
    if problem:
        raise SpecError("command line", [(source, problem)], kind="invalid option")
    return value


def check_trials(value: int | None, source: str = "--trials") -> int | None:
    """A number of trials to reach (None: the spec's): 1 to MAX_TRIALS."""
    if value is not None and not 1 <= value <= MAX_TRIALS:
        raise SpecError("command line", [(source, f"expected 1 to {MAX_TRIALS:,} trials, got {value}")], kind="invalid option")
    return value


# ---- reading a file ---------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounds: nesting depth, aliases, expanded size; duplicate keys refused."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases (*name)", event.start_mark)
            return super().compose_node(parent, index)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES:,} values", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: keys written beside it override the merged ones, as YAML says
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                    if first is None:
                        seen[key] = key_node.start_mark.line
                except TypeError:
                    continue  # unhashable: refused by the base constructor
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)} (first at line {first + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Any) -> None:
    """Refuse documents whose aliases expand beyond MAX_NODES values, or refer to themselves."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the value it is inside of", node.start_mark)
        active.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        active.discard(id(node))
        if total > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand the document beyond {MAX_NODES:,} values", node.start_mark)
        sizes[id(node)] = total
        return total

    size(root)


def load_yaml(text: str) -> Any:
    """The document in `text`, read by the bounded safe loader (raises yaml.YAMLError)."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.YAMLError, text: str) -> tuple[str, str]:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}", f"not valid YAML: {getattr(error, 'problem', None) or error}"
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        what = f"character #x{error.character:04x}" if isinstance(error.character, int) else "a character"
        return f"line {line}", f"not valid YAML: {what} is not allowed ({error.reason})"
    return "", f"not valid YAML: {error}"


def read_spec_text(path: str | Path) -> str:
    """A sweep file's text: at most MAX_FILE_BYTES, UTF-8 (a leading byte-order mark is dropped)."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise SpecError(source, [("", f"cannot read the file: {error.strerror or error}")]) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(source, [("", f"larger than {MAX_FILE_BYTES // 1024} KiB: not a sweep file")])
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise SpecError(source, [("", "UTF-32 text (byte-order mark): save the file as UTF-8")])
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise SpecError(source, [("", "UTF-16 text (byte-order mark): save the file as UTF-8")])
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise SpecError(source, [(f"line {line}", f"not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start}; "
                                  "save the file as UTF-8")]) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise SpecError(source, [(f"line {line}", "a NUL byte: not a text file (UTF-16 without a byte-order mark?)")])
    return text


def _bounded_values(data: Any, path: str = "") -> list[tuple[str, str]]:
    """Integers below 2**63 in magnitude and finite floats, anywhere (before anything computes with them)."""
    problems: list[tuple[str, str]] = []
    stack = [(data, path)]
    while stack and len(problems) < MAX_PROBLEMS_SHOWN:
        value, where = stack.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not -MAX_INT < value < MAX_INT:
            problems.append((where, f"integer out of range (|x| < 2**63), got {short_repr(value)}"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((where, f"expected a finite number, got {value}"))
        elif isinstance(value, dict):
            stack += [(item, f"{where}.{key}" if where else str(key)) for key, item in reversed(value.items())]
        elif isinstance(value, (list, tuple)):
            stack += [(item, f"{where}[{i}]") for i, item in reversed(list(enumerate(value)))]
    return problems


def parse(data: Any, source: str, default_name: str | None = None) -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(source, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    if default_name and "name" not in data:
        data = {**data, "name": default_name}
    problems = _bounded_values(data)
    if problems:
        raise SpecError(source, problems)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(source, _pydantic_problems(error)) from None
    return validate(spec, source)


def _pydantic_problems(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        path = prefix + ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("missing", "extra_forbidden") and "input" in item:
            message += f" (got {short_repr(item['input'])})"
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append((path.rstrip("."), message))
    return problems


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML; the sweep's name defaults to the file's stem. Whatever the file
    holds, the answer is a spec or a SpecError naming the file, in bounded time and memory."""
    path = Path(path)
    text = read_spec_text(path)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as error:
        raise SpecError(str(path), [_yaml_problem(error, text)]) from None
    except RecursionError:
        raise SpecError(str(path), [("", "not valid YAML: nested too deeply")]) from None
    except Exception as error:  # a constructor's own error: !!int 0x_, a date that does not exist, too many digits
        raise SpecError(str(path), [("", f"not valid YAML: {type(error).__name__}: {error}")]) from None
    try:
        return parse(data, str(path), default_name=path.stem)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(str(path), [("", "nested too deeply")]) from None
    except Exception as error:  # anything unforeseen is still an answer about this file, never a traceback
        raise SpecError(str(path), [("", f"could not be validated: {type(error).__name__}: {error}")]) from None
