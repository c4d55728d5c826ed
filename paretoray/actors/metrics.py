"""The metrics a trial reports, each with the direction that makes it better, and how memory is read.

Objectives and constraints in a sweep name these metrics; Optuna's directions come from here.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    unit: str
    doc: str

    @property
    def direction(self) -> str:
        return "maximize" if self.higher_is_better else "minimize"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", True, "fraction", "exact-match accuracy, mean over every sample (lengths x depths)"),
        Metric("fidelity", True, "fraction", "teacher-forced next-token agreement with the dense model's continuation"),
        Metric("output_match", True, "fraction", "samples whose generated tokens equal the dense model's own greedy output"),
        Metric("latency_ms_per_token", False, "ms", "median decode step time over all samples (first token excluded)"),
        Metric("ttft_ms", False, "ms", "median time to first token (prefill) over all samples"),
        Metric("tokens_per_s", True, "tokens/s", "1000 / latency_ms_per_token"),
        Metric("kv_cache_mb", False, "MiB", "largest KV cache physically held at the end of a sample's generation"),
        Metric("peak_memory_mb", False, "MiB", "CUDA max allocated on GPU, process peak RSS on CPU (largest sample)"),
        Metric("speedup", True, "x", "dense latency_ms_per_token / this latency_ms_per_token, same actor"),
        Metric("ttft_speedup", True, "x", "dense ttft_ms / this ttft_ms, same actor"),
        Metric("acceptance_rate", True, "fraction", "speculative: draft tokens accepted / draft tokens proposed"),
        Metric("tokens_per_target_call", True, "tokens", "speculative: tokens committed per verification, bonus or resampled token included"),
        Metric("target_calls_per_token", False, "calls", "speculative: target forwards per generated token (autoregressive: 1)"),
        Metric("draft_calls_per_token", False, "calls", "speculative: draft forwards per generated token"),
    ]
}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class PeakMemory:
    """Peak memory of one measured region: CUDA max allocated, or the process's peak RSS on CPU.

    On CPU the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs
    (Linux >= 4.0), so each region gets its own peak instead of the process's lifetime peak.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # not Linux: the lifetime peak is all there is

    def read_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model, device: torch.device, threads: int) -> dict[str, str | int]:
    """What a figure depends on, recorded with every trial so machines are never mixed silently."""
    import ray
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": device_name(device),
        "cuda": torch.version.cuda or "none",
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "batch_size": 1,
        "torch_threads": threads,
        "hostname": platform.node(),
    }
