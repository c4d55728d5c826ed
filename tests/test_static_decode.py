"""The static-shape decode path (paretoray.actors.static_decode): its slot rules reproduce every
technique's eager cache exactly, over configurations the contract test's examples do not reach
(rings that fill during decoding, budgets above the prompt, per-query-head caches, context-only
placement), first without compilation (fast: the rules alone), then through torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

from paretoray.actors import static_decode
from paretoray.actors.static_decode import SlotGroup, StaticLayer
from paretoray.actors.techniques import build_technique

NEW = 24


@pytest.fixture
def uncompiled(monkeypatch):
    """The static step run eagerly: the slot rules without inductor."""
    monkeypatch.setattr(static_decode, "_compiled", lambda device: static_decode._step)


def prompt(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


CASES = [
    ("dense", {}, 100),
    ("streaming_llm", {"n_sink": 4, "window": 16}, 100),  # ring full from the prompt on
    ("streaming_llm", {"n_sink": 4, "window": 110}, 100),  # fills while decoding, then wraps
    ("streaming_llm", {"n_sink": 0, "window": 8}, 40),  # no sinks
    ("snapkv", {"max_capacity_prompt": 24, "window_size": 8}, 100),
    ("snapkv", {"max_capacity_prompt": 24, "window_size": 8, "gqa": "per_query_head"}, 100),
    ("snapkv", {"max_capacity_prompt": 400}, 100),  # budget above the prompt: nothing compressed
    ("pyramidkv", {"max_capacity_prompt": 40, "window_size": 4, "beta": 4}, 200),
    ("h2o", {"max_capacity_prompt": 20, "recent_fraction": 0.5}, 100),
    ("h2o", {"max_capacity_prompt": 110, "recent_fraction": 0.3}, 100),  # evicts only once decoding fills it
    ("h2o", {"max_capacity_prompt": 16, "recent_fraction": 0.0}, 60),
    ("uniform_window", {"density": 0.3, "sink_tokens": 8}, 120),
    ("uniform_window", {"density": 0.5, "sink_tokens": 0}, 120),
]


@pytest.mark.parametrize("name,params,length", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_static_rules_decode_what_the_eager_caches_decode(tiny_model, uncompiled, name, params, length):
    model, _ = tiny_model
    technique = build_technique(name, params)
    ids = prompt(model, length, seed=length)
    eager = technique.generate(model, ids, NEW)
    static = technique.generate(model, ids, NEW, compiled=True)
    assert static.compiled
    assert static.tokens == eager.tokens
    # Teacher-forced (fidelity): the same agreement on the same forced continuation.
    forced = build_technique("dense", {}).generate(model, ids, NEW).tokens
    assert technique.generate(model, ids, NEW, forced_tokens=forced, compiled=True).agreement == \
        technique.generate(model, ids, NEW, forced_tokens=forced).agreement


@pytest.mark.parametrize("name,params", [("snapkv", {"max_capacity_prompt": 24, "window_size": 8}),
                                         ("h2o", {"max_capacity_prompt": 24}),
                                         ("streaming_llm", {"n_sink": 4, "window": 16})])
def test_context_only_placement_compresses_then_decodes_statically(tiny_model, uncompiled, name, params):
    model, _ = tiny_model
    technique = build_technique(name, params)
    ids = prompt(model, 120, seed=3)
    context, question = ids[:, :100], ids[:, 100:]
    eager = technique.generate(model, context, NEW, question_ids=question)
    static = technique.generate(model, context, NEW, question_ids=question, compiled=True)
    assert static.compiled and static.tokens == eager.tokens


def test_moa_plan_decodes_the_same(tiny_model, uncompiled, tmp_path, monkeypatch):
    """MoA's per-head spans: heads of unequal capacity each get their own group (no padding)."""
    from paretoray.actors.techniques.elastic_attention import ElasticSpans

    class Staggered(ElasticSpans):  # a hand-made plan: three different spans in every layer
        name = "staggered_test"

        def sinks(self):
            return 8

        def layer_spans(self, model, layer_idx, prompt_len):
            return [[10, 10, 40][h % 3] + layer_idx for h in range(model.config.num_key_value_heads)]

    model, _ = tiny_model
    technique = Staggered()
    ids = prompt(model, 90, seed=5)
    eager = technique.generate(model, ids, NEW)
    static = technique.generate(model, ids, NEW, compiled=True)
    assert static.compiled and static.tokens == eager.tokens


def test_slot_rule_fills_empty_slots_then_overwrites_the_oldest_non_sink():
    keys = torch.arange(4, dtype=torch.float32).view(1, 1, 4, 1)
    group = SlotGroup(keys, keys.clone(), torch.arange(4)[None, None], capacity=6, n_sink=2)
    layer = StaticLayer([group])
    for position in range(4, 10):
        value = torch.full((1, 1, 1, 1), float(position))
        layer.update(value, value, torch.tensor(position))
    # Positions 0 and 1 are sinks; 2..5 were overwritten oldest first, after the two empty slots filled.
    assert sorted(group.positions.flatten().tolist()) == [0, 1, 6, 7, 8, 9]
    assert group.keys.flatten().tolist()[:2] == [0.0, 1.0]
    assert group.nbytes() == 2 * 6 * 4


def test_kv_bytes_count_every_preallocated_slot(tiny_model, uncompiled):
    model, _ = tiny_model
    config = model.config
    ids = prompt(model, 64, seed=1)
    run = build_technique("streaming_llm", {"n_sink": 4, "window": 16}).generate(model, ids, NEW, compiled=True)
    head_dim = config.hidden_size // config.num_attention_heads
    slots = 4 + 16 + 1
    assert run.kv_bytes == 2 * config.num_hidden_layers * config.num_key_value_heads * slots * head_dim * 4


