"""self_spec (self-speculative decoding over a compressed cache of the model itself): lossless under
greedy for every KV technique as the draft cache, eager and compiled; distribution-correct under
sampling; the draft cache's rewind; the stopping rule."""

from __future__ import annotations

import math

import pytest
import torch

from paretoray.actors import static_decode
from paretoray.actors.techniques import build_technique
from paretoray.actors.techniques.self_spec import draft_cache

DRAFT_CACHES = [
    ("self_spec", {}),  # StreamingLLM with its defaults (MagicDec's draft), here holding everything
    ("self_spec+streaming_llm", {"streaming_llm.n_sink": 4, "streaming_llm.window": 16}),
    ("self_spec+snapkv", {"snapkv.max_capacity_prompt": 32, "snapkv.window_size": 8, "self_spec.gamma": 6}),
    ("self_spec+pyramidkv", {"pyramidkv.max_capacity_prompt": 40, "pyramidkv.window_size": 4}),
    ("self_spec+h2o", {"h2o.max_capacity_prompt": 24}),
    ("self_spec+uniform_window", {"uniform_window.density": 0.2, "uniform_window.sink_tokens": 8}),
    ("self_spec+dense", {"self_spec.gamma": 3}),
    ("self_spec+streaming_llm", {"streaming_llm.window": 8, "self_spec.gamma": 8, "self_spec.stop_threshold": 0.3}),
]


def prompt(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,params", DRAFT_CACHES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DRAFT_CACHES)])
def test_greedy_output_is_the_models_own(tiny_model, name, params):
    model, _ = tiny_model
    ids = prompt(model, 150, seed=3)
    dense = build_technique("dense", {}).generate(model, ids, 40)
    run = build_technique(name, params).generate(model, ids, 40)
    assert run.tokens == dense.tokens
    stats = run.stats
    assert stats["target_calls"] >= 1 and 0 <= stats["accepted"] <= stats["drafted"]
    # Each round commits its accepted tokens plus the target's own (the last round may overshoot the budget).
    assert len(run.tokens) - 1 <= stats["accepted"] + stats["target_calls"] < len(run.tokens) + 8


def test_a_draft_cache_holding_everything_is_always_right(tiny_model):
    """With dense as the draft cache the draft is the target: every proposal is accepted."""
    model, _ = tiny_model
    run = build_technique("self_spec+dense", {"self_spec.gamma": 4}).generate(model, prompt(model, 60, 1), 21)
    # The first token comes from the prefill, then 4 rounds of 4 accepted + the target's own.
    assert run.stats["accepted"] == run.stats["drafted"] == 16
    assert run.stats["target_calls"] == 4


def test_the_draft_cache_is_compressed_and_counted(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 150, seed=4)
    dense = build_technique("dense", {}).generate(model, ids, 10)
    small = build_technique("self_spec+snapkv", {"snapkv.max_capacity_prompt": 16, "snapkv.window_size": 4}).generate(model, ids, 10)
    full = build_technique("self_spec+dense", {}).generate(model, ids, 10)
    assert dense.kv_bytes < small.kv_bytes < full.kv_bytes  # target's full cache + a small draft cache


def test_stop_threshold_zero_proposes_one_token_a_round(tiny_model):
    model, _ = tiny_model
    run = build_technique("self_spec", {"gamma": 8, "stop_threshold": 0.0}).generate(model, prompt(model, 40, 2), 16)
    assert run.stats["drafted"] == run.stats["target_calls"]


def test_rewind_frees_the_slots_of_rejected_tokens(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 50, seed=5)
    cache = draft_cache(model, build_technique("streaming_llm", {"n_sink": 2, "window": 60}), ids, room=8)
    with torch.inference_mode(), static_decode.static_attention_installed(model):
        for token in (7, 8, 9):
            static_decode._forward(model, cache, torch.tensor([[token]]))
    positions = cache.layers[0].groups[0].positions
    assert int(cache.position) == 53 and positions.max() == 52
    cache.rewind(51)
    assert int(cache.position) == 51 and positions.max() == 50
    assert int((positions >= 0).sum()) == 51 * positions.shape[1]


def test_compiled_tokens_equal_eager(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 120, seed=6)
    technique = build_technique("self_spec+snapkv", {"snapkv.max_capacity_prompt": 32, "snapkv.window_size": 8})
    eager = technique.generate(model, ids, 24)
    compiled = technique.generate(model, ids, 24, compiled=True)
    assert compiled.compiled and not eager.compiled
    assert compiled.tokens == eager.tokens


def test_sampling_follows_the_targets_distribution(tiny_model):
    """The token after the first, over many seeds, against the target's own next-token
    distribution given the prompt and that first token (the first is sampled from the target)."""
    model, _ = tiny_model
    ids = prompt(model, 40, seed=7)
    technique = build_technique("self_spec+streaming_llm", {"self_spec.temperature": 0.7, "self_spec.gamma": 3,
                                                            "streaming_llm.window": 4, "streaming_llm.n_sink": 1})
    samples = 300
    observed = torch.zeros(model.config.vocab_size)
    expected = torch.zeros(model.config.vocab_size)
    variance = torch.zeros(model.config.vocab_size)
    with torch.inference_mode():
        for seed in range(samples):
            tokens = technique.generate(model, ids, 2, seed=seed).tokens
            logits = model(torch.cat([ids, torch.tensor([[tokens[0]]])], dim=1)).logits[0, -1]
            p = torch.softmax(logits.float() / 0.7, dim=-1)
            observed[tokens[1]] += 1
            expected += p
            variance += p * (1 - p)
    assert (observed - expected).abs().le(5 * variance.sqrt() + 1).all(), (observed - expected).abs().max()
    assert math.isclose(float(expected.sum()), samples, rel_tol=1e-4)


def test_context_only_placement_compresses_only_the_drafts_context(tiny_model):
    model, _ = tiny_model
    context, question = prompt(model, 120, seed=8), prompt(model, 10, seed=9)
    run = build_technique("self_spec+snapkv", {"snapkv.max_capacity_prompt": 32}).generate(model, context, 16, question_ids=question)
    assert run.tokens == build_technique("dense", {}).generate(model, torch.cat([context, question], dim=-1), 16).tokens


BATCH = [
    ("self_spec", {}),
    ("self_spec+snapkv", {"snapkv.max_capacity_prompt": 32, "snapkv.window_size": 8}),
    ("self_spec+h2o", {"h2o.max_capacity_prompt": 24}),
    ("self_spec+streaming_llm", {"streaming_llm.window": 12, "self_spec.gamma": 6, "self_spec.stop_threshold": 0.5}),
    ("self_spec+uniform_window", {"uniform_window.density": 0.2, "uniform_window.sink_tokens": 8}),
]


@pytest.mark.parametrize("name,params", BATCH, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BATCH)])
def test_a_batch_gives_every_row_its_own_greedy_tokens(tiny_model, name, params):
    """Rows of different lengths and budgets accept different numbers of proposals each round and
    roll back to their own lengths; each row's tokens are the model's own greedy tokens."""
    model, _ = tiny_model
    rows = [prompt(model, n, seed=n) for n in (150, 90, 200)]
    budgets = [30, 12, 30]
    dense = [build_technique("dense", {}).generate(model, ids, n).tokens for ids, n in zip(rows, budgets)]
    batch = build_technique(name, params).generate_batch(model, rows, budgets)
    assert batch.tokens == dense
    assert sum(batch.active) == sum(len(t) - 1 for t in batch.tokens)  # throughput counts each row's tokens once
    # A row's latency: each round's time shared by the tokens it gave that row (as alone), never
    # the batch's pseudo-steps (a round's time over its widest row).
    assert [len(steps) for steps in batch.row_step_s] == [len(t) - 1 for t in batch.tokens]
    assert all(sum(steps) <= sum(batch.step_s) + 1e-9 for steps in batch.row_step_s)
    assert all(s["target_calls"] >= 1 and s["accepted"] <= s["drafted"] for s in batch.stats)
    assert batch.kv_bytes >= sum(batch.kv_bytes_alone) * 0.5


