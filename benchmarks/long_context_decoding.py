"""Long-context decoding under load: dense, speculation and compositions over context lengths and batch sizes.

    python benchmarks/long_context_decoding.py --lengths 2048 4096 8192 --batch-sizes 1 4 8 \
        --configs dense "self_spec:gamma=4+streaming_llm:window=252" prompt_lookup \
                  "kv_quant:bits=4+snapkv:max_capacity_prompt=256" specdec_pp --draft smollm2-135m-draft

On a GPU (random weights of a public shape, no download; MagicDec's setting):

    python benchmarks/long_context_decoding.py --random-shape llama-3.1-8b --dtype bfloat16 \
        --lengths 16384 32768 65536 131072 --batch-sizes 1 8 32 --compile \
        --configs dense "self_spec:gamma=3+streaming_llm:window=508" prompt_lookup

Prompts: with `--model`, RULER's single needle in prose (`niah`, haystack `essay`) at each length,
tokenized by the model's tokenizer (`--batch-sizes`' largest many per length, the same for every
batch size); with `--random-shape`, random tokens (speculation's acceptance on them says nothing).

Timing is paired as in a trial: for each length and batch size, dense runs before the first
configuration and after every one (d, c1, d, c2, d, ...), each configuration is compared with the
mean of the dense runs on either side of it, on the same prompts, in this process, and the whole
sequence is repeated `--repeats` times (the median and the range of the ratios are reported).
Every configuration is warmed up first on the prompts' last 256 tokens (allocation, kernel
selection, and with `--compile` the graphs), so no compilation is timed. `--max-batch-tokens`
skips the lengths and batch sizes whose prompts total more tokens, saying so: on a CPU the
prefill, not the decode being measured, is most of a run. A run decodes the batch: `generate` at batch 1, `generate_batch` above
(each sequence prefilled alone, then all decoded together); a technique that cannot batch is
listed at batch sizes above 1 with its reason. Figures per row: decode tokens/s of the whole batch
(tokens over the measured decode time), ms per token of one sequence (the median step), the
paired throughput ratio, time to first token (all prefills of the batch), the technique's KV
bytes (the batch's slot buffers when batched), whether every sequence's tokens equal dense's, and
the speculative counters (acceptance, tokens per target call).

The last stdout line is one JSON record with `rows`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from kv_compression import add_model_arguments, machine_record, model_from  # benchmarks/ is on sys.path when run as a script
from paretoray.actors.techniques import build_technique, parse_technique


def task_prompts(model_ref: str, lengths: list[int], count: int, seed: int = 0) -> dict[int, list[list[int]]]:
    """`count` prompts of each length: RULER's single needle in prose, the model's tokenizer."""
    from paretoray.actors.models import load_tokenizer
    from paretoray.actors.tasks.cache import cached_samples
    from paretoray.actors.workload import Workload

    tokenizer, window = load_tokenizer(model_ref)
    workload = Workload.model_validate({"task": "niah", "haystack": "essay", "context_lengths": lengths,
                                        "samples_per_length": count, "max_new_tokens": 32, "seed": seed})
    prompts: dict[int, list[list[int]]] = {}
    for sample in cached_samples(workload.task_object, tokenizer, seed, window, 32):
        prompts.setdefault(sample.context_length, []).append(list(sample.prompt_ids))
    return prompts


def random_prompts(vocab: int, lengths: list[int], count: int) -> dict[int, list[list[int]]]:
    generator = torch.Generator().manual_seed(0)
    return {n: torch.randint(100, vocab, (count, n), generator=generator).tolist() for n in lengths}


def run(technique, model, prompts: list[torch.Tensor], new_tokens: int, compiled: bool, draft) -> dict:
    """One decode of the batch: tokens per sequence, decode tokens/s, ms per token, TTFT, KV bytes, counters."""
    extra = {"draft": draft} if technique.needs_draft else {}
    if len(prompts) == 1:
        g = technique.generate(model, prompts[0], new_tokens, compiled=compiled, **extra)
        seconds, produced = sum(g.step_s), len(g.step_s)
        return {"tokens": [g.tokens], "tokens_per_s": produced / seconds if seconds else None,
                "ms_per_token": 1000 * statistics.median(g.step_s) if g.step_s else None,
                "ttft_ms": 1000 * g.prefill_s, "kv_bytes": g.kv_bytes, "stats": [g.stats], "compiled": g.compiled}
    g = technique.generate_batch(model, prompts, new_tokens, compiled=compiled, **extra)
    rows = g.row_step_s or [g.step_s] * len(prompts)  # one sequence's steps (speculation: its share of each round)
    return {"tokens": g.tokens, "tokens_per_s": g.tokens_per_s,
            "ms_per_token": 1000 * statistics.median(statistics.median(r) for r in rows if r) if any(rows) else None,
            "ttft_ms": 1000 * sum(g.prefill_s), "kv_bytes": g.kv_bytes, "stats": g.stats, "compiled": g.compiled}


def speculative_counters(stats: list[dict]) -> dict:
    drafted = sum(s.get("drafted", 0) for s in stats)
    calls = sum(s.get("target_calls", 0) for s in stats)
    if not calls:
        return {}
    accepted = sum(s.get("accepted", 0) for s in stats)
    return {"acceptance": accepted / drafted if drafted else 0.0, "tokens_per_target_call": (accepted + calls) / calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, [2048, 4096, 8192], [
        "dense", "self_spec:gamma=4+streaming_llm:window=252", "prompt_lookup",
        "kv_quant:bits=4+snapkv:max_capacity_prompt=256", "specdec_pp"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=1, help="times the paired sequence runs (ratios: median and range)")
    parser.add_argument("--draft", default=None, help="draft model for techniques that need one (specdec, specdec_pp)")
    parser.add_argument("--compile", action="store_true", help="decode through the compiled static step (default on CUDA)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="skip a length and batch size whose prompts total more tokens (prefill dominates on a CPU)")
    parser.set_defaults(new_tokens=24)
    args = parser.parse_args()
    model = model_from(args)
    device = model.device
    compiled = args.compile or device.type == "cuda"
    draft = None
    if args.draft and not args.random_shape:
        from paretoray.actors.models import load_model

        draft = load_model(args.draft, dtype=args.dtype, device=str(device))[0]
    dense = build_technique("dense", {})
    configs = [parse_technique(text) for text in args.configs if parse_technique(text).name != "dense"]
    prompts_by_length = (random_prompts(model.config.vocab_size, args.lengths, max(args.batch_sizes)) if args.random_shape
                         else task_prompts(args.model, args.lengths, max(args.batch_sizes)))
    rows = []
    started = time.perf_counter()
    for length in args.lengths:
        for batch in args.batch_sizes:
            if args.max_batch_tokens and length * batch > args.max_batch_tokens:
                why = f"{batch} x {length} prompt tokens exceed --max-batch-tokens {args.max_batch_tokens}"
                rows.append({"config": "*", "context": length, "batch": batch, "skipped": why})
                print(f"ctx {length:>6} B {batch:>2}  skipped: {why}", file=sys.stderr, flush=True)
                continue
            prompts = [torch.tensor([ids], device=device) for ids in prompts_by_length[length][:batch]]
            runnable = []
            for technique in configs:
                why = None
                if technique.needs_draft and draft is None:
                    why = "needs a draft model (--draft; none with --random-shape)"
                elif batch > 1 and not technique.batched:
                    why = technique.batch_note
                if why:
                    rows.append({"config": technique.label, "context": length, "batch": batch, "skipped": why})
                    print(f"ctx {length:>6} B {batch:>2}  {technique.label:<60} skipped: {why}", file=sys.stderr, flush=True)
                else:
                    runnable.append(technique)
            warm = [ids[:, -256:] for ids in prompts]  # short prompts: the same shapes of decode, a cheap prefill
            for technique in [dense, *runnable]:  # warm-up: allocation, kernel choice, compiled graphs
                run(technique, model, warm, 4, compiled, draft)
            measured: dict[str, list[dict]] = {t.label: [] for t in [dense, *runnable]}
            for _ in range(args.repeats):
                dense_runs = [run(dense, model, prompts, args.new_tokens, compiled, draft)]
                measured[dense.label].append(dense_runs[0])
                for technique in runnable:
                    measured[technique.label].append(run(technique, model, prompts, args.new_tokens, compiled, draft))
                    dense_runs.append(run(dense, model, prompts, args.new_tokens, compiled, draft))
                    measured[technique.label][-1]["dense_tokens_per_s"] = statistics.mean(
                        r["tokens_per_s"] for r in dense_runs[-2:])
                    measured[technique.label][-1]["dense_tokens"] = dense_runs[-1]["tokens"]
                measured[dense.label].extend(dense_runs[1:])
            reference = measured[dense.label]
            for technique in [dense, *runnable]:
                runs = measured[technique.label]
                ratios = [r["tokens_per_s"] / r["dense_tokens_per_s"] for r in runs if r.get("dense_tokens_per_s")]
                row = {
                    "config": technique.label, "context": length, "batch": batch, "compiled": runs[0]["compiled"],
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                    "ms_per_token": statistics.median(r["ms_per_token"] for r in runs),
                    "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
                    "kv_mib": runs[0]["kv_bytes"] / 2**20,
                    "throughput_ratio": statistics.median(ratios) if ratios else 1.0,
                    "ratio_range": [min(ratios), max(ratios)] if ratios else [1.0, 1.0],
                    "tokens_match_dense": runs[0]["tokens"] == (runs[0].get("dense_tokens") or reference[0]["tokens"]),
                    **speculative_counters(runs[0]["stats"]),
                }
                rows.append(row)
                spec = (f"  accept {row['acceptance']:.2f}  tok/call {row['tokens_per_target_call']:.2f}"
                        if "acceptance" in row else "")
                print(f"ctx {length:>6} B {batch:>2}  {row['config']:<60} {row['tokens_per_s']:8.1f} tok/s  "
                      f"{row['ms_per_token']:8.1f} ms/tok  x{row['throughput_ratio']:.2f} "
                      f"[{row['ratio_range'][0]:.2f}, {row['ratio_range'][1]:.2f}]  ttft {row['ttft_ms']:8.0f} ms  "
                      f"kv {row['kv_mib']:7.1f} MiB  match {row['tokens_match_dense']}{spec}", file=sys.stderr, flush=True)
    record = {**machine_record("long_context_decoding", args, model), "compiled": compiled, "repeats": args.repeats,
              "batch_sizes": args.batch_sizes, "wall_s": time.perf_counter() - started, "rows": rows}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
