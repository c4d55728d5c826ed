"""Sweep spec validation: every bad input names the file, the field and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from paretoray.orchestrator.spec import SpecError, load_spec, search_space

ROOT = Path(__file__).resolve().parents[1]

VALID = {
    "name": "t",
    "model": "smollm2-135m",
    "workload": {"task": "passkey", "context_lengths": [256]},
    "techniques": {"dense": None, "streaming_llm": {"n_sink": 4, "window": {"low": 8, "high": 128, "log": True}}},
    "objectives": {"latency_ms_per_token": "minimize", "accuracy": "maximize"},
    "constraints": ["accuracy >= 0.5"],
    "trials": 4,
}


def write(tmp_path: Path, data, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems(tmp_path: Path, data) -> dict[str, str]:
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in str(caught.value)
    return dict(caught.value.problems)


def patched(**changes):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    for dotted, value in changes.items():
        target = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            target = target[key]
        target[leaf] = value
    return data


def test_shipped_sweeps_are_valid():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.name
        assert search_space(spec)


def test_valid_spec_space(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    space = search_space(spec)
    assert space["dense"] == []
    kinds = {d.name: d.kind for d in space["streaming_llm"]}
    assert kinds == {"n_sink": "fixed", "window": "int"}
    assert spec.model.id == "smollm2-135m" and spec.model.dtype == "auto"


@pytest.mark.parametrize(
    "changes,path,expected",
    [
        ({"techniques__snapkvv": {}}, "techniques.snapkvv", "unknown technique; available: dense"),
        ({"techniques__streaming_llm__windw": 8}, "techniques.streaming_llm.windw", "unknown parameter"),
        ({"techniques__streaming_llm__window": {"low": 64, "high": 8}}, "techniques.streaming_llm.window", "must not exceed"),
        ({"techniques__streaming_llm__window": {"low": 0, "high": 8}}, "techniques.streaming_llm.window.low", "expected >= 1"),
        ({"techniques__streaming_llm__n_sink": 1000}, "techniques.streaming_llm.n_sink", "expected <= 64"),
        ({"techniques__streaming_llm__n_sink": [1, "x"]}, "techniques.streaming_llm.n_sink[1]", "expected a number"),
        ({"techniques__streaming_llm__window": {"low": 8, "high": 64, "log": True, "step": 2}},
         "techniques.streaming_llm.window", "either log or step"),
        ({"objectives__accuracy": "minimize"}, "objectives.accuracy", "expected maximize"),
        ({"objectives__speed": "maximize"}, "objectives.speed", "unknown metric"),
        ({"constraints": ["accuracy > 0.5"]}, "constraints[0]", "expected 'METRIC >= NUMBER'"),
        ({"constraints": ["acc >= 0.5"]}, "constraints[0]", "unknown metric 'acc'"),
        ({"workload__task": "qa"}, "workload.task", "unknown task 'qa'; available: "),
        ({"workload__context_lengths": [8]}, "workload.context_lengths", ">= 64"),
        ({"workload__context_lengths": []}, "workload.context_lengths", "at least 1 item"),
        ({"workload__num_keys": 3}, "workload.num_keys", "unknown field"),  # passkey has one key
        ({"workload__depths": [0.5, 2.0]}, "workload.depths", "fractions in [0, 1]"),
        ({"workload__repeats": 0}, "workload.repeats", "greater than or equal to 1"),
        ({"workload": {"task": "suite", "max_new_tokens": 8, "tasks": {"passkey": {"context_lengths": [512]}}}},
         "workload.max_new_tokens", "a budget per entry"),
        ({"constraints": ["relative_accuracy/ctx1024 >= 0.5"]}, "constraints[0]", "unknown metric"),
        ({"workload__seed": 2**40}, "workload.seed", "less than or equal to"),
        ({"objectives": {"accuracy_ci_low": "minimize"}}, "objectives.accuracy_ci_low", "expected maximize"),
        ({"workload__samples_per_length": 0}, "workload.samples_per_length", "greater than or equal to 1"),
        ({"workload__extra": 1}, "workload.extra", "unknown field"),
        ({"trials": "ten"}, "trials", "valid integer"),
        ({"sampler": {"name": "cmaes"}}, "sampler.name", "Input should be"),
        ({"actors": {"count": 0}}, "actors.count", "greater than or equal to 1"),
        ({"actors": {"num_gpus": 1.5}}, "actors.num_gpus", "must be a whole number"),
        ({"actors": {"max_trial_retries": -1}}, "actors.max_trial_retries", "greater than or equal to 0"),
        ({"actors": {"spread": "yes"}}, "actors.spread", "valid boolean"),
        ({"model": "./no/such/model"}, "model", "no such model directory"),
        ({"sampler": {"name": "grid"}}, "techniques.streaming_llm.window", "grid sampler needs finite"),
        ({"techniques__specdec": {"gamma": [2, 4]}}, "model.draft", "specdec need a draft model"),
        ({"techniques__specdec_pp": {"threshold": {"low": 0.1, "high": 1.5}}}, "techniques.specdec_pp.threshold.high", "expected <= 1.0"),
    ],
)
def test_invalid_field_is_named(tmp_path, changes, path, expected):
    found = problems(tmp_path, patched(**changes))
    assert path in found, found
    assert expected in found[path], found[path]


def test_missing_required_fields(tmp_path):
    data = patched()
    del data["trials"], data["objectives"]
    found = problems(tmp_path, data)
    assert found["trials"] == "Field required" and "objectives" in found


def test_malformed_yaml_names_line(tmp_path):
    found = problems(tmp_path, "name: x\ntechniques: [dense\nobjectives: {}\n")
    (where, message), = found.items()
    assert where.startswith("line ") and "not valid YAML" in message


def test_cli_rejects_invalid_file_before_starting_anything(tmp_path):
    path = write(tmp_path, patched(techniques__streaming_llm__window={"low": 64, "high": 8}), "bad.yaml")
    home = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "paretoray.orchestrator.cli", "sweep", "run", str(path)],
        capture_output=True, text=True, env={"PARETORAY_HOME": str(home), "PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert result.returncode == 2
    assert f"{path}: invalid sweep spec" in result.stderr
    assert "techniques.streaming_llm.window: low (64) must not exceed high (8)" in result.stderr
    assert not home.exists()  # no store was created, so no run was recorded
    assert "Ray" not in result.stderr


def test_decoding_task_needs_no_context_lengths(tmp_path):
    data = patched(workload={"task": "arithmetic", "samples_per_length": 3})
    spec = load_spec(write(tmp_path, data))
    assert spec.workload.task == "arithmetic" and spec.workload.task_settings() == {"samples_per_length": 3}
    assert spec.workload.task_object.config.samples_per_length == 3


def test_dataset_workload_is_checked_before_anything_runs(tmp_path):
    missing = patched(workload={"task": "dataset", "path": str(tmp_path / "none.jsonl"), "metric": "contains"})
    found = problems(tmp_path, missing)
    assert "workload.path" in found and "none.jsonl" in found["workload.path"]
    bad_metric = patched(workload={"task": "dataset", "path": str(tmp_path / "none.jsonl"), "metric": "bleu"})
    assert "workload.metric" in problems(tmp_path, bad_metric)
