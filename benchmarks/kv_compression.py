"""Prefill time, decode latency, KV bytes and peak memory of KV-cache techniques vs dense.

    python benchmarks/kv_compression.py --model smollm2-135m --lengths 1024 2048 4096 8192 \
        --configs dense streaming_llm:window=252 snapkv:max_capacity_prompt=256 \
                  pyramidkv:max_capacity_prompt=256 h2o:max_capacity_prompt=256 \
        --new-tokens 32 --repeats 3

On a GPU, speed does not need trained weights: `--random-shape llama-3.1-8b --dtype bfloat16`
builds a random-weight model of that shape on the device (no download), e.g.

    python benchmarks/kv_compression.py --random-shape llama-3.1-8b --dtype bfloat16 \
        --lengths 4096 8192 16384 32768 --configs dense snapkv:max_capacity_prompt=1024 ...

A config is `name` or `name:param=value,param=value`. For each context length, dense runs first,
then every config on the same prompt, in the same process; each is warmed up once, then run
`--repeats` times with every prefill and decode step timed with the device synchronized, and
the figure is the median. Ratios are against dense at the same length. Memory: CUDA
`max_memory_allocated` on GPU, the process's peak RSS on CPU. The last stdout line is one JSON record.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from paretoray.actors.measure import PeakMemory, device_name
from paretoray.actors.models import load_model
from paretoray.actors.techniques import build_technique, parse_technique


# Shapes of public models, for speed measurements with random weights.
RANDOM_SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=16384),
}


def random_model(shape: str, dtype: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from paretoray.actors.models import pick_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(**RANDOM_SHAPES[shape], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # allocate on the device directly: an 8B model does not fit twice
        model = LlamaForCausalLM(config).to(pick_dtype(dtype, device))
    return model.eval()


def add_model_arguments(parser: argparse.ArgumentParser, lengths: list[int], configs: list[str]) -> None:
    """The arguments every KV benchmark shares: the model (or a random shape), dtype, lengths, configs, tokens, threads."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), help="random weights of this shape instead of --model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths)
    parser.add_argument("--configs", nargs="+", default=configs)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")


def model_from(args: argparse.Namespace):
    """The model the arguments name, on the device, with the thread count applied first."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return random_model(args.random_shape, args.dtype) if args.random_shape else load_model(args.model, dtype=args.dtype)[0]


def machine_record(name: str, args: argparse.Namespace, model) -> dict:
    """The head of a benchmark's JSON record: what ran, where."""
    return {
        "benchmark": name,
        "model": f"random {args.random_shape}" if args.random_shape else args.model,
        "device": device_name(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "new_tokens": args.new_tokens,
    }


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
    add_model_arguments(parser, [1024, 2048, 4096], ["dense", "streaming_llm:window=252", "snapkv:max_capacity_prompt=256"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = model_from(args)
    device = model.device
    memory = PeakMemory(device)
    techniques = [parse_technique(c) for c in args.configs if c != "dense"]
    generator = torch.Generator().manual_seed(0)
    rows = []
    started = time.perf_counter()
    for length in args.lengths:
        input_ids = torch.randint(100, model.config.vocab_size, (1, length), generator=generator).to(device)
        dense = measure(model, build_technique("dense", {}), input_ids, args.new_tokens, args.repeats, memory)
        for technique in [None, *techniques]:
            row = dense if technique is None else measure(model, technique, input_ids, args.new_tokens, args.repeats, memory)
            row = row | {
                "length": length,
                "technique": "dense" if technique is None else technique.label,
                "speedup": dense["latency_ms_per_token"] / row["latency_ms_per_token"],
                "ttft_ratio": row["ttft_ms"] / dense["ttft_ms"],
                "kv_ratio": row["kv_cache_mb"] / dense["kv_cache_mb"],
                "memory_ratio": row["peak_memory_mb"] / dense["peak_memory_mb"],
            }
            rows.append(row)
            print(f"ctx {length:>6}  {row['technique']:<58} {row['latency_ms_per_token']:8.2f} ms/token "
                  f"({row['speedup']:.2f}x)  ttft {row['ttft_ms']:9.1f} ms  kv {row['kv_cache_mb']:8.2f} MiB  "
                  f"peak {row['peak_memory_mb']:8.1f} MiB", file=sys.stderr)
    record = {
        **machine_record("kv_compression", args, model),
        "repeats": args.repeats,
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
