"""The sweep spec: YAML declares, pydantic validates at the boundary, frozen values inside.

Structure is checked by pydantic (strict, no unknown keys); meaning is checked against the
registries: technique names and their declared parameter ranges, metric names and their
directions, workload task names. Every error names the file, the field path and what was expected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from paretoray.actors.metrics import metric_direction, metric_names
from paretoray.actors.tasks import task_class
from paretoray.actors.techniques import Param, available_techniques
from paretoray.actors.workload import Workload


class SpecError(ValueError):
    """An invalid sweep file: every problem with its field path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source, self.problems = source, problems
        lines = [f"{source}: invalid sweep spec ({len(problems)} problem{'s' if len(problems) != 1 else ''})"]
        lines += [f"  {path or '<file>'}: {message}" for path, message in problems]
        super().__init__("\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSpec(_Strict):
    id: str = Field(description="registry name (smollm2-135m), local directory, or Hugging Face id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "sdpa"
    draft: str | None = Field(None, description="draft model for speculative techniques (same tokenizer): registry name (smollm2-135m-draft, built on first use), path or hub id")


# The workload section: the settings every task shares, plus the task's own (validated by `validate`
# against the task's Config, so errors name `workload.FIELD`). One definition, read by the runner too.
WorkloadSpec = Workload


class SamplerSpec(_Strict):
    name: Literal["nsga2", "tpe", "gp", "random", "grid"] = "nsga2"
    seed: int | None = 0
    population_size: int | None = Field(None, ge=2, description="nsga2 only")
    n_startup_trials: int | None = Field(None, ge=1, description="tpe and gp only")


class ActorsSpec(_Strict):
    count: int = Field(1, ge=1)
    num_gpus: float = Field(
        0.0, ge=0,
        description="GPUs per actor: a fraction (0.25) packs small models on one GPU; a whole number > 1 reserves "
        "that many GPUs on one node as a placement group",
    )
    num_cpus: float = Field(1.0, gt=0)
    spread: bool = Field(False, description="place actors on as many nodes as possible (Ray's SPREAD strategy)")
    max_trial_retries: int = Field(
        1, ge=0, le=10, description="times a trial whose actor died is sent to another actor before it is recorded failed"
    )

    @field_validator("num_gpus")
    @classmethod
    def _whole_gpus_above_one(cls, gpus: float) -> float:
        # Ray can share one GPU between actors, but cannot give an actor a GPU and a part of another.
        if gpus > 1 and not float(gpus).is_integer():
            raise ValueError(f"above 1, GPUs per actor must be a whole number (a fraction only packs actors on one GPU), got {gpus}")
        return gpus


class SweepSpec(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: ModelSpec
    workload: WorkloadSpec
    techniques: dict[str, dict[str, Any]] = Field(min_length=1)
    objectives: dict[str, Literal["minimize", "maximize"]] = Field(min_length=1)
    constraints: list[str] = []
    sampler: SamplerSpec = SamplerSpec()
    trials: int = Field(ge=1)
    actors: ActorsSpec = ActorsSpec()

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: ModelSpec) -> ModelSpec:
        from paretoray.actors.models import looks_like_path, registry_names

        for ref in (model.id, model.draft):
            if ref and ref not in registry_names() and looks_like_path(ref) and not Path(ref).expanduser().is_dir():
                raise ValueError(f"no such model directory {ref!r}; registry names: {', '.join(registry_names())}")
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
                problems.append((f"{path}.log", f"expected true or false, got {log!r}"))
                ok = False
            if ok and entry["low"] > entry["high"]:
                problems.append((path, f"low ({entry['low']}) must not exceed high ({entry['high']})"))
                ok = False
            if ok and log and entry["low"] <= 0:
                problems.append((f"{path}.low", f"a log-scale range needs low > 0, got {entry['low']}"))
                ok = False
            if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
                problems.append((f"{path}.step", f"expected a positive number, got {step!r}"))
                ok = False
            if ok and step is not None and log:
                problems.append((path, "use either log or step, not both"))
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


def search_space(spec: SweepSpec) -> dict[str, list[Dimension]]:
    """Each technique's dimensions, checked against what the technique declares."""
    problems: list[tuple[str, str]] = []
    registry = available_techniques()
    space: dict[str, list[Dimension]] = {}
    for technique, body in spec.techniques.items():
        if technique not in registry:
            problems.append((f"techniques.{technique}", f"unknown technique; available: {', '.join(registry)}"))
            continue
        declared = registry[technique].params
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
        space[technique] = dims
    if problems:
        raise SpecError("<spec>", problems)
    return space


def constraints(spec: SweepSpec) -> list[Constraint]:
    parsed, problems = [], []
    for i, text in enumerate(spec.constraints):
        match = _CONSTRAINT.match(text)
        if not match:
            problems.append((f"constraints[{i}]", f"expected 'METRIC >= NUMBER' or 'METRIC <= NUMBER', got {text!r}"))
            continue
        metric, op, bound = match.groups()
        if metric_direction(metric) is None:
            problems.append((f"constraints[{i}]", f"unknown metric {metric!r}; available: {', '.join(metric_names())}"))
            continue
        parsed.append(Constraint(metric, op, float(bound)))  # type: ignore[arg-type]
    if problems:
        raise SpecError("<spec>", problems)
    return parsed


def _check_objectives(spec: SweepSpec) -> list[tuple[str, str]]:
    problems = []
    registry = available_techniques()
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
        if name == "fidelity" and not spec.workload.fidelity:
            problems.append((f"objectives.{name}", "needs workload.fidelity: true"))
    return problems


def _check_task(spec: SweepSpec) -> list[tuple[str, str]]:
    """The task's own settings against its Config, then its input files (read, not tokenized)."""
    workload = spec.workload
    try:
        config = task_class(workload.task).Config.model_validate(workload.task_settings())
    except ValidationError as error:
        return _pydantic_problems(error, prefix="workload.")
    task = task_class(workload.task)(config)
    if task.budgets_per_sample and workload.max_new_tokens is not None:
        return [("workload.max_new_tokens", f"task {task.name!r} takes a budget per entry (tasks.NAME.max_new_tokens), "
                 "not one for the whole workload")]
    return [(f"workload.{field}" if field else "workload", message) for field, message in task.check()]


def validate(spec: SweepSpec, source: str = "<spec>") -> SweepSpec:
    """Semantic checks; raises SpecError with every problem found."""
    problems = _check_task(spec) + _check_objectives(spec)
    for check in (search_space, constraints):
        try:
            check(spec)
        except SpecError as error:
            problems += error.problems
    if problems:
        raise SpecError(source, problems)
    return spec


def _yaml_problem(error: yaml.YAMLError) -> tuple[str, str]:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return where, f"not valid YAML: {getattr(error, 'problem', None) or error}"


def parse(data: Any, source: str, default_name: str | None = None) -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(source, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    if default_name and "name" not in data:
        data = {**data, "name": default_name}
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
            message += f" (got {str(repr(item['input']))[:200]})"
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append((path.rstrip("."), message))
    return problems


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML; the sweep's name defaults to the file's stem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(str(path), [("", f"cannot read the file: {error.strerror or error}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(str(path), [_yaml_problem(error)]) from None
    return parse(data, str(path), default_name=path.stem)
