"""The compute side of a trial: a plain class that loads one model and runs many trials.

`TrialRunner` knows nothing of Ray, Optuna or MLflow; `paretoray.actors.actor` wraps it with
`ray.remote` where actors are created. A trial is a request of plain data (technique, params,
workload) and its result is a record of plain data: metrics, per-sample outputs, timings, the
environment, and, when something raised, the error with its traceback. The runner never raises
out of `run_trial`, so one bad configuration does not take the actor down.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import torch

from paretoray.actors.generation import Generation
from paretoray.actors.metrics import PeakMemory, environment, median
from paretoray.actors.models import load_model
from paretoray.actors.techniques import Technique, build_technique
from paretoray.actors.workloads import Sample, build_samples, score_exact_match


@dataclass(frozen=True)
class Workload:
    """What a trial is measured on (mirrors the sweep spec's `workload` section)."""

    task: str = "passkey"
    context_lengths: tuple[int, ...] = (1024,)
    samples_per_length: int = 2
    depths: tuple[float, ...] | None = None
    seed: int = 0
    max_new_tokens: int = 8
    num_keys: int = 4
    fidelity: bool = True
    query_placement: str = "query_aware"  # or "context_only": compress the context, then ask

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        data = dict(data)
        data["context_lengths"] = tuple(data.get("context_lengths", cls.context_lengths))
        if data.get("depths") is not None:
            data["depths"] = tuple(data["depths"])
        return cls(**data)

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class _Reference:
    """The dense model's run of a workload in this actor: its outputs and its speed."""

    tokens: dict[str, list[int]]
    latency_ms_per_token: float
    ttft_ms: float


class TrialRunner:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str | None = None,
        attn_implementation: str = "sdpa",
        threads: int | None = None,
        draft: str | None = None,
    ):
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
        self._samples: dict[str, list[Sample]] = {}
        self._references: dict[str, _Reference] = {}
        self._warm = False

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
            technique = build_technique(request["technique"], request.get("params", {}))
            record["params"] = {key: getattr(technique, key) for key in technique.params}
            record["label"] = technique.label
            workload = Workload.from_dict(request["workload"])
            record.update(self._measure(technique, workload))
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
        samples = self._workload_samples(workload)
        reference = self._reference(workload, samples)
        rows, step_ms, ttft_ms, peaks = [], [], [], []
        counters: dict[str, int] = {}
        for sample in samples:
            input_ids, question_ids = self._inputs(sample, workload)
            extra = {"draft": self.draft} if technique.needs_draft else {}
            self.memory.reset()
            run = technique.generate(
                self.model, input_ids, workload.max_new_tokens, self.eos_token_ids, question_ids=question_ids, **extra
            )
            peaks.append(self.memory.read_mb())
            text = self.tokenizer.decode(run.tokens, skip_special_tokens=True)
            matches_dense = run.tokens == reference.tokens[sample.sample_id]
            for key, value in run.stats.items():
                counters[key] = counters.get(key, 0) + value
            fidelity = None
            if workload.fidelity and not technique.needs_draft:  # speculative decoding is lossless by construction
                forced = technique.generate(
                    self.model, input_ids, workload.max_new_tokens,
                    forced_tokens=reference.tokens[sample.sample_id], question_ids=question_ids,
                )
                fidelity = forced.agreement
            step_ms.extend(1000 * s for s in run.step_s)
            ttft_ms.append(1000 * run.prefill_s)
            rows.append(
                {
                    "sample_id": sample.sample_id,
                    "context_length": sample.context_length,
                    "prompt_tokens": len(sample.prompt_ids),
                    "depth": sample.depth,
                    "answer": sample.answer,
                    "output": text,
                    # Retrieval: the needle; decoding prompts: the target's own greedy output.
                    "correct": score_exact_match(sample.answer, text) if sample.answer else float(matches_dense),
                    "ttft_ms": 1000 * run.prefill_s,
                    "latency_ms_per_token": median([1000 * s for s in run.step_s]),
                    "new_tokens": len(run.tokens),
                    "matches_dense": matches_dense,
                    "kv_cache_bytes": run.kv_bytes,
                    "peak_memory_mb": peaks[-1],
                    "fidelity": fidelity,
                }
            )
        latency = median(step_ms)
        ttft = median(ttft_ms)
        metrics: dict[str, float] = {
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "output_match": sum(r["matches_dense"] for r in rows) / len(rows),
            "latency_ms_per_token": latency,
            "ttft_ms": ttft,
            "tokens_per_s": 1000.0 / latency if latency > 0 else float("nan"),
            "kv_cache_mb": max(r["kv_cache_bytes"] for r in rows) / 2**20,
            "peak_memory_mb": max(peaks),
            "speedup": reference.latency_ms_per_token / latency if latency > 0 else float("nan"),
            "ttft_speedup": reference.ttft_ms / ttft if ttft > 0 else float("nan"),
        }
        if workload.fidelity and not technique.needs_draft:
            metrics["fidelity"] = sum(r["fidelity"] for r in rows) / len(rows)
        if counters.get("target_calls"):
            generated = sum(r["new_tokens"] - 1 for r in rows)  # the first token comes from the prefill
            metrics["acceptance_rate"] = counters["accepted"] / max(counters["drafted"], 1)
            metrics["tokens_per_target_call"] = (counters["accepted"] + counters["target_calls"]) / counters["target_calls"]
            metrics["target_calls_per_token"] = counters["target_calls"] / max(generated, 1)
            metrics["draft_calls_per_token"] = counters["draft_calls"] / max(generated, 1)
        else:  # plain decoding: one target forward per token, the anchor of a speculative front
            metrics["target_calls_per_token"] = 1.0
        for length in workload.context_lengths:
            subset = [r for r in rows if r["context_length"] == length]
            metrics[f"accuracy/ctx{length}"] = sum(r["correct"] for r in subset) / len(subset)
            metrics[f"ttft_ms/ctx{length}"] = median([r["ttft_ms"] for r in subset])
        return {
            "query_placement": workload.query_placement,
            "metrics": metrics,
            "samples": rows,
            "baseline": {"latency_ms_per_token": reference.latency_ms_per_token, "ttft_ms": reference.ttft_ms},
        }

    def _inputs(self, sample: Sample, workload: Workload) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt as one chunk (query-aware), or the context then the question (context-only)."""
        if workload.query_placement == "context_only":
            return (
                torch.tensor([sample.context_ids], device=self.device),
                torch.tensor([list(sample.question_ids)], device=self.device),
            )
        return torch.tensor([sample.prompt_ids], device=self.device), None

    # ---- cached per workload ---------------------------------------------------------------

    def _workload_samples(self, workload: Workload) -> list[Sample]:
        if workload.key not in self._samples:
            self._samples[workload.key] = build_samples(
                workload.task,
                self.tokenizer,
                list(workload.context_lengths),
                workload.samples_per_length,
                list(workload.depths) if workload.depths is not None else None,
                workload.seed,
                num_keys=workload.num_keys,
            )
        return self._samples[workload.key]

    def _warm_up(self, samples: list[Sample]) -> None:
        """One short run first: the first forward pays for allocation and kernel selection."""
        if not self._warm:
            prompt = torch.tensor([samples[0].prompt_ids[:64]], device=self.device)
            build_technique("dense", {}).generate(self.model, prompt, 4)
            self._warm = True

    def _reference(self, workload: Workload, samples: list[Sample]) -> _Reference:
        """The dense baseline of this workload, measured once in this actor, same process as trials."""
        if workload.key not in self._references:
            self._warm_up(samples)
            dense = build_technique("dense", {})
            runs: dict[str, Generation] = {}
            for sample in samples:
                input_ids, question_ids = self._inputs(sample, workload)
                runs[sample.sample_id] = dense.generate(
                    self.model, input_ids, workload.max_new_tokens, self.eos_token_ids, question_ids=question_ids
                )
            self._references[workload.key] = _Reference(
                tokens={key: run.tokens for key, run in runs.items()},
                latency_ms_per_token=median([1000 * s for run in runs.values() for s in run.step_s]),
                ttft_ms=median([1000 * run.prefill_s for run in runs.values()]),
            )
        return self._references[workload.key]
