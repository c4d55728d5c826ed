"""Batch size as a workload axis: B sequences decoded together give each sequence exactly the tokens
it gets alone (every KV technique, prompts of different lengths), the spec sweeps `batch_size` like a
technique parameter and refuses it where a technique cannot batch, and the runner reports per-batch
throughput beside its per-sample rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from paretoray.actors import artifacts
from paretoray.actors.techniques import build_technique

NEW = 20
LENGTHS = (100, 73, 130)  # one batch, three prompt lengths: rows of different positions and capacities


def prompts(model, lengths=LENGTHS) -> list[torch.Tensor]:
    return [torch.randint(4, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]


CASES = [
    ("dense", {}),
    ("streaming_llm", {"n_sink": 4, "window": 16}),  # every row's ring full from its prompt on
    ("streaming_llm", {"n_sink": 4, "window": 110}),  # rows fill their rings at different steps
    ("snapkv", {"max_capacity_prompt": 0.3, "window_size": 8}),  # a budget per row: a share of its prompt
    ("snapkv", {"max_capacity_prompt": 24, "window_size": 8, "gqa": "per_query_head"}),
    ("pyramidkv", {"max_capacity_prompt": 40, "window_size": 4, "beta": 4}),
    ("h2o", {"max_capacity_prompt": 0.25}),  # per-row budgets while evicting
    ("h2o", {"max_capacity_prompt": 90, "recent_fraction": 0.3}),  # rows start evicting at different steps
    ("uniform_window", {"density": 0.3, "sink_tokens": 8}),
]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_a_sequence_decodes_in_a_batch_what_it_decodes_alone(tiny_model, name, params):
    model, _ = tiny_model
    technique = build_technique(name, params)
    batch_prompts = prompts(model)
    alone = [technique.generate(model, ids, NEW) for ids in batch_prompts]
    batch = technique.generate_batch(model, batch_prompts, NEW)  # the static step, run eagerly
    assert batch.tokens == [run.tokens for run in alone]
    assert not batch.compiled and batch.batch_size == 3
    assert len(batch.prefill_s) == 3 and len(batch.step_s) == NEW - 1 and batch.active == [3] * (NEW - 1)
    # Bytes: each row holds its own cache's slots, padded to the batch's largest (never less than the sum).
    assert batch.kv_bytes >= sum(batch.kv_bytes_alone)
    singles = [technique.generate_batch(model, [ids], NEW) for ids in batch_prompts]
    assert [s.kv_bytes for s in singles] == batch.kv_bytes_alone
    assert [s.tokens[0] for s in singles] == batch.tokens


def test_equal_lengths_batch_holds_exactly_the_sum_of_its_sequences(tiny_model):
    model, _ = tiny_model
    technique = build_technique("snapkv", {"max_capacity_prompt": 0.3, "window_size": 8})
    same = [torch.randint(4, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    batch = technique.generate_batch(model, same, NEW)
    assert batch.kv_bytes == sum(batch.kv_bytes_alone)
    assert batch.tokens == [technique.generate(model, ids, NEW).tokens for ids in same]


def test_eos_stops_a_sequence_but_not_the_batch(tiny_model):
    model, _ = tiny_model
    technique = build_technique("dense", {})
    batch_prompts = prompts(model)
    free = [technique.generate(model, ids, NEW).tokens for ids in batch_prompts]
    eos = {free[0][5]}  # the first sequence's sixth token ends it; the others may meet it too
    batch = technique.generate_batch(model, batch_prompts, NEW, eos_token_ids=eos)
    assert batch.tokens == [technique.generate(model, ids, NEW, eos).tokens for ids in batch_prompts]
    assert len(batch.tokens[0]) <= 6 and batch.active[0] == 3 and min(batch.active) >= 1
    assert sum(batch.active) == sum(len(t) - 1 for t in batch.tokens)


def test_context_only_placement_in_a_batch(tiny_model):
    model, _ = tiny_model
    technique = build_technique("h2o", {"max_capacity_prompt": 24})
    whole = prompts(model)
    contexts, questions = [ids[:, :-12] for ids in whole], [ids[:, -12:] for ids in whole]
    batch = technique.generate_batch(model, contexts, NEW, question_ids=questions)
    assert batch.tokens == [technique.generate(model, c, NEW, question_ids=q).tokens for c, q in zip(contexts, questions)]


@pytest.fixture
def hand_made_plan(tmp_path, monkeypatch):
    """A MoA plan written by hand (no profiling): spans that differ per head and grow with the prompt."""
    from paretoray.actors.moa_plan import Plan
    from paretoray.actors.techniques import moa

    monkeypatch.setattr(moa, "_PLANS", {})
    monkeypatch.setattr(moa, "_SERVING", {})
    monkeypatch.setattr(artifacts, "_BUILDERS", {})

    def builder(model, density, lengths):
        layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
        alphas = [[64 * ((h + layer) % 2) for h in range(heads)] for layer in range(layers)]
        betas = [[0.25 * ((h + layer + 1) % 2) for h in range(heads)] for layer in range(layers)]
        path = tmp_path / f"plan-{density}-{'-'.join(map(str, lengths))}.json"
        Plan(alphas, betas, density=density, lengths=list(lengths)).save(path)
        return path

    artifacts.install({"moa_plan": builder})


def test_moa_in_a_batch_decodes_what_each_sequence_decodes_alone(tiny_model, hand_made_plan):
    model, _ = tiny_model
    technique = build_technique("moa", {"density": 0.5})
    batch_prompts = prompts(model, (300, 200, 390))  # longer than a sink block + span: every head evicts
    technique.prepare(model, [300, 200, 390])
    alone = [technique.generate(model, ids, NEW) for ids in batch_prompts]
    batch = technique.generate_batch(model, batch_prompts, NEW)
    assert batch.tokens == [run.tokens for run in alone]
    assert [s["kv_density"] for s in batch.stats] == [run.stats["kv_density"] for run in alone]


def test_compiled_batch_decodes_the_eager_tokens(tiny_model):
    """One compiled graph per technique structure and batch size (10-25 s each on a CPU)."""
    model, _ = tiny_model
    for name, params in (("dense", {}), ("streaming_llm", {"n_sink": 4, "window": 16})):
        technique = build_technique(name, params)
        batch_prompts = prompts(model)
        compiled = technique.generate_batch(model, batch_prompts, NEW, compiled=True)
        assert compiled.compiled
        assert compiled.tokens == [technique.generate(model, ids, NEW).tokens for ids in batch_prompts]
        assert len(compiled.step_s) + (compiled.warmup_s > 0) >= NEW - 2  # the compiling step is left out


def test_a_technique_that_cannot_batch_refuses_with_its_reason(tiny_model):
    model, _ = tiny_model
    technique = build_technique("specdec", {})
    assert not technique.capabilities()["batched"]
    with pytest.raises(ValueError, match="specdec cannot decode a batch: its draft model decodes one sequence at a time"):
        technique.generate_batch(model, prompts(model), 4)
    for name in ("dense", "streaming_llm", "snapkv", "pyramidkv", "h2o", "moa", "uniform_window", "self_spec", "prompt_lookup"):
        assert build_technique(name, {}).capabilities()["batched"], name


# ---- the spec: batch_size as a swept dimension ----------------------------------------------------

SPEC = {
    "name": "b",
    "model": "smollm2-135m",
    "workload": {"task": "passkey", "context_lengths": [256], "batch_size": [1, 4]},
    "techniques": {"dense": None, "snapkv": {"max_capacity_prompt": {"low": 0.1, "high": 0.5}}},
    "objectives": {"throughput_tokens_s": "maximize", "accuracy": "maximize"},
    "trials": 4,
}


def spec_with(tmp_path, **workload):
    import yaml

    data = json.loads(json.dumps(SPEC))
    data["workload"].update(workload)
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_list_of_batch_sizes_is_a_dimension_of_every_technique(tmp_path):
    import optuna

    from paretoray.orchestrator.book import suggest
    from paretoray.orchestrator.spec import load_spec, search_space

    spec = load_spec(spec_with(tmp_path))
    space = search_space(spec)
    for technique in ("dense", "snapkv"):
        batch = [d for d in space[technique] if d.name == "workload.batch_size"]
        assert len(batch) == 1 and batch[0].kind == "categorical" and batch[0].choices == (1, 4)
    ranged = search_space(load_spec(spec_with(tmp_path, batch_size={"low": 2, "high": 8, "step": 2})))
    assert [(d.kind, d.low, d.high, d.step) for d in ranged["dense"]] == [("int", 2, 8, 2)]
    assert search_space(load_spec(spec_with(tmp_path, batch_size=4)))["dense"] == []  # fixed: stays in the workload
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    chosen = set()
    for _ in range(12):
        technique, params = suggest(study.ask(), space)
        chosen.add(params["workload.batch_size"])
    assert chosen == {1, 4}


@pytest.mark.parametrize("value,expected", [
    (0, "expected >= 1, got 0"),
    (300, "expected <= 256"),
    (2.5, "expected an integer"),
    ([], "an empty list of choices"),
    ([2, 0], "[1]: expected >= 1"),
    ({"low": 4, "high": 2}, "low (4) must not exceed high (2)"),
    ({"low": 1}, "got keys ['low']"),
    ({"low": 1, "high": 4, "step": 0}, "step: expected a positive integer"),
])
def test_a_bad_batch_size_names_the_field(tmp_path, value, expected):
    from paretoray.orchestrator.spec import SpecError, load_spec

    path = spec_with(tmp_path, batch_size=value)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in str(caught.value)
    problems = dict(caught.value.problems)
    assert expected in problems["workload.batch_size"]


def test_batches_are_refused_for_a_technique_that_cannot_batch_with_its_reason(tmp_path):
    import yaml

    from paretoray.orchestrator.spec import SpecError, load_spec, notes, search_space

    data = json.loads(json.dumps(SPEC))
    data["model"] = {"id": "smollm2-135m", "draft": "smollm2-135m-draft"}
    data["techniques"]["specdec"] = {"gamma": 3}
    path = tmp_path / "spec.yaml"
    for batch in (4, [2, 4], {"low": 2, "high": 8}):
        data["workload"]["batch_size"] = batch
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(SpecError) as caught:
            load_spec(path)
        message = dict(caught.value.problems)["workload.batch_size"]
        assert message.startswith("specdec cannot decode a batch (batch_size up to "), message
        assert "draft model decodes one sequence at a time" in message
    # A swept batch size that includes 1: specdec runs at 1 only, and validation says so.
    data["workload"]["batch_size"] = [1, 4]
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    batch = {d.name: d for d in search_space(spec)["specdec"]}["workload.batch_size"]
    assert batch.kind == "fixed" and batch.value == 1
    assert {d.name: d for d in search_space(spec)["snapkv"]}["workload.batch_size"].choices == (1, 4)
    assert notes(spec) == [f"specdec runs at batch_size 1 only ({build_technique('specdec', {}).batch_note})"]
    data["workload"]["batch_size"] = 1
    path.write_text(yaml.safe_dump(data))
    assert load_spec(path) and not notes(load_spec(path))  # one sequence at a time: fine


# ---- the runner: B samples at a time ------------------------------------------------------------

def test_runner_measures_batches_and_reports_their_columns(tiny_model_dir):
    from paretoray.actors.runner import TrialRunner

    runner = TrialRunner(str(tiny_model_dir), dtype="float32", device="cpu", threads=1, compile=False)
    workload = {"task": "passkey", "context_lengths": [256, 320], "samples_per_length": 3, "max_new_tokens": 5,
                "fidelity": True, "batch_size": [1, 2]}
    request = {"trial": 1, "technique": "snapkv", "params": {"max_capacity_prompt": 0.3, "window_size": 8,
                                                             "workload.batch_size": 2}, "workload": workload}
    record = runner.run_trial(request)
    assert record["status"] == "ok", record["traceback"]
    json.dumps(record)
    assert record["params"]["workload.batch_size"] == 2 and record["batch_size"] == 2
    assert record["label"].endswith(" batch_size=2") and record["env"]["batch_size"] == 2
    rows = record["samples"]
    assert len(rows) == 6
    # Per length: a batch of 2, then the last sample alone (its own size, no throughput figures).
    assert [r["batch_size"] for r in rows] == [2, 2, 1, 2, 2, 1]
    for row in rows:
        for key in ("latency_ms_per_token", "dense_latency_ms_per_token", "speedup", "ttft_ms", "batch_prefill_ms",
                    "kv_cache_bytes", "batch_kv_cache_bytes", "peak_memory_mb", "fidelity", "output", "accuracy"):
            assert row[key] is not None, key
        full = row["batch_size"] == 2
        assert (row["batch_tokens_per_s"] is not None) == full and (row["throughput_speedup"] is not None) == full
        assert row["batch_kv_cache_bytes"] >= row["kv_cache_bytes"] * row["batch_size"]
    # Each sequence's output is the one it gets alone: the B=1 trial on the same samples gives the same rows.
    alone = runner.run_trial(request | {"params": {"max_capacity_prompt": 0.3, "window_size": 8, "workload.batch_size": 1}})
    assert alone["status"] == "ok" and alone["label"] == record["label"].removesuffix(" batch_size=2")
    assert [r["output"] for r in alone["samples"]] == [r["output"] for r in rows]
    assert [r["fidelity"] for r in alone["samples"]] == [r["fidelity"] for r in rows]
    metrics = record["metrics"]
    for name in ("throughput_tokens_s", "dense_throughput_tokens_s", "throughput_speedup", "tokens_per_s",
                 "latency_ms_per_token", "speedup", "kv_cache_mb", "batch_kv_cache_mb", "peak_memory_mb", "fidelity"):
        assert math.isfinite(metrics[name]), name
    assert metrics["batch_kv_cache_mb"] > metrics["kv_cache_mb"]


def test_batches_hold_one_length_or_mix_lengths_as_asked():
    from types import SimpleNamespace

    from paretoray.actors.runner import _batches

    samples = [SimpleNamespace(context_length=n, sample_id=i) for i, n in enumerate([256, 256, 256, 512, 1024])]
    same = _batches(samples, 2)
    assert [[s.sample_id for s in b] for b in same] == [[0, 1], [2], [3], [4]]
    mixed = _batches(samples, 2, mixed=True)
    assert [[s.sample_id for s in b] for b in mixed] == [[0, 1], [2, 3], [4]]
