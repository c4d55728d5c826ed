"""The speculative loop's own cost per round, apart from the model forwards it runs.

    python benchmarks/speculative_overhead.py --shape llama-3.1-8b --dtype bfloat16 --context 1024 --gammas 1 2 4 8
    python benchmarks/speculative_overhead.py --shape tiny            # a CPU check of the same code

Random-weight models of public shapes (no download): the target and a small draft sharing its
vocabulary. Trained weights do not matter for speed, and acceptance is bracketed instead of
scripted: `--acceptance none` uses an unrelated random draft (it almost never agrees, so every
round rejects and rolls both caches back), `--acceptance all` drafts with the target itself (every
candidate accepted, no rollback).

For each gamma: a greedy `specdec` generation of `--new-tokens` tokens after a `--context`-token
prompt, rounds timed with the device synchronized; then the forwards a round is made of, timed
alone at the same cache length: one draft step (1 token) and one verification (gamma + 1 tokens).
overhead per round = round time - (gamma x draft step + verification). On CUDA the number of host
syncs per round is counted with torch's sync debug mode. The last stdout line is one JSON record.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from paretoray.actors.generation import synchronize, with_cache
from paretoray.actors.measure import device_name
from paretoray.actors.techniques import build_technique

SHAPES = {
    # target, draft
    "llama-3.1-8b": (
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0),
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0),
    ),
    "tiny": (
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=8192),
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=4096, max_position_embeddings=8192),
    ),
}


def random_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def timed_forward(model, context: int, new: int, device: torch.device, repeats: int) -> float:
    """Median seconds of a `new`-token forward on a `context`-token cache (the cache rolled back each time)."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.randint(0, model.config.vocab_size, (1, context), device=device), **with_cache(model, cache),
              use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(repeats + 1):
            ids = torch.randint(0, model.config.vocab_size, (1, new), device=device)
            synchronize(device)
            started = time.perf_counter()
            model(input_ids=ids, **with_cache(model, cache), use_cache=True)
            synchronize(device)
            times.append(time.perf_counter() - started)
            cache.crop(-new)
    return statistics.median(times[1:])


def count_syncs(call) -> tuple[object, int]:
    """Run `call`, counting host-device syncs on CUDA (0 elsewhere: there is no device to wait for)."""
    if not torch.cuda.is_available():
        return call(), 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--acceptance", choices=["none", "all"], nargs="+", default=["none", "all"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    target_shape, draft_shape = SHAPES[args.shape]
    target = random_model(target_shape, dtype, device, seed=0)
    drafts = {"none": random_model(draft_shape, dtype, device, seed=1), "all": target}
    prompt = torch.randint(0, target.config.vocab_size, (1, args.context), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    rows = []
    for acceptance in args.acceptance:
        draft = drafts[acceptance]
        draft_step = timed_forward(draft, args.context, 1, device, args.repeats)
        for gamma in args.gammas:
            technique = build_technique("specdec", {"gamma": gamma})
            verify_step = timed_forward(target, args.context, gamma + 1, device, args.repeats)
            # Through the technique's own entry point, as actors call it (inference mode included).
            technique.generate(target, prompt, 8, set(), draft=draft)  # warm-up
            run, syncs = count_syncs(lambda: technique.generate(target, prompt, args.new_tokens, set(), draft=draft))
            rounds = run.stats["target_calls"]
            round_s = sum(run.step_s) / rounds
            forwards_s = gamma * draft_step + verify_step
            rows.append({"acceptance": acceptance, "gamma": gamma, "rounds": rounds,
                         "accepted_per_round": run.stats["accepted"] / rounds,
                         "round_ms": 1000 * round_s, "forwards_ms": 1000 * forwards_s,
                         "overhead_ms": 1000 * (round_s - forwards_s), "overhead_share": (round_s - forwards_s) / round_s,
                         "draft_step_ms": 1000 * draft_step, "verify_ms": 1000 * verify_step,
                         "host_syncs_per_round": syncs / rounds if syncs else None})
            row = rows[-1]
            print(f"acceptance {acceptance:<4} gamma {gamma:>2}: round {row['round_ms']:8.2f} ms = forwards {row['forwards_ms']:8.2f} "
                  f"+ overhead {row['overhead_ms']:7.2f} ms ({100 * row['overhead_share']:5.1f}%), "
                  f"{row['accepted_per_round']:.2f} accepted/round, syncs/round {row['host_syncs_per_round']}", file=sys.stderr)
    print(json.dumps({"benchmark": "speculative_overhead", "shape": args.shape, "dtype": str(dtype), "device": device_name(device),
                      "torch": torch.__version__, "host": platform.node(), "context": args.context,
                      "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
