"""The actor's compute, without Ray: a trial is plain data in, plain data out, and never raises."""

from __future__ import annotations

import json
import math

import pytest

from paretoray.actors.runner import TrialRunner
from paretoray.actors.workload import Workload

WORKLOAD = {"task": "passkey", "context_lengths": [256, 320], "samples_per_length": 2, "max_new_tokens": 5, "fidelity": True}


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return TrialRunner(str(tiny_model_dir), dtype="float32", device="cpu", threads=1)


def test_trial_record_is_plain_data_with_every_metric(runner):
    record = runner.run_trial({"trial": 3, "technique": "streaming_llm", "params": {"window": 16}, "workload": WORKLOAD})
    assert record["status"] == "ok", record["traceback"]
    json.dumps(record)  # plain data: crosses Ray and lands in MLflow as JSON
    assert record["params"] == {"n_sink": 4, "window": 16}
    assert record["label"] == "streaming_llm(n_sink=4,window=16)"
    metrics = record["metrics"]
    for name in ("accuracy", "fidelity", "latency_ms_per_token", "ttft_ms", "tokens_per_s", "kv_cache_mb",
                 "peak_memory_mb", "speedup", "ttft_speedup", "accuracy/ctx256", "accuracy/ctx320"):
        assert math.isfinite(metrics[name]), name
    assert len(record["samples"]) == 4
    assert {s["context_length"] for s in record["samples"]} == {256, 320}
    assert all(s["prompt_tokens"] <= s["context_length"] for s in record["samples"])
    # KV bytes are what is physically held: sinks + window + the next token's slot, K and V, float32.
    cfg = runner.model.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert metrics["kv_cache_mb"] * 2**20 == pytest.approx(cfg.num_hidden_layers * (4 + 16 + 1) * per_token)
    for key in ("torch", "transformers", "ray", "device_name", "dtype", "attn_implementation", "batch_size"):
        assert key in record["env"]


def test_dense_paired_with_dense_gives_a_speedup_interval_containing_one(runner):
    # 8 samples x 3 repeats, the order alternated: the paired ratios of identical work scatter around 1.
    workload = WORKLOAD | {"context_lengths": [256], "samples_per_length": 8, "repeats": 3, "fidelity": True}
    record = runner.run_trial({"trial": 0, "technique": "dense", "params": {}, "workload": workload})
    assert record["status"] == "ok", record["traceback"]
    metrics = record["metrics"]
    assert metrics["fidelity"] == 1.0  # by definition: nothing is teacher-forced
    assert metrics["speedup_ci_low"] <= 1.0 <= metrics["speedup_ci_high"]
    assert metrics["speedup_ci_low"] <= metrics["speedup"] <= metrics["speedup_ci_high"]
    assert metrics["ttft_speedup_ci_low"] <= metrics["ttft_speedup"] <= metrics["ttft_speedup_ci_high"]
    assert metrics["output_match"] == 1.0 and metrics["accuracy"] == metrics["dense_accuracy"]
    assert metrics["dense_latency_ms_per_token"] > 0 and metrics["latency_ms_per_token"] > 0
    rows = record["samples"]
    assert len(rows) == 8 and all(r["repeats"] == 3 and r["speedup"] > 0 for r in rows)
    assert all(r["output"] == r["dense_output"] for r in rows)


def test_rows_carry_scores_paired_timings_and_intervals(runner):
    record = runner.run_trial({"trial": 9, "technique": "streaming_llm", "params": {"window": 8}, "workload": WORKLOAD})
    assert record["status"] == "ok", record["traceback"]
    metrics, rows = record["metrics"], record["samples"]
    for row in rows:
        for key in ("accuracy", "dense_accuracy", "speedup", "ttft_speedup", "latency_ms_per_token",
                    "dense_latency_ms_per_token", "ttft_ms", "dense_ttft_ms", "output", "dense_output"):
            assert key in row, key
        assert row["speedup"] == pytest.approx(row["dense_latency_ms_per_token"] / row["latency_ms_per_token"])
    assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"]
    assert metrics["accuracy"] == pytest.approx(sum(r["accuracy"] for r in rows) / len(rows))
    dense_mean = sum(r["dense_accuracy"] for r in rows) / len(rows)
    if dense_mean > 0:
        assert metrics["relative_accuracy"] == pytest.approx(metrics["accuracy"] / dense_mean)


