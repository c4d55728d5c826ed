"""Autoregressive vs speculative decoding on a target/draft pair, and transformers' assisted generation as a peer.

    python benchmarks/speculative.py --model smollm2-135m --draft smollm2-135m-draft \
        --configs dense specdec:gamma=1 specdec:gamma=3 specdec_pp:threshold=0.5,max_gamma=8 \
        --hf-assisted schedule=constant,k=3,confidence=0 schedule=heuristic,k=20,confidence=0.4 \
        --prompt-sets instructions arithmetic code everyday --prompts 3 --new-tokens 64 --repeats 3

Every config decodes the same chat prompts greedily in this one process. `everyday` is
`paretoray.actors.prompts.EVERYDAY` (= the recipe's `corpus.UNSEEN_CHAT`): requests requests in styles the draft's recipe never
trains on (the other sets are the shipped templates, which it does). Our techniques are timed
paired with dense: per prompt, dense and the technique run back to back `--repeats` times, the
order alternated, each after a short warm-up, the device synchronized; `speedup` is the median of
the per-pair ratios of ms/token with its order-statistic 95% interval. Figures per prompt, medians
over prompts:
- ms/token: decode time / decoded tokens, the first token (from the prefill) excluded; our
  techniques time every round. transformers' generate is timed end to end, so for it ms/token is
  (end-to-end - prefill) / (tokens - 1), the prefill being measured once per prompt with the same
  model; its speedup is against dense's median ms/token (not paired).
- tokens/s end to end: new tokens / wall time of the whole call, prefill included, for every config.
Every output is checked against the target's own greedy decoding (lossless).

The peer runs `target.generate(assistant_model=draft)`. Its assistant keeps state between calls
(the heuristic schedule carries the candidate count over; with scikit-learn installed the
confidence threshold is re-tuned): the assistant's generation config is restored before every
call, so each run starts from the configured values. The peer drafts with the draft's full output
layer (it knows nothing of our sub-vocabulary head), which is part of what is compared.
The last stdout line is one JSON record.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch

from paretoray.actors.generation import synchronize
from paretoray.actors.measure import device_name
from paretoray.actors.models import load_model
from paretoray.actors.prompts import PROMPT_SETS, as_chat, make_prompts
from paretoray.actors.stats import median_interval
from paretoray.actors.techniques import build_technique, parse_technique


def parse_hf(config: str) -> dict[str, object]:
    """`schedule=heuristic,k=20,confidence=0.4` -> the assistant's generation-config fields."""
    fields = dict(part.split("=", 1) for part in config.split(",") if part)
    unknown = set(fields) - {"schedule", "k", "confidence"}
    if unknown:
        raise SystemExit(f"--hf-assisted {config!r}: unknown field(s) {sorted(unknown)}; use schedule, k, confidence")
    return {
        "num_assistant_tokens_schedule": fields.get("schedule", "constant"),
        "num_assistant_tokens": int(fields.get("k", 20)),
        "assistant_confidence_threshold": float(fields.get("confidence", 0.0)),
    }


