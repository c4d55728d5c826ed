"""The metrics a trial reports: each one registry entry with its direction and its aggregation.

A trial is measured as a table of per-sample rows (scores, paired timings, bytes, counters);
`aggregate` turns the rows into the trial's metrics, with 95% intervals where an entry asks for
one (`paretoray.actors.stats`). Objectives and constraints in a sweep name these metrics (or an
interval bound, `accuracy_ci_low`); Optuna's directions come from here. Nothing here imports torch:
the spec validator reads this registry. How time and memory are read lives in `measure.py`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from paretoray.actors import stats


Row = dict[str, Any]  # one sample's measurements (the per-sample table of a trial)


def _values(rows: list[Row], column: str) -> list[float]:
    return [float(r[column]) for r in rows if r.get(column) is not None and math.isfinite(float(r[column]))]


@dataclass(frozen=True)
class Mean:
    """Mean of a per-sample column; interval: Wilson for 0/1 values, bootstrap otherwise."""

    column: str
    interval: bool = False

    def __call__(self, rows: list[Row]) -> float | None:
        values = _values(rows, self.column)
        return sum(values) / len(values) if values else None

    def bounds(self, rows: list[Row]) -> tuple[float, float] | None:
        return stats.mean_interval(_values(rows, self.column)) if self.interval else None


@dataclass(frozen=True)
class Median:
    """Median of a per-sample column; interval: order statistics (distribution-free)."""

    column: str
    interval: bool = False

    def __call__(self, rows: list[Row]) -> float | None:
        values = _values(rows, self.column)
        return statistics.median(values) if values else None

    def bounds(self, rows: list[Row]) -> tuple[float, float] | None:
        return stats.median_interval(_values(rows, self.column)) if self.interval else None


@dataclass(frozen=True)
class Max:
    column: str
    scale: float = 1.0

    def __call__(self, rows: list[Row]) -> float | None:
        values = _values(rows, self.column)
        return max(values) * self.scale if values else None

    def bounds(self, rows: list[Row]) -> None:
        return None


@dataclass(frozen=True)
class RatioOfMeans:
    """mean(numerator) / mean(denominator) over the same samples; interval: paired bootstrap."""

    numerator: str
    denominator: str
    interval: bool = False

    def _pairs(self, rows: list[Row]) -> tuple[list[float], list[float]]:
        kept = [r for r in rows if r.get(self.numerator) is not None and r.get(self.denominator) is not None
                and math.isfinite(float(r[self.numerator])) and math.isfinite(float(r[self.denominator]))]
        return [float(r[self.numerator]) for r in kept], [float(r[self.denominator]) for r in kept]

    def __call__(self, rows: list[Row]) -> float | None:
        num, den = self._pairs(rows)
        if not num or sum(den) == 0:
            return None
        return (sum(num) / len(num)) / (sum(den) / len(den))

    def bounds(self, rows: list[Row]) -> tuple[float, float] | None:
        return stats.ratio_of_means_interval(*self._pairs(rows)) if self.interval else None


@dataclass(frozen=True)
class RatioOfSums:
    """sum(numerators) / sum(denominator) (counters: accepted / drafted); absent when the denominator is 0."""

    numerators: tuple[str, ...]
    denominator: str
    offset: float = 0.0  # subtracted from each row's denominator (the prefill's token)

    def __call__(self, rows: list[Row]) -> float | None:
        used = [r for r in rows if r.get(self.denominator) is not None]
        den = sum(float(r[self.denominator]) - self.offset for r in used)
        if not used or den <= 0 or any(r.get(c) is None for r in used for c in self.numerators):
            return None
        return sum(float(r[c]) for r in used for c in self.numerators) / den

    def bounds(self, rows: list[Row]) -> None:
        return None


@dataclass(frozen=True)
class Reciprocal:
    """scale / median(column): tokens/s from ms/token."""

    column: str
    scale: float = 1000.0

    def __call__(self, rows: list[Row]) -> float | None:
        value = Median(self.column)(rows)
        return self.scale / value if value else None

    def bounds(self, rows: list[Row]) -> None:
        return None


Aggregation = Mean | Median | Max | RatioOfMeans | RatioOfSums | Reciprocal


@dataclass(frozen=True)
class Needs:
    """What a trial must have for a metric to be reported at all (beyond samples that give a value).

    Read by the spec check: an objective or a constraint on a metric that one of the swept techniques
    would never report for the sweep's workload is refused before anything runs (`unproduced`).
    Every technique that runs the model reports the runner's shared columns (scores, timings, bytes,
    target calls); what more a metric needs is said here.
    """

    without_model: bool = False  # also returned by a technique that does no model work (`measure_without_model`)
    workload: tuple[str, ...] = ()  # workload switches that must be on (`fidelity`)
    capabilities: tuple[str, ...] = ()  # technique capability flags that must be true (`Technique.capabilities()`)
    stats: tuple[str, ...] = ()  # per-sample statistics the technique must declare in `Technique.reports`


# Why a capability is needed, in words (unproduced's messages).
_CAPABILITY_TEXT = {
    "measures_fidelity": "fidelity is measured only for lossy techniques and the reference: a lossless technique's "
    "output is dense's by construction",
}


@dataclass(frozen=True)
class Metric:
    """A figure a trial reports: its direction, and how a trial's per-sample rows combine into it.

    `aggregate` is None for metrics set directly by a technique that does no model work (noop).
    With `broken_down`, the value is also reported for each context length as `NAME/ctxN` and for
    each group of a suite (`NAME/GROUP`, e.g. `accuracy/variable_tracking`). `needs` says which
    techniques and workloads report it at all.
    """

    name: str
    higher_is_better: bool
    unit: str
    doc: str
    aggregate: Aggregation | None = None
    broken_down: bool = False
    needs: Needs = Needs()

    @property
    def direction(self) -> str:
        return "maximize" if self.higher_is_better else "minimize"

    @property
    def has_interval(self) -> bool:
        return bool(getattr(self.aggregate, "interval", False))


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", True, "fraction", "the task's score (exact match, recall, F1...), mean over samples, with a 95% interval",
               Mean("accuracy", interval=True), broken_down=True, needs=Needs(without_model=True)),
        Metric("dense_accuracy", True, "fraction", "the dense model's accuracy on the same samples, measured in the same trial",
               Mean("dense_accuracy"), broken_down=True),
        Metric("relative_accuracy", True, "x", "accuracy / dense_accuracy on the same samples (paired bootstrap interval)",
               RatioOfMeans("accuracy", "dense_accuracy", interval=True)),
        Metric("fidelity", True, "fraction", "teacher-forced next-token agreement with the dense model's continuation",
               Mean("fidelity", interval=True), needs=Needs(workload=("fidelity",), capabilities=("measures_fidelity",))),
        Metric("output_match", True, "fraction", "samples whose generated tokens equal the dense model's own greedy output",
               Mean("output_match")),
        Metric("latency_ms_per_token", False, "ms", "median over samples of each sample's median decode step (first token excluded)",
               Median("latency_ms_per_token"), needs=Needs(without_model=True)),
        Metric("dense_latency_ms_per_token", False, "ms", "the same for dense, timed back to back with the technique",
               Median("dense_latency_ms_per_token")),
        Metric("ttft_ms", False, "ms", "median time to first token (prefill) over samples", Median("ttft_ms"), broken_down=True),
        Metric("dense_ttft_ms", False, "ms", "the same for dense, timed back to back with the technique", Median("dense_ttft_ms")),
        Metric("tokens_per_s", True, "tokens/s", "per sequence: 1000 / latency_ms_per_token (in a batch, each "
               "sequence gets one token per batch step)", Reciprocal("latency_ms_per_token"),
               needs=Needs(without_model=True)),
        Metric("throughput_tokens_s", True, "tokens/s", "total decode throughput at the workload's batch_size: "
               "tokens given to unfinished sequences over the batch's measured step time; median over samples of "
               "their batch's value (a length's smaller last batch left out)", Median("batch_tokens_per_s")),
        Metric("dense_throughput_tokens_s", True, "tokens/s", "the same for dense, the same batches timed back to back",
               Median("dense_batch_tokens_per_s")),
        Metric("throughput_speedup", True, "x", "median over samples of their batch's paired ratio technique total "
               "tokens/s / dense's at the same batch size, with a distribution-free 95% interval",
               Median("throughput_speedup", interval=True)),
        Metric("kv_cache_mb", False, "MiB", "largest KV cache physically held at the end of a sample's generation "
               "(in a batch: the sequence's own slots, as alone)", Max("kv_cache_bytes", scale=1 / 2**20)),
        Metric("batch_kv_cache_mb", False, "MiB", "largest KV cache a batch holds: every sequence's slots, each row "
               "padded to the batch's largest (batch_size 1: kv_cache_mb)", Max("batch_kv_cache_bytes", scale=1 / 2**20)),
        Metric("kv_density", False, "fraction", "sparse attention (moa, uniform_window): KV entries kept / dense entries "
               "at each sample's prompt length, over all layers and KV heads; mean over samples (per length: kv_density/ctxN)",
               Mean("kv_density"), broken_down=True, needs=Needs(stats=("kv_density",))),
        Metric("peak_memory_mb", False, "MiB", "CUDA max allocated on GPU, process peak RSS on CPU (largest sample)",
               Max("peak_memory_mb")),
        Metric("speedup", True, "x", "median over samples of the paired ratio dense ms/token / technique ms/token "
               "(back to back in one actor), with a distribution-free 95% interval", Median("speedup", interval=True),
               broken_down=True),
        Metric("ttft_speedup", True, "x", "median over samples of the paired ratio dense TTFT / technique TTFT",
               Median("ttft_speedup", interval=True)),
        Metric("acceptance_rate", True, "fraction", "speculative: draft tokens accepted / draft tokens proposed",
               RatioOfSums(("accepted",), "drafted"), broken_down=True, needs=Needs(stats=("accepted", "drafted"))),
        Metric("tokens_per_target_call", True, "tokens", "speculative: tokens committed per verification, bonus or resampled token included",
               RatioOfSums(("accepted", "target_calls"), "target_calls"), needs=Needs(stats=("accepted",))),
        Metric("target_calls_per_token", False, "calls", "target forwards per generated token after the first (autoregressive: 1)",
               RatioOfSums(("target_calls",), "new_tokens", offset=1.0)),
        Metric("draft_calls_per_token", False, "calls", "speculative: draft forwards per generated token",
               RatioOfSums(("draft_calls",), "new_tokens", offset=1.0), needs=Needs(stats=("draft_calls",))),
        Metric("reconstruction_s", False, "s", "query-agnostic scoring by reconstruction (kvzip): median time per sample "
               "spent feeding the context again to score it, inside ttft_ms", Median("reconstruction_s"),
               needs=Needs(stats=("reconstruction_s",))),
    ]
}

INTERVAL_SUFFIXES = ("_ci_low", "_ci_high")


def metric_names() -> list[str]:
    """Every name a sweep may use as an objective or constraint: metrics and their interval bounds."""
    names = list(METRICS)
    names += [f"{m.name}{suffix}" for m in METRICS.values() if m.has_interval for suffix in INTERVAL_SUFFIXES]
    return names


def metric_direction(name: str) -> str | None:
    """maximize/minimize for a metric or one of its interval bounds; None for unknown names."""
    for suffix in INTERVAL_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in METRICS:
            return METRICS[base].direction if METRICS[base].has_interval else None
    base, slash, part = name.partition("/")
    metric = METRICS.get(base)
    if metric is None or (slash and not (metric.broken_down and part and not part.endswith(INTERVAL_SUFFIXES))):
        return None  # a breakdown (accuracy/ctx1024, accuracy/niah) exists only for broken-down metrics
    return metric.direction


def _parts(name: str) -> tuple[Metric | None, str, str]:
    """(registry entry, interval suffix, breakdown part) of a metric name; no entry when unknown."""
    for suffix in INTERVAL_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
            return METRICS[name.removesuffix(suffix)], suffix, ""
    base, _, part = name.partition("/")
    return METRICS.get(base), "", part


def unproduced(name: str, capabilities: dict[str, Any], workload: Any, task: Any = None) -> str | None:
    """Why a technique with these `capabilities` (`Technique.capabilities()`) never reports metric
    `name` on `workload`, or None when it does (given samples that yield a value). With the configured
    `task`, a breakdown (`NAME/ctxN`, `NAME/GROUP`) must also name one of its lengths or groups.
    Unknown names are `metric_direction`'s to refuse: None here."""
    metric, suffix, part = _parts(name)
    if metric is None:
        return None
    needs = metric.needs
    if not capabilities.get("uses_model", True):
        reported = [m.name for m in METRICS.values() if m.needs.without_model]
        if suffix or part or not needs.without_model:
            return f"a technique that does no model work reports only {', '.join(reported)}"
        return None
    for switch in needs.workload:
        if not getattr(workload, switch, False):
            return f"needs workload.{switch}: true"
    for flag in needs.capabilities:
        if not capabilities.get(flag):
            return _CAPABILITY_TEXT.get(flag, f"needs a technique with {flag}")
    missing = [stat for stat in needs.stats if stat not in capabilities.get("reports", ())]
    if missing:
        return f"needs per-sample {', '.join(missing)}, which the technique does not report"
    if part and task is not None:
        lengths = [f"ctx{n}" for n in task.context_lengths] if task.has_lengths else []
        known = lengths + list(getattr(task, "groups", []))
        if part not in known:
            return f"no breakdown {part!r} in this workload" + (f" (it has {', '.join(known)})" if known else "")
    return None


def aggregate(rows: list[Row], lengths: list[int] | None = None) -> dict[str, float]:
    """A trial's metrics from its per-sample rows, each as its registry entry says."""
    out: dict[str, float] = {}
    for metric in METRICS.values():
        if metric.aggregate is None:
            continue
        value = metric.aggregate(rows)
        if value is None:
            continue
        out[metric.name] = value
        bounds = metric.aggregate.bounds(rows)
        if bounds is not None:
            out[f"{metric.name}_ci_low"], out[f"{metric.name}_ci_high"] = bounds
        if metric.broken_down:
            parts = {f"ctx{length}": [r for r in rows if r.get("context_length") == length] for length in lengths or []}
            for group in dict.fromkeys(r["group"] for r in rows if r.get("group")):
                parts[group] = [r for r in rows if r.get("group") == group]
            for part_name, subset in parts.items():
                part = metric.aggregate(subset) if subset else None
                if part is not None:
                    out[f"{metric.name}/{part_name}"] = part
                    bounds = metric.aggregate.bounds(subset)
                    if bounds is not None:  # each length's and each suite entry's own interval
                        out[f"{metric.name}/{part_name}_ci_low"], out[f"{metric.name}/{part_name}_ci_high"] = bounds
    return out