def test_failing_trial_is_recorded_and_actor_stays_usable(runner):
    bad = runner.run_trial({"trial": 1, "technique": "streaming_llm", "params": {"window": -3}, "workload": WORKLOAD})
    assert bad["status"] == "failed"
    assert "window: expected >= 1" in bad["error"]
    assert "Traceback" in bad["traceback"]
    unknown = runner.run_trial({"trial": 2, "technique": "nope", "params": {}, "workload": WORKLOAD})
    assert unknown["status"] == "failed" and "available:" in unknown["error"]
    good = runner.run_trial({"trial": 4, "technique": "dense", "params": {}, "workload": WORKLOAD})
    assert good["status"] == "ok"


def test_context_only_placement_is_recorded_and_compresses_before_the_question(runner):
    workload = WORKLOAD | {"query_placement": "context_only", "fidelity": False}
    request = {"trial": 5, "technique": "snapkv", "params": {"max_capacity_prompt": 48, "window_size": 8}, "workload": workload}
    record = runner.run_trial(request)
    assert record["status"] == "ok", record["traceback"]
    assert record["query_placement"] == "context_only"
    cfg = runner.model.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    samples = {s.sample_id: s for s in runner._workload_samples(Workload.model_validate(workload))}
    for row in record["samples"]:
        # The context is cut to 48 entries before the question exists; the whole question and the
        # decoded tokens (all but the last, never fed back) are appended after it.
        held = 48 + len(samples[row["sample_id"]].question_ids) + row["new_tokens"] - 1
        assert row["kv_cache_bytes"] == cfg.num_hidden_layers * held * per_token


def test_speculative_trial_reports_acceptance_and_is_lossless(tiny_model_dir, tmp_path):
    from tests.tiny import save_tiny_llama

    draft = save_tiny_llama(tmp_path / "draft", num_layers=1, seed=3)
    speculative = TrialRunner(str(tiny_model_dir), dtype="float32", device="cpu", threads=1, draft=str(draft))
    record = speculative.run_trial({"trial": 6, "technique": "specdec", "params": {"gamma": 3}, "workload": WORKLOAD})
    assert record["status"] == "ok", record["traceback"]
    metrics = record["metrics"]
    assert metrics["output_match"] == 1.0  # greedy speculative decoding reproduces the target exactly
    assert 0.0 <= metrics["acceptance_rate"] <= 1.0
    assert 1.0 <= metrics["tokens_per_target_call"] <= 4.0  # at most gamma accepted + the bonus token
    assert 0 < metrics["target_calls_per_token"] <= 1.0 and metrics["draft_calls_per_token"] > 0
    assert "fidelity" not in metrics


def test_decoding_task_scores_equality_with_the_target(tiny_model_dir, tmp_path):
    from tests.tiny import save_tiny_llama

    draft = save_tiny_llama(tmp_path / "draft", num_layers=1, seed=4)
    speculative = TrialRunner(str(tiny_model_dir), dtype="float32", device="cpu", threads=1, draft=str(draft))
    workload = {"task": "code", "samples_per_length": 2, "max_new_tokens": 6, "fidelity": False}
    record = speculative.run_trial({"trial": 7, "technique": "specdec", "params": {"gamma": 2}, "workload": workload})
    assert record["status"] == "ok", record["traceback"]
    assert record["metrics"]["accuracy"] == record["metrics"]["output_match"] == 1.0
    assert not any(key.startswith("accuracy/ctx") for key in record["metrics"])


def test_a_technique_without_model_work_skips_samples_and_reference(runner):
    # `noop` declares uses_model = False: no prompts are built and no dense reference is measured.
    workload = WORKLOAD | {"context_lengths": [4096]}
    record = runner.run_trial({"trial": 8, "technique": "noop", "params": {"sleep_s": 0.05, "knob": 0.5}, "workload": workload})
    assert record["status"] == "ok", record["traceback"]
    assert record["metrics"] == {"accuracy": 0.5, "latency_ms_per_token": 3.25, "tokens_per_s": 1000.0 / 3.25}
    assert record["samples"] == [] and 0.05 <= record["wall_s"] < 2.0
    assert Workload.model_validate(workload).key not in runner._samples
    json.dumps(record)


def test_kvzip_reports_what_its_reconstruction_costs_inside_the_prefill(runner):
    workload = WORKLOAD | {"query_placement": "context_only", "fidelity": False, "context_lengths": [256], "samples_per_length": 2}
    record = runner.run_trial({"trial": 6, "technique": "kvzip", "params": {"max_capacity_prompt": 64}, "workload": workload})
    assert record["status"] == "ok", record["traceback"]
    metrics = record["metrics"]
    assert 0 < metrics["reconstruction_s"] * 1000 < metrics["ttft_ms"]
    assert all(r["reconstruction_tokens"] > 0 for r in record["samples"])