def test_a_compiled_batch_gives_the_eager_batchs_tokens(tiny_model):
    model, _ = tiny_model
    rows = [prompt(model, n, seed=n) for n in (120, 70)]
    technique = build_technique("self_spec+snapkv", {"snapkv.max_capacity_prompt": 32, "snapkv.window_size": 8})
    eager = technique.generate_batch(model, rows, 16)
    compiled = technique.generate_batch(model, rows, 16, compiled=True)
    assert compiled.compiled and compiled.tokens == eager.tokens


def test_a_sampled_batch_is_seeded_and_each_row_is_its_own(tiny_model):
    model, _ = tiny_model
    rows = [prompt(model, n, seed=n) for n in (60, 45)]
    technique = build_technique("self_spec", {"temperature": 1.0, "gamma": 3})
    first = technique.generate_batch(model, rows, 12, seed=3)
    assert first.tokens == technique.generate_batch(model, rows, 12, seed=3).tokens
    assert [len(t) for t in first.tokens] == [12, 12]


def test_long_context_decoding_benchmark_ends_with_its_json_record():
    """benchmarks/long_context_decoding.py on a random tiny shape: paired rows per length, batch size
    and configuration; lossless configurations match dense; one that cannot batch is skipped with why."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "long_context_decoding.py"
    done = subprocess.run([sys.executable, str(script), "--random-shape", "tiny", "--dtype", "float32", "--lengths", "160",
                           "--batch-sizes", "1", "2", "--new-tokens", "8", "--threads", "1", "--configs", "dense",
                           "self_spec:gamma=3+snapkv:max_capacity_prompt=48", "prompt_lookup", "kv_quant:bits=4"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == "long_context_decoding"
    rows = {(r["config"].split("(")[0], r["batch"]): r for r in record["rows"]}
    assert "skipped" in rows[("kv_quant", 2)]
    for batch in (1, 2):
        for name in ("dense", "self_spec", "prompt_lookup"):
            row = rows[(name, batch)]
            assert row["tokens_per_s"] > 0 and row["tokens_match_dense"] and row["context"] == 160
        assert 0 <= rows[("self_spec", batch)]["acceptance"] <= 1
