"""The compute side of a trial: a plain class that loads one model and runs many trials.

`TrialRunner` knows nothing of Ray, Optuna or MLflow; `paretoray.actors.actor` wraps it with
`ray.remote` where actors are created. A trial is a request of plain data (technique, params,
workload) and its result is a record of plain data: metrics, per-sample outputs, timings, the
environment, and, when something raised, the error with its traceback. The runner never raises
out of `run_trial`, so one bad configuration does not take the actor down.

A trial is measured per sample, paired with the reference technique (dense): for each sample the
two run back to back in this process, `workload.repeats` times, the order alternated. Each sample
gives a row (its scores and dense's, its timings and dense's, the paired ratios, bytes, counters);
`metrics.aggregate` turns the rows into the trial's metrics with their intervals, as each metric's
registry entry says. Speedups are thus ratios of timings taken seconds apart on the same machine,
not of a baseline read once at actor start.

With `workload.batch_size` B > 1 (fixed, or the trial's `workload.batch_size` parameter where the
spec sweeps it), samples are measured B at a time, grouped by context length in their order (a
length's last batch may be smaller: it runs at its own size, recorded in its rows' `batch_size`, and
is left out of the throughput metrics). Dense and the technique decode the same batch back to back,
the order alternated per batch; rows stay per sample (each output scored alone), with the batch's
columns beside: per-sequence latency (the batch step), total tokens/s, KV bytes of the batch and peak
memory. Fidelity is teacher-forced per sequence, alone.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from typing import Any

import torch

from paretoray.actors import artifacts
from paretoray.actors.generation import BatchGeneration, Generation
from paretoray.actors.measure import PeakMemory, environment
from paretoray.actors.metrics import aggregate
from paretoray.actors.models import context_window, load_model
from paretoray.actors.tasks import Sample, Task
from paretoray.actors.tasks.cache import cached_samples
from paretoray.actors.techniques import Technique, build_technique, reference_technique
from paretoray.actors.workload import BATCH_DIMENSION, Workload


# Seconds compiling one decode graph is assumed to cost on a CPU before it is measured (SmolLM2-135M
# on 2 cores: about 170 s the first time on a machine, 25-40 s once inductor's cache holds it).
COMPILE_GUESS_S = 60.0


class TrialRunner:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str | None = None,
        attn_implementation: str = "sdpa",
        threads: int | None = None,
        draft: str | None = None,
        builders: dict[str, Any] | None = None,
        compile: bool | str = False,
        compile_horizon: dict[str, int] | None = None,
    ):
        artifacts.install(builders)  # how this process builds a registry draft or a MoA plan on first use
        if threads:
            torch.set_num_threads(threads)
        self.model_ref = model
        self.model, self.tokenizer = load_model(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
        self.draft = load_model(draft, dtype=dtype, device=str(self.model.device), attn_implementation=attn_implementation)[0] if draft else None
        self.device = self.model.device
        self.memory = PeakMemory(self.device)
        self.env = environment(self.model, self.device, torch.get_num_threads())
        eos = self.tokenizer.eos_token_id
        self.eos_token_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self.window = context_window(self.model.config)
        self.reference = reference_technique()
        self._samples: dict[str, list[Sample]] = {}
        self._warm = False
        # Decode through the compiled static-shape step (model.compile): True, False, or "auto",
        # decided at the first warm-up by a paired measurement (see _decide_compile).
        self.compile: bool | str = compile if compile in (True, False) else "auto"
        self.compile_horizon = compile_horizon or {"trials_per_actor": 1, "graphs": 2}
        self.env["decode"] = {True: "compiled", False: "eager"}.get(self.compile, "auto (undecided)")

    def describe(self) -> dict[str, Any]:
        """Where this runner lives: node, the GPUs it was given, its environment."""
        info: dict[str, Any] = {"pid": os.getpid(), "model": self.model_ref, **self.env}
        try:
            import ray

            if ray.is_initialized():
                context = ray.get_runtime_context()
                info.update(
                    node_id=context.get_node_id(),
                    node_ip=ray.util.get_node_ip_address(),
                    actor_id=context.get_actor_id(),
                    gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                )
        except Exception:  # describing must never fail a trial
            pass
        return info

    # ---- one trial -------------------------------------------------------------------------

    def run_trial(self, request: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        record: dict[str, Any] = {
            "trial": request.get("trial"),
            "technique": request.get("technique"),
            "params": dict(request.get("params", {})),
            "status": "failed",
            "error": None,
            "traceback": None,
            "actor": self.describe(),
            "env": self.env,
        }
        try:
            params = dict(request.get("params", {}))
            batch = params.pop(BATCH_DIMENSION, None)  # a swept batch size: the trial's own choice
            technique = build_technique(request["technique"], params)
            workload = Workload.model_validate(request["workload"] | ({} if batch is None else {"batch_size": batch}))
            record["params"] = {key: getattr(technique, key) for key in technique.params}
            record["label"] = technique.label
            if batch is not None:
                record["params"][BATCH_DIMENSION] = workload.batch
            if workload.batch != 1:
                record["label"] = f"{technique.label} batch_size={workload.batch}"
            record["batch_size"] = workload.batch
            record.update(self._measure(technique, workload))
            record["env"] = {**self.env, "batch_size": workload.batch}  # after the measure: it may decide `decode`
            record["status"] = "ok"
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = traceback.format_exc()
        finally:
            record["wall_s"] = time.perf_counter() - started
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return record

    def _measure(self, technique: Technique, workload: Workload) -> dict[str, Any]:
        if not technique.uses_model:
            return {"query_placement": workload.query_placement, "metrics": technique.measure_without_model(), "samples": []}
        task = workload.task_object
        samples = self._workload_samples(workload)
        technique.prepare(self.model, sorted({len(s.prompt_ids) for s in samples}))
        self._warm_up(samples, technique, workload)
        # Order alternates within each length, so that no length always runs dense first.
        seen: dict[int, int] = {}
        rows = []
        if workload.batch == 1:
            for sample in samples:
                index = seen[sample.context_length] = seen.get(sample.context_length, -1) + 1
                rows.append(self._measure_sample(index, sample, technique, task, workload))
        else:
            for batch in _batches(samples, workload.batch, mixed=workload.batch_lengths == "mixed"):
                index = seen[batch[0].context_length] = seen.get(batch[0].context_length, -1) + 1
                rows += self._measure_batch(index, batch, technique, task, workload)
        return {
            "query_placement": workload.query_placement,
            "metrics": aggregate(rows, task.context_lengths if task.has_lengths else None),
            "samples": rows,
        }

    def _measure_sample(self, index: int, sample: Sample, technique: Technique, task: Task, workload: Workload) -> dict[str, Any]:
        """One sample: dense and the technique back to back, `repeats` times, the order alternated
        (so neither always runs first, on a warmer cache or a quieter machine); then the scores."""
        input_ids, question_ids = self._inputs(sample, workload)
        budget = workload.generation_budget(sample.max_new_tokens)
        extra = {"draft": self.draft} if technique.needs_draft else {}
        runs: dict[str, list[Generation]] = {"dense": [], "technique": []}
        peak_mb = 0.0
        for repeat in range(workload.repeats):
            order = ("dense", "technique") if (index + repeat) % 2 == 0 else ("technique", "dense")
            for role in order:
                if role == "dense":
                    runs["dense"].append(self.reference.generate(
                        self.model, input_ids, budget, self.eos_token_ids, question_ids=question_ids, compiled=self.compile))
                    continue
                self.memory.reset()
                runs["technique"].append(technique.generate(
                    self.model, input_ids, budget, self.eos_token_ids, question_ids=question_ids, compiled=self.compile, **extra))
                peak_mb = max(peak_mb, self.memory.read_mb())
        fidelity = self._fidelity(technique, workload, input_ids, question_ids, budget, runs["dense"][0].tokens, extra)
        row = self._row(sample, runs["dense"], runs["technique"], task, workload, fidelity, peak_mb)
        run = runs["technique"][0]
        row.update({"batch_size": 1, "batch_kv_cache_bytes": run.kv_bytes, **_paired_throughput(runs["dense"], runs["technique"])})
        row.update(dict(run.stats) or {"target_calls": len(run.step_s)})  # plain decoding: one target forward per step
        return row

    def _measure_batch(self, index: int, batch: list[Sample], technique: Technique, task: Task,
                       workload: Workload) -> list[dict[str, Any]]:
        """B samples decoded together: dense's batch and the technique's back to back, `repeats`
        times, the order alternated; then each sample scored alone, one row each."""
        inputs = [self._inputs(sample, workload) for sample in batch]
        prompts = [input_ids for input_ids, _ in inputs]
        questions = [q for _, q in inputs] if any(q is not None for _, q in inputs) else None  # None: that one's whole prompt
        budgets = [workload.generation_budget(sample.max_new_tokens) for sample in batch]
        runs: dict[str, list[BatchGeneration]] = {"dense": [], "technique": []}
        peak_mb = 0.0
        for repeat in range(workload.repeats):
            order = ("dense", "technique") if (index + repeat) % 2 == 0 else ("technique", "dense")
            for role in order:
                who = self.reference if role == "dense" else technique
                if role == "technique":
                    self.memory.reset()
                runs[role].append(who.generate_batch(self.model, prompts, budgets, self.eos_token_ids,
                                                     question_ids=questions, compiled=self.compile))
                if role == "technique":
                    peak_mb = max(peak_mb, self.memory.read_mb())
        full = len(batch) == workload.batch
        throughput = _paired_throughput(runs["dense"], runs["technique"]) if full else \
            dict.fromkeys(("batch_tokens_per_s", "dense_batch_tokens_per_s", "throughput_speedup"))
        rows = []
        for i, sample in enumerate(batch):
            # Sequence i as a run of its own: its tokens, prefill and bytes (as alone), the batch's steps
            # (latency_ms_per_token: per sequence, the batch's median step, which gives it one token).
            dense_runs = [_sequence(r, i) for r in runs["dense"]]
            technique_runs = [_sequence(r, i) for r in runs["technique"]]
            # Teacher-forced alone: the batch changes no sequence's tokens.
            fidelity = self._fidelity(technique, workload, *inputs[i], budgets[i], dense_runs[0].tokens, {})
            row = self._row(sample, dense_runs, technique_runs, task, workload, fidelity, peak_mb)  # the batch's peak
            row.update({
                "batch_size": len(batch),
                "batch_index": index,
                "batch_kv_cache_bytes": runs["technique"][0].kv_bytes,  # every row, padded to the batch's largest
                "batch_prefill_ms": median_or_none([1000 * sum(r.prefill_s) for r in runs["technique"]]),
                **throughput,
            })
            row.update(dict(technique_runs[0].stats) or {"target_calls": len(technique_runs[0].tokens) - 1})
            rows.append(row)
        return rows

    def _fidelity(self, technique: Technique, workload: Workload, input_ids: torch.Tensor, question_ids: torch.Tensor | None,
                  budget: int, dense_tokens: list[int], extra: dict[str, Any]) -> float | None:
        """Teacher-forced agreement with dense's continuation, where the workload asks for it."""
        if not workload.fidelity:
            return None
        if technique.is_reference:
            return 1.0  # the reference agrees with its own continuation by definition
        if technique.lossless:
            return None  # a lossless decoder's argmax is dense's: nothing to measure
        return technique.generate(self.model, input_ids, budget, forced_tokens=dense_tokens, question_ids=question_ids,
                                  compiled=self.compile, **extra).agreement

    def _row(self, sample: Sample, dense_runs: list[Generation], technique_runs: list[Generation], task: Task,
             workload: Workload, fidelity: float | None, peak_mb: float) -> dict[str, Any]:
        """A sample's row from its paired runs (the first repeat's tokens are scored)."""
        dense, run = dense_runs[0], technique_runs[0]
        text = self.tokenizer.decode(run.tokens, skip_special_tokens=True)
        dense_text = self.tokenizer.decode(dense.tokens, skip_special_tokens=True)
        return {
            "sample_id": sample.sample_id,
            "context_length": sample.context_length,
            "prompt_tokens": len(sample.prompt_ids),
            "depth": sample.depth,
            "group": sample.group,
            "answer": " | ".join(sample.expected),
            "output": text,
            "dense_output": dense_text,
            **task.score(sample, text, reference=dense_text),
            "dense_accuracy": task.score(sample, dense_text, reference=dense_text)["accuracy"],
            "output_match": float(run.tokens == dense.tokens),
            "fidelity": fidelity,
            "new_tokens": len(run.tokens),
            "kv_cache_bytes": run.kv_bytes,
            "peak_memory_mb": peak_mb,
            "repeats": workload.repeats,
            "compiled": run.compiled,  # its decode steps ran the compiled static-shape step
            "dense_compiled": dense.compiled,
            "decode_warmup_s": sum(r.warmup_s for r in technique_runs),  # steps left out: compiling, recording
            **_paired_timing(dense_runs, technique_runs),
        }

    def _inputs(self, sample: Sample, workload: Workload) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt as one chunk (query-aware), or the context then the question (context-only)."""
        if workload.query_placement == "context_only" and sample.question_ids:
            return (
                torch.tensor([sample.context_ids], device=self.device),
                torch.tensor([list(sample.question_ids)], device=self.device),
            )
        return torch.tensor([list(sample.prompt_ids)], device=self.device), None

    # ---- cached per workload ---------------------------------------------------------------

    def _workload_samples(self, workload: Workload) -> list[Sample]:
        """Built once per (tokenizer, task settings) on this machine (see tasks/cache.py), kept in memory here."""
        if workload.key not in self._samples:
            self._samples[workload.key] = cached_samples(
                workload.task_object, self.tokenizer, workload.seed, self.window, workload.max_new_tokens)
        return self._samples[workload.key]

    def _warm_up(self, samples: list[Sample], technique: Technique, workload: Workload) -> None:
        """Short runs first: the actor's first forward pays for allocation and kernel selection, and a
        trial's first call of its technique (its hooks, its draft) would otherwise land in sample 0."""
        prompt = torch.tensor([list(samples[0].prompt_ids[:64])], device=self.device)
        if not self._warm:
            self.reference.generate(self.model, prompt, 4)
            if self.compile == "auto":
                per_generation = max(workload.generation_budget(s.max_new_tokens) for s in samples) - 1
                steps = (self.compile_horizon["trials_per_actor"] * len(samples)
                         * (2 * workload.repeats + int(workload.fidelity)) * per_generation)
                self.compile = self._decide_compile(torch.tensor([list(samples[0].prompt_ids[:256])], device=self.device), steps)
            if self.compile:  # dense's graph compiles here, not in sample 0
                self.reference.generate(self.model, prompt, 4, compiled=True)
            self._warm = True
        extra = {"draft": self.draft} if technique.needs_draft else {}
        # The technique's first generation in this mode compiles its graph here, not in sample 0.
        technique.generate(self.model, prompt, 4, compiled=self.compile, **extra)
        if workload.batch > 1:  # and the batch's graphs (one per batch size), dense's too
            self.reference.generate_batch(self.model, [prompt] * workload.batch, 4, compiled=self.compile)
            technique.generate_batch(self.model, [prompt] * workload.batch, 4, compiled=self.compile)

    def _decide_compile(self, prompt: torch.Tensor, horizon_steps: int, steps: int = 16, rounds: int = 3) -> bool:
        """`compile: auto`. On CUDA: compiled (CUDA graphs remove the per-kernel launch cost of a
        batch-1 step). On a CPU, where compiling a graph costs minutes the first time on a machine,
        it must pay for itself within the decode steps this actor expects (`horizon_steps`):
        1. dense decodes `prompt` eagerly; if even halving that step over the horizon would not
           repay `COMPILE_GUESS_S` per graph the sweep may compile, stay eager without compiling;
        2. else dense decodes compiled (the compile timed apart), then eagerly and compiled,
           alternated `rounds` times; compiled is kept when its median step is at least 10%
           faster and the time it saves over the horizon exceeds the other graphs' compile time.
        What was measured and why goes into every trial's environment (`env.compile_check`)."""
        graphs = self.compile_horizon["graphs"]
        if self.device.type == "cuda":
            chosen, summary = True, "cuda: compiled with CUDA graphs"
        else:
            eager = self.reference.generate(self.model, prompt, steps).step_s
            eager_ms = 1000 * statistics.median(eager)
            if 0.5 * eager_ms / 1000 * horizon_steps < COMPILE_GUESS_S * graphs:
                chosen = False
                summary = (f"eager {eager_ms:.1f} ms/token; ~{horizon_steps} decode steps expected on this actor "
                           f"cannot repay compiling {graphs} graph(s) on a CPU: eager, not compiled")
            else:
                started = time.perf_counter()
                warm = self.reference.generate(self.model, prompt, steps, compiled=True)
                compile_s = time.perf_counter() - started
                timings: dict[bool, list[float]] = {False: [], True: []}
                for round_ in range(rounds):
                    for mode in ((False, True) if round_ % 2 == 0 else (True, False)):
                        timings[mode] += self.reference.generate(self.model, prompt, steps, compiled=mode).step_s
                eager_ms, compiled_ms = (1000 * statistics.median(timings[m]) for m in (False, True))
                saved_s = (eager_ms - compiled_ms) / 1000 * horizon_steps
                chosen = warm.compiled and compiled_ms < 0.9 * eager_ms and saved_s > compile_s * (graphs - 1)
                summary = (f"eager {eager_ms:.1f} ms/token, compiled {compiled_ms:.1f} ms/token at {prompt.shape[-1]} tokens; "
                           f"first compile {compile_s:.0f} s; ~{horizon_steps} decode steps expected, {graphs} graph(s): "
                           f"{'compiled' if chosen else 'eager'}")
        self.env["decode"] = "compiled" if chosen else "eager"
        self.env["compile_check"] = summary
        return chosen


