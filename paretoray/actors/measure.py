"""How a trial reads the machine: peak memory of a region, the device's name, the environment
recorded with every figure (so machines are never mixed silently)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


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
