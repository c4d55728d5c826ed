"""Autoregressive vs speculative decoding on a target/draft pair, measured in one process.

    python benchmarks/speculative.py --model smollm2-135m --draft PATH \
        --configs dense specdec:gamma=1 specdec:gamma=2 specdec_pp:threshold=0.3,min_gamma=1,max_gamma=8 \
        --prompt-sets arithmetic code --prompts 2 --new-tokens 48

Each config decodes the same chat prompts greedily: one short warm-up, then the measured run;
every round is timed with the device synchronized. Per prompt the figure is decode time /
decoded tokens (the first token, from the prefill, excluded); the table shows the median over
prompts. Every speculative output is checked against the dense greedy output (lossless). The
last stdout line is one JSON record. (The transformers assisted-generation peer is still to come.)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from paretoray.actors.metrics import device_name
from paretoray.actors.models import load_model
from paretoray.actors.prompts import PROMPT_SETS, as_chat, make_prompts
from paretoray.actors.techniques import build_technique, parse_technique


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--configs", nargs="+", default=["dense", "specdec:gamma=2", "specdec_pp:threshold=0.3"])
    parser.add_argument("--prompt-sets", nargs="+", default=list(PROMPT_SETS), choices=PROMPT_SETS)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per set")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_model(args.model, dtype=args.dtype)
    draft, _ = load_model(args.draft, dtype=args.dtype, device=str(target.device))
    prompts = [p for kind in args.prompt_sets for p in make_prompts(kind, args.prompts, seed=5)]
    inputs = [tokenizer(as_chat(tokenizer, p), return_tensors="pt").input_ids.to(target.device) for p in prompts]
    dense = build_technique("dense", {})
    reference = [dense.generate(target, ids, args.new_tokens).tokens for ids in inputs]
    rows, started = [], time.perf_counter()
    for config in args.configs:
        technique = parse_technique(config)
        extra = {"draft": draft} if technique.needs_draft else {}
        per_token, lossless, counters = [], [], {}
        for ids, expected in zip(inputs, reference):
            technique.generate(target, ids, 8, **extra)  # warm-up
            run = technique.generate(target, ids, args.new_tokens, **extra)
            per_token.append(1000 * sum(run.step_s) / max(len(run.step_s), 1))
            lossless.append(run.tokens == expected)
            for key, value in run.stats.items():
                counters[key] = counters.get(key, 0) + value
        row = {"config": technique.label, "ms_per_token": statistics.median(per_token), "lossless": all(lossless)}
        if counters:
            row["acceptance_rate"] = counters["accepted"] / max(counters["drafted"], 1)
            row["tokens_per_target_call"] = (counters["accepted"] + counters["target_calls"]) / counters["target_calls"]
        rows.append(row)
    base = rows[0]["ms_per_token"] if args.configs[0] == "dense" else float("nan")
    for row in rows:
        row["speedup_vs_first"] = base / row["ms_per_token"]
        print(f"{row['config']:<70} {row['ms_per_token']:7.1f} ms/token  {row['speedup_vs_first']:.2f}x  "
              f"acceptance {row.get('acceptance_rate', float('nan')):.2f}  tokens/call {row.get('tokens_per_target_call', 1.0):.2f}  "
              f"lossless {row['lossless']}", file=sys.stderr)
    print(json.dumps({"benchmark": "speculative", "model": args.model, "draft": args.draft, "device": device_name(target.device),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node(),
                      "prompts": len(prompts), "new_tokens": args.new_tokens, "wall_s": round(time.perf_counter() - started, 1), "rows": rows}))


if __name__ == "__main__":
    main()
