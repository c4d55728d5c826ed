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
class Metric:
    """A figure a trial reports: its direction, and how a trial's per-sample rows combine into it.

    `aggregate` is None for metrics set directly by a technique that does no model work (noop).
    With `broken_down`, the value is also reported for each context length as `NAME/ctxN` and for
    each group of a suite (`NAME/GROUP`, e.g. `accuracy/variable_tracking`).
    """

    name: str
    higher_is_better: bool
    unit: str
    doc: str
    aggregate: Aggregation | None = None
    broken_down: bool = False

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
               Mean("accuracy", interval=True), broken_down=True),
        Metric("dense_accuracy", True, "fraction", "the dense model's accuracy on the same samples, measured in the same trial",
               Mean("dense_accuracy"), broken_down=True),
        Metric("relative_accuracy", True, "x", "accuracy / dense_accuracy on the same samples (paired bootstrap interval)",
               RatioOfMeans("accuracy", "dense_accuracy", interval=True)),
        Metric("fidelity", True, "fraction", "teacher-forced next-token agreement with the dense model's continuation",
               Mean("fidelity", interval=True)),
        Metric("output_match", True, "fraction", "samples whose generated tokens equal the dense model's own greedy output",
               Mean("output_match")),
        Metric("latency_ms_per_token", False, "ms", "median over samples of each sample's median decode step (first token excluded)",
               Median("latency_ms_per_token")),
        Metric("dense_latency_ms_per_token", False, "ms", "the same for dense, timed back to back with the technique",
               Median("dense_latency_ms_per_token")),
        Metric("ttft_ms", False, "ms", "median time to first token (prefill) over samples", Median("ttft_ms"), broken_down=True),
        Metric("dense_ttft_ms", False, "ms", "the same for dense, timed back to back with the technique", Median("dense_ttft_ms")),
        Metric("tokens_per_s", True, "tokens/s", "1000 / latency_ms_per_token", Reciprocal("latency_ms_per_token")),
        Metric("kv_cache_mb", False, "MiB", "largest KV cache physically held at the end of a sample's generation",
               Max("kv_cache_bytes", scale=1 / 2**20)),
        Metric("kv_density", False, "fraction", "sparse attention (moa, uniform_window): KV entries kept / dense entries "
               "at each sample's prompt length, over all layers and KV heads; mean over samples (per length: kv_density/ctxN)",
               Mean("kv_density"), broken_down=True),
        Metric("peak_memory_mb", False, "MiB", "CUDA max allocated on GPU, process peak RSS on CPU (largest sample)",
               Max("peak_memory_mb")),
        Metric("speedup", True, "x", "median over samples of the paired ratio dense ms/token / technique ms/token "
               "(back to back in one actor), with a distribution-free 95% interval", Median("speedup", interval=True),
               broken_down=True),
        Metric("ttft_speedup", True, "x", "median over samples of the paired ratio dense TTFT / technique TTFT",
               Median("ttft_speedup", interval=True)),
        Metric("acceptance_rate", True, "fraction", "speculative: draft tokens accepted / draft tokens proposed",
               RatioOfSums(("accepted",), "drafted"), broken_down=True),
        Metric("tokens_per_target_call", True, "tokens", "speculative: tokens committed per verification, bonus or resampled token included",
               RatioOfSums(("accepted", "target_calls"), "target_calls")),
        Metric("target_calls_per_token", False, "calls", "target forwards per generated token after the first (autoregressive: 1)",
               RatioOfSums(("target_calls",), "new_tokens", offset=1.0)),
        Metric("draft_calls_per_token", False, "calls", "speculative: draft forwards per generated token",
               RatioOfSums(("draft_calls",), "new_tokens", offset=1.0)),
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
    return out