def _batches(samples: list[Sample], size: int, mixed: bool = False) -> list[list[Sample]]:
    """Consecutive samples of one context length, `size` at a time (a length's last batch may be
    smaller); `mixed`: consecutive samples whatever their lengths (only the last may be smaller)."""
    batches: list[list[Sample]] = []
    for sample in samples:
        if batches and len(batches[-1]) < size and (mixed or batches[-1][0].context_length == sample.context_length):
            batches[-1].append(sample)
        else:
            batches.append([sample])
    return batches


def _sequence(run: BatchGeneration, i: int) -> Generation:
    """Sequence i of a batch as a run of its own: its tokens, prefill and bytes, the batch's steps."""
    steps = run.row_step_s[i] if run.row_step_s is not None else run.step_s
    return Generation(tokens=run.tokens[i], prefill_s=run.prefill_s[i], step_s=steps, kv_bytes=run.kv_bytes_alone[i],
                      stats=run.stats[i] if run.stats else {}, compiled=run.compiled, warmup_s=run.warmup_s)


def median_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(kept) if kept else None


def _paired_throughput(dense: list, technique: list) -> dict[str, float | None]:
    """A batch's (or a B=1 sample's) total tokens/s, dense's, and their paired ratio (medians over repeats)."""
    return {
        "batch_tokens_per_s": median_or_none([r.tokens_per_s for r in technique]),
        "dense_batch_tokens_per_s": median_or_none([r.tokens_per_s for r in dense]),
        "throughput_speedup": median_or_none([
            _ratio(t, d) if t is not None and d is not None else None
            for t, d in ((t.tokens_per_s, d.tokens_per_s) for d, t in zip(dense, technique))]),
    }


def _ms_per_token(run: Generation) -> float:
    """A run's decode speed: the median step (robust to a preempted step); NaN with no step."""
    return 1000 * statistics.median(run.step_s) if run.step_s else math.nan


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 and math.isfinite(numerator) and math.isfinite(denominator) else None


def _paired_timing(dense: list[Generation], technique: list[Generation]) -> dict[str, float | None]:
    """A sample's timings: each repeat's pair gives a ratio; the sample reports their medians."""

    def median(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None and math.isfinite(v)]
        return statistics.median(kept) if kept else None

    return {
        "latency_ms_per_token": median([_ms_per_token(r) for r in technique]),
        "dense_latency_ms_per_token": median([_ms_per_token(r) for r in dense]),
        "speedup": median([_ratio(_ms_per_token(d), _ms_per_token(t)) for d, t in zip(dense, technique)]),
        "ttft_ms": median([1000 * r.prefill_s for r in technique]),
        "dense_ttft_ms": median([1000 * r.prefill_s for r in dense]),
        "ttft_speedup": median([_ratio(d.prefill_s, t.prefill_s) for d, t in zip(dense, technique)]),
    }
