"""How close each technique's decode step comes to the machine's floor, eager and compiled.

    python benchmarks/decode_floor.py --lengths 1024 2048 4096 8192 --threads 2 \
        --configs dense streaming_llm:window=252 snapkv:max_capacity_prompt=256,window_size=16 \
                  pyramidkv:max_capacity_prompt=256,window_size=16 h2o:max_capacity_prompt=256

On a GPU (random weights of a public shape, no download):

    python benchmarks/decode_floor.py --random-shape llama-3.1-8b --dtype bfloat16 \
        --lengths 4096 8192 16384 32768

A decode step at batch 1 must read every weight once and every KV entry it attends to once, so
its floor is (weight bytes + KV bytes read) / read bandwidth, the bandwidth measured here first
(the best of a few passes summing a buffer far larger than the caches). For each length and
configuration the prompt is prefilled once (eager: scoring and compression run there); the
technique's cache is then copied into its static form, and the same first token is decoded
`--new-tokens` times eagerly (transformers' caches, as trials ran before compilation) and through
the compiled static-shape step, in this process. The figure is the median step; the compiled
run's compile and warm-up steps are reported apart (`warmup_s`), never in the median. KV bytes
read: what the technique's eager cache holds at the end of decoding (within `--new-tokens` of the
mean over the steps). Tokens of the two runs are compared (`tokens_match`).

The last stdout line is one JSON record with `rows`; each row has `config`, `context`,
`compiled`, `ms_per_token`, `floor_ms_per_token` and their `ratio`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from kv_compression import add_model_arguments, machine_record, model_from  # benchmarks/ is on sys.path when run as a script
from paretoray.actors.generation import cache_nbytes, decode, eager_step, prefill, synchronize
from paretoray.actors import static_decode
from paretoray.actors.techniques import parse_technique


def read_bandwidth(device: torch.device, gib: float = 1.0, passes: int = 5) -> float:
    """Bytes per second the device reads at best: a sum over a buffer of `gib` GiB, best of `passes`."""
    buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    buffer.sum()  # first touch
    best = float("inf")
    for _ in range(passes):
        synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del buffer
    return gib * 2**30 / best


def weight_bytes(model) -> int:
    """Weights a decode step reads: every parameter once (a tied embedding counted once, as the
    output layer reads it); an untied input embedding is a one-row lookup, left out."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size()
    return total


@torch.inference_mode()
def measure(model, technique, input_ids, new_tokens: int) -> list[dict]:
    """Prefill once; decode the same tokens eagerly and compiled from the same post-prefill state."""
    device = input_ids.device
    technique.prepare(model, [input_ids.shape[-1]])
    with technique.applied(model) as cache:
        first, prefill_s = prefill(model, input_ids, cache)
        static = technique.static_cache(model, cache, new_tokens)  # a copy: the eager cache is untouched
        eager_tokens, eager_steps, _, _ = decode(eager_step(model, cache), first, new_tokens, device)
        kv_read = cache_nbytes(cache)
    rows = [{"compiled": False, "steps": eager_steps, "warmup_s": 0.0, "tokens": eager_tokens}]
    if static is not None:
        with static_decode.static_attention_installed(model):
            tokens, steps, warmup_s, _ = decode(static_decode.compiled_step(model, static), first, new_tokens, device,
                                                unmeasured=static_decode.warmup_watch(device))
        rows.append({"compiled": True, "steps": steps, "warmup_s": warmup_s, "tokens": tokens, "slots_bytes": static.nbytes()})
        del static
    for row in rows:
        row.update(prefill_ms=1000 * prefill_s, kv_bytes_read=kv_read, tokens_match=row["tokens"] == eager_tokens)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, [1024, 2048, 4096, 8192], [
        "dense", "streaming_llm:window=252", "snapkv:max_capacity_prompt=256,window_size=16",
        "pyramidkv:max_capacity_prompt=256,window_size=16", "h2o:max_capacity_prompt=256"])
    args = parser.parse_args()
    model = model_from(args)
    device = model.device
    bandwidth = read_bandwidth(device)
    weights = weight_bytes(model)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per step {weights / 2**20:.0f} MiB "
          f"({1000 * weights / bandwidth:.1f} ms)", file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    rows = []
    started = time.perf_counter()
    for length in args.lengths:
        input_ids = torch.randint(100, model.config.vocab_size, (1, length), generator=generator).to(device)
        for config in args.configs:
            technique = parse_technique(config)
            for run in measure(model, technique, input_ids, args.new_tokens):
                floor_ms = 1000 * (weights + run["kv_bytes_read"]) / bandwidth
                ms = 1000 * statistics.median(run["steps"])
                row = {
                    "config": technique.label, "context": length, "compiled": run["compiled"],
                    "ms_per_token": ms, "floor_ms_per_token": floor_ms, "ratio": ms / floor_ms,
                    "kv_mib_read": run["kv_bytes_read"] / 2**20, "prefill_ms": run["prefill_ms"],
                    "warmup_s": run["warmup_s"], "measured_steps": len(run["steps"]), "tokens_match": run["tokens_match"],
                }
                rows.append(row)
                print(f"ctx {length:>6}  {row['config']:<52} {'compiled' if row['compiled'] else 'eager   '} "
                      f"{ms:8.2f} ms/token  floor {floor_ms:7.2f}  x{row['ratio']:.2f}  kv {row['kv_mib_read']:7.1f} MiB  "
                      f"warm-up {row['warmup_s']:6.1f} s  match {row['tokens_match']}", file=sys.stderr, flush=True)
    record = {
        **machine_record("decode_floor", args, model),
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "weight_mib": weights / 2**20,
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
