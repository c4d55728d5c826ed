"""Decode latency, TTFT and KV bytes of dense vs StreamingLLM windows, measured in one process.

    python benchmarks/kv_cache_decode.py --model smollm2-135m --lengths 1024 2048 4096 \
        --windows 64 256 1024 --new-tokens 32 --repeats 3

Each configuration is warmed up once, then run `--repeats` times; every prefill and decode step
is timed with the device synchronized, and the figure is the median. Techniques are compared as
ratios to dense measured in the same process on the same prompt. On CUDA the
memory figure is `max_memory_allocated`; on CPU the process peak RSS of the run. The last stdout line is
one JSON record.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from paretoray.actors.metrics import PeakMemory, device_name
from paretoray.actors.models import load_model
from paretoray.actors.techniques import build_technique


def measure(model, technique, input_ids, new_tokens: int, repeats: int, memory: PeakMemory) -> dict:
    technique.generate(model, input_ids, new_tokens)  # warm-up: allocation, kernel selection
    steps, prefills, peaks, kv = [], [], [], 0
    for _ in range(repeats):
        memory.reset()
        run = technique.generate(model, input_ids, new_tokens)
        peaks.append(memory.read_mb())
        steps.extend(run.step_s)
        prefills.append(run.prefill_s)
        kv = run.kv_bytes
    return {
        "latency_ms_per_token": 1000 * statistics.median(steps),
        "ttft_ms": 1000 * statistics.median(prefills),
        "kv_cache_mb": kv / 2**20,
        "peak_memory_mb": max(peaks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--n-sink", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    device = model.device
    memory = PeakMemory(device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    started = time.perf_counter()
    for length in args.lengths:
        input_ids = torch.randint(100, model.config.vocab_size, (1, length), generator=generator).to(device)
        dense = measure(model, build_technique("dense", {}), input_ids, args.new_tokens, args.repeats, memory)
        rows.append({"length": length, "technique": "dense", **dense, "speedup": 1.0, "kv_ratio": 1.0})
        print(f"ctx {length:>6}  dense                      {dense['latency_ms_per_token']:8.2f} ms/token  "
              f"ttft {dense['ttft_ms']:9.1f} ms  kv {dense['kv_cache_mb']:8.2f} MiB", file=sys.stderr)
        for window in args.windows:
            technique = build_technique("streaming_llm", {"n_sink": args.n_sink, "window": window})
            row = measure(model, technique, input_ids, args.new_tokens, args.repeats, memory)
            row |= {
                "length": length,
                "technique": technique.label,
                "speedup": dense["latency_ms_per_token"] / row["latency_ms_per_token"],
                "kv_ratio": row["kv_cache_mb"] / dense["kv_cache_mb"],
            }
            rows.append(row)
            print(f"ctx {length:>6}  {technique.label:<26} {row['latency_ms_per_token']:8.2f} ms/token  "
                  f"ttft {row['ttft_ms']:9.1f} ms  kv {row['kv_cache_mb']:8.2f} MiB  speedup {row['speedup']:.2f}x",
                  file=sys.stderr)
    record = {
        "benchmark": "kv_cache_decode",
        "model": args.model,
        "device": device_name(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