def test_compiled_step_compiles_once_for_every_prompt_length_and_budget(tiny_model):
    """The slot axis is symbolic and budgets are device scalars: a new length or budget replays the
    graph a technique already compiled; the compile is left out of the measured steps."""
    model, _ = tiny_model
    first = build_technique("h2o", {"max_capacity_prompt": 20}).generate(model, prompt(model, 80, 1), 6, compiled=True)
    assert first.compiled
    before = static_decode.graphs_compiled()
    for budget, length in ((24, 96), (30, 130), (50, 70)):
        run = build_technique("h2o", {"max_capacity_prompt": budget}).generate(model, prompt(model, length, 2), 6, compiled=True)
        assert run.warmup_s == 0 and len(run.step_s) == 5
    assert static_decode.graphs_compiled() == before


def kept_positions(technique, model, ids, steps: int, static: bool) -> list[list[list[int]]]:
    """Per layer and head, the text positions the cache holds after decoding `steps` tokens."""
    from paretoray.actors.generation import decode, eager_step, prefill

    with torch.inference_mode():
        with technique.applied(model) as cache:
            first, _ = prefill(model, ids, cache)
            if not static:
                decode(eager_step(model, cache), first, steps, ids.device)
                return [[sorted(head) for head in layer.positions[0].tolist()] for layer in cache.layers]
            converted = technique.static_cache(model, cache, steps)
        with static_decode.static_attention_installed(model):
            decode(static_decode.compiled_step(model, converted), first, steps, ids.device)
    return [[sorted(p for p in head if p >= 0) for head in layer.groups[0].positions[0].tolist()] for layer in converted.layers]


@pytest.mark.parametrize("params", [{"max_capacity_prompt": 20, "recent_fraction": 0.5},
                                    {"max_capacity_prompt": 110, "recent_fraction": 0.3},
                                    {"max_capacity_prompt": 16, "recent_fraction": 0.0}])
def test_h2o_keeps_the_same_entries_as_its_eager_cache(tiny_model, uncompiled, params):
    model, _ = tiny_model
    technique = build_technique("h2o", params)
    ids = prompt(model, 100, seed=11)
    eager = kept_positions(technique, model, ids, NEW, static=False)
    assert kept_positions(technique, model, ids, NEW, static=True) == eager
    assert all(len(head) == min(technique.layer_budget(0, 1, 100), 100 + NEW - 1) for layer in eager for head in layer)


@pytest.mark.parametrize("option,horizon", [(True, None), ("auto", {"trials_per_actor": 1, "graphs": 2}),
                                            ("auto", {"trials_per_actor": 10**6, "graphs": 1})],
                         ids=["true", "auto-short-sweep", "auto-long-sweep"])
def test_the_runner_decodes_compiled_as_the_spec_asks_and_records_it(tiny_model_dir, option, horizon):
    from paretoray.actors.runner import TrialRunner

    runner = TrialRunner(str(tiny_model_dir), dtype="float32", device="cpu", threads=1, compile=option, compile_horizon=horizon)
    workload = {"task": "passkey", "context_lengths": [256], "samples_per_length": 2, "max_new_tokens": 6, "fidelity": True}
    record = runner.run_trial({"trial": 0, "technique": "streaming_llm", "params": {"window": 16}, "workload": workload})
    assert record["status"] == "ok", record["traceback"]
    env = record["env"]
    if option is True:
        assert env["decode"] == "compiled"
    elif horizon["trials_per_actor"] == 1:  # 2 samples x 5 steps x 3 runs cannot repay a compile: not even tried
        assert env["decode"] == "eager" and "cannot repay" in env["compile_check"]
    else:  # a paired eager/compiled check chose, and says what it measured
        assert env["decode"] in ("compiled", "eager")
        assert "first compile" in env["compile_check"] and "ms/token" in env["compile_check"]
    expected = env["decode"] == "compiled"
    for row in record["samples"]:
        assert row["compiled"] is expected and row["dense_compiled"] is expected
        assert row["decode_warmup_s"] == 0  # compiled in the trial's warm-up, not in a measured sample
    assert math.isfinite(record["metrics"]["fidelity"])


def test_the_spec_takes_compile_auto_true_or_false_and_names_a_bad_value():
    from paretoray.orchestrator.spec import SpecError, parse

    base = {"name": "c", "workload": {"task": "passkey", "context_lengths": [128]},
            "techniques": {"dense": {}}, "objectives": {"latency_ms_per_token": "minimize"}, "trials": 1}
    assert parse(base | {"model": {"id": "smollm2-135m"}}, "<c>").model.compile == "auto"
    for value in (True, False, "auto"):
        assert parse(base | {"model": {"id": "smollm2-135m", "compile": value}}, "<c>").model.compile == value
    with pytest.raises(SpecError, match="model.compile"):
        parse(base | {"model": {"id": "smollm2-135m", "compile": "yes"}}, "<c>")


def test_decode_floor_benchmark_ends_with_its_json_record(tmp_path):
    """benchmarks/decode_floor.py on a random tiny shape: the last stdout line is the record the
    issue names (rows with config, context, compiled, ms_per_token, floor_ms_per_token)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_floor.py"
    done = subprocess.run([sys.executable, str(script), "--random-shape", "tiny", "--dtype", "float32", "--lengths", "96",
                           "--new-tokens", "4", "--threads", "1", "--configs", "dense"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == "decode_floor" and record["read_bandwidth_gb_s"] > 0
    rows = record["rows"]
    assert {(r["config"], r["compiled"]) for r in rows} == {("dense", False), ("dense", True)}
    for row in rows:
        assert row["context"] == 96 and row["ms_per_token"] > 0 and 0 < row["floor_ms_per_token"] < row["ms_per_token"]
        assert row["tokens_match"]