def timed(call, device: torch.device):
    synchronize(device)
    started = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - started


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    model(ids, logits_to_keep=1)  # warm-up
    return timed(lambda: model(ids, logits_to_keep=1), ids.device)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--draft", default="smollm2-135m-draft", help="registry name (built on first use) or folder")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--configs", nargs="+", default=["dense", "specdec:gamma=2", "specdec_pp:threshold=0.3"],
                        help="our techniques; the first should be dense (the speedup baseline)")
    parser.add_argument("--hf-assisted", nargs="*", default=["schedule=heuristic,k=20,confidence=0.4"],
                        help="transformers assisted-generation settings: schedule=constant|heuristic, k, confidence (0: off)")
    parser.add_argument("--prompt-sets", nargs="+", default=list(PROMPT_SETS), choices=[*PROMPT_SETS, "everyday"])
    parser.add_argument("--prompts", type=int, default=2, help="prompts per set")
    parser.add_argument("--repeats", type=int, default=2, help="paired dense/technique runs per prompt")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_model(args.model, dtype=args.dtype)
    draft, _ = load_model(args.draft, dtype=args.dtype, device=str(target.device))
    device = target.device
    eos = {tokenizer.eos_token_id}
    prompts = [p for kind in args.prompt_sets for p in make_prompts(kind, args.prompts, seed=5)]
    inputs = [tokenizer(as_chat(tokenizer, p), return_tensors="pt").input_ids.to(target.device) for p in prompts]
    dense = build_technique("dense", {})
    reference = [dense.generate(target, ids, args.new_tokens, eos).tokens for ids in inputs]
    prefill_s = [prefill_seconds(target, ids) for ids in inputs]  # for the peer's decode-only figure

    def measured(technique, ids, extra):
        run, wall = timed(lambda: technique.generate(target, ids, args.new_tokens, eos, **extra), device)
        return run, wall, 1000 * sum(run.step_s) / max(len(run.step_s), 1)

    rows, started = [], time.perf_counter()
    for config in args.configs:
        technique = parse_technique(config)
        extra = {"draft": draft} if technique.needs_draft else {}
        per_token, e2e, lossless, counters, ratios = [], [], [], {}, []
        for index, (ids, expected) in enumerate(zip(inputs, reference)):
            technique.generate(target, ids, 8, eos, **extra)  # warm-up
            dense.generate(target, ids, 8, eos)
            for repeat in range(args.repeats):
                if (index + repeat) % 2 == 0:
                    _, _, dense_ms = measured(dense, ids, {})
                    run, wall, ms = measured(technique, ids, extra)
                else:
                    run, wall, ms = measured(technique, ids, extra)
                    _, _, dense_ms = measured(dense, ids, {})
                ratios.append(dense_ms / ms)
                per_token.append(ms)
                e2e.append(len(run.tokens) / wall)
                lossless.append(run.tokens == expected)
                if repeat == 0:
                    for key, value in run.stats.items():
                        counters[key] = counters.get(key, 0) + value
        low, high = median_interval(ratios)
        row = {"config": technique.label, "ms_per_token": statistics.median(per_token), "tokens_per_s_e2e": statistics.median(e2e),
               "lossless": all(lossless), "paired_speedup": statistics.median(ratios), "paired_speedup_ci": [low, high]}
        if counters:
            row["acceptance_rate"] = counters["accepted"] / max(counters["drafted"], 1)
            # Tokens committed per verification forward, the bonus token included.
            row["tokens_per_target_call"] = (counters["accepted"] + counters["target_calls"]) / counters["target_calls"]
        rows.append(row)

    pristine = copy.deepcopy(draft.generation_config)
    for config in args.hf_assisted:
        settings = parse_hf(config)
        per_token, e2e, lossless = [], [], []
        for ids, expected, prefill in zip(inputs, reference, prefill_s):
            def call(tokens: int):
                draft.generation_config = copy.deepcopy(pristine)  # no state carried over from the last call
                draft.generation_config.update(**settings)
                return target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=tokens,
                                       pad_token_id=tokenizer.eos_token_id, eos_token_id=sorted(eos))
            call(8)  # warm-up
            out, wall = timed(lambda: call(args.new_tokens), device)
            tokens = out[0, ids.shape[1]:].tolist()
            per_token.append(1000 * (wall - prefill) / max(len(tokens) - 1, 1))
            e2e.append(len(tokens) / wall)
            lossless.append(tokens == expected)
        rows.append({"config": f"transformers assisted {config}", "ms_per_token": statistics.median(per_token),
                     "tokens_per_s_e2e": statistics.median(e2e), "lossless": all(lossless)})

    base = rows[0] if args.configs[0] == "dense" else None
    for row in rows:
        row["speedup"] = base["ms_per_token"] / row["ms_per_token"] if base else float("nan")
        row["speedup_e2e"] = row["tokens_per_s_e2e"] / base["tokens_per_s_e2e"] if base else float("nan")
        paired = f"paired {row['paired_speedup']:.2f}x [{row['paired_speedup_ci'][0]:.2f}, {row['paired_speedup_ci'][1]:.2f}]  " \
            if "paired_speedup" in row else ""
        print(f"{row['config']:<64} {row['ms_per_token']:7.1f} ms/token {row['speedup']:5.2f}x  {paired}"
              f"{row['tokens_per_s_e2e']:6.1f} tok/s e2e {row['speedup_e2e']:5.2f}x  "
              f"acceptance {row.get('acceptance_rate', float('nan')):.2f}  tokens/call {row.get('tokens_per_target_call', float('nan')):.2f}  "
              f"lossless {row['lossless']}", file=sys.stderr)
    print(json.dumps({"benchmark": "speculative", "model": args.model, "draft": args.draft, "device": device_name(target.device),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node(),
                      "prompt_sets": args.prompt_sets, "prompts": len(prompts), "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "wall_s": round(time.perf_counter() - started, 1),
                      "rows": rows}))


if __name__ == "__main__":
    main()
