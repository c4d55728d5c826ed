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
        ({"techniques__snapkvv": {}}, "techniques.snapkvv", "unknown technique; available: adakv, dense"),
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


# ---- issue 14: every bad input gets a clean error ---------------------------------------------

QUICKSTART = (ROOT / "sweeps" / "quickstart.yaml").read_text()


def cli_validate(path: Path, capsys) -> tuple[int, str]:
    from paretoray.orchestrator.cli import main

    code = main(["sweep", "validate", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    found = problems(tmp_path, QUICKSTART + "trials: 100000\n")
    (where, message), = found.items()
    last = QUICKSTART.count("\n") + 1
    assert where == f"line {last}, column 1"
    assert "duplicate key 'trials' (first at line" in message
    nested = problems(tmp_path, QUICKSTART.replace("  seed: 0\n  max_new_tokens: 8", "  seed: 0\n  seed: 3\n  max_new_tokens: 8"))
    (where, message), = nested.items()
    assert where.startswith("line 17,") and "duplicate key 'seed' (first at line 16)" in message
    flow = problems(tmp_path, QUICKSTART.replace("n_sink: 4", "n_sink: {low: 1, low: 2, high: 3}"))
    assert "duplicate key 'low'" in next(iter(flow.values()))
    # A merge key's values are overridden by keys written beside it, as YAML says: no duplicate.
    merged = "base: &b {n_sink: 4}\n" + QUICKSTART.replace("    n_sink: 4", "    <<: *b").replace("    window:", "    window:", 1)
    found = problems(tmp_path, merged)
    assert list(found) == ["base"]  # only the unknown top-level field


@pytest.mark.parametrize(
    "changes,path,expected",
    [
        ({"sampler": {"name": "tpe", "seed": 2**32}}, "sampler.seed", "less than or equal to 4294967295"),
        ({"sampler": {"name": "tpe", "seed": -1}}, "sampler.seed", "greater than or equal to 0"),
        ({"workload__seed": 2**32}, "workload.seed", "less than or equal to 4294967295"),
        ({"actors": {"num_cpus": float("inf")}}, "actors.num_cpus", "finite"),
        ({"actors": {"num_cpus": 1e6}}, "actors.num_cpus", "less than or equal to 1024"),
        ({"actors": {"num_gpus": float("nan")}}, "actors.num_gpus", "finite"),
        ({"name": "a" * 5000}, "name", "at most 100 characters"),
        ({"actors": {"trial_timeout_s": 0}}, "actors.trial_timeout_s", "greater than 0 and at most 604800"),
        ({"actors": {"trial_timeout_s": float("inf")}}, "actors.trial_timeout_s", "finite"),
        ({"actors": {"trial_timeout_s": "never"}}, "actors.trial_timeout_s", "'auto'"),
        ({"trials": 100_001}, "trials", "less than or equal to 100000"),
        ({"techniques__streaming_llm__n_sink": 10**400}, "techniques.streaming_llm.n_sink", "integer out of range"),
        ({"workload__samples_per_length": -(2**70)}, "workload.samples_per_length", "integer out of range"),
        ({"techniques__streaming_llm__n_sink": {"low": 0, "high": 64, "step": 1e-300}}, "techniques.streaming_llm.n_sink.step",
         "more than 1,000,000 values"),
        ({"constraints": ["accuracy >= 1e999"]}, "constraints[0]", "finite bound"),
        ({"workload__context_lengths": [256, 10**9]}, "workload.context_lengths",
         "1000000000 prompt tokens + 8 new tokens exceed the context window of 'smollm2-135m' (8192 tokens)"),
        ({"workload__context_lengths": [8190]}, "workload.context_lengths", "8190 prompt tokens + 8 new tokens exceed"),
        ({"workload": {"task": "suite", "tasks": {"niah": {"context_lengths": [8192], "max_new_tokens": 32}}}},
         "workload.tasks.niah.context_lengths", "8192 prompt tokens + 32 new tokens exceed"),
        ({"constraints": ["fidelity >= 0.9"], "workload__fidelity": False}, "constraints[0]",
         "fidelity is never reported by dense, streaming_llm: needs workload.fidelity: true"),
        ({"objectives": {"fidelity": "maximize"}, "workload__fidelity": False}, "objectives.fidelity", "needs workload.fidelity: true"),
        ({"constraints": ["acceptance_rate >= 0.5"]}, "constraints[0]", "acceptance_rate is never reported by dense, streaming_llm"),
        ({"objectives": {"kv_density": "minimize"}}, "objectives.kv_density", "kv_density is never reported by dense, streaming_llm"),
        ({"constraints": ["accuracy/ctx512 >= 0.5"]}, "constraints[0]", "no breakdown 'ctx512' in this workload (it has ctx256)"),
        ({"techniques": {"noop": {}}, "objectives": {"speedup": "maximize"}, "constraints": []}, "objectives.speedup",
         "a technique that does no model work reports only accuracy, latency_ms_per_token, tokens_per_s"),
    ],
)
def test_bounds_and_unproduced_metrics(tmp_path, changes, path, expected):
    found = problems(tmp_path, patched(**changes))
    assert path in found, found
    assert expected in found[path], found[path]


def test_metrics_every_technique_reports_are_accepted(tmp_path):
    # fidelity is measured for lossy techniques (and dense, trivially) when the workload asks for it;
    # speculative statistics exist where every swept technique is speculative.
    assert load_spec(write(tmp_path, patched(constraints=["fidelity >= 0.5"], workload__fidelity=True)))
    spec = patched(model={"id": "smollm2-135m", "draft": "smollm2-135m-draft"}, techniques={"specdec": {"gamma": [2, 4]}},
                   objectives={"acceptance_rate": "maximize", "speedup": "maximize"}, constraints=["draft_calls_per_token <= 8"])
    assert load_spec(write(tmp_path, spec))
    lossless = problems(tmp_path, {**spec, "constraints": ["fidelity >= 0.5"]})
    assert "lossless technique's output is dense's" in lossless["constraints[0]"]
    assert load_spec(write(tmp_path, patched(techniques={"noop": {}}, constraints=[])))  # accuracy, latency from noop


def test_noop_reports_what_the_registry_says_it_does():
    from paretoray.actors.metrics import METRICS
    from paretoray.actors.techniques import build_technique

    reported = build_technique("noop", {"sleep_s": 0.0}).measure_without_model()
    assert set(reported) == {m.name for m in METRICS.values() if m.needs.without_model}


def test_window_unknown_is_not_checked(tmp_path):
    # A hub id that is not on this machine: its window cannot be read without downloading, so no error.
    assert load_spec(write(tmp_path, patched(model="someorg/not-here", workload__context_lengths=[10**6])))


def test_local_model_window_is_read_from_its_config(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"max_position_embeddings": 512}')
    found = problems(tmp_path, patched(model=str(model), workload__context_lengths=[256, 1024]))
    assert "1024 prompt tokens + 8 new tokens exceed the context window" in found["workload.context_lengths"]
    assert "(512 tokens)" in found["workload.context_lengths"]


@pytest.mark.parametrize(
    "content,where,expected",
    [
        (QUICKSTART.encode() + "description: caf\xe9\n".encode("latin-1"), "line 36", "not UTF-8 text: byte 0xe9"),
        (QUICKSTART.encode("utf-16"), "", "UTF-16 text (byte-order mark): save the file as UTF-8"),
        (QUICKSTART.encode() + b"\x00", "line 36", "a NUL byte"),
        (b"a: &a [x,x,x,x,x,x,x,x,x]\n" + b"".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n".encode() for i in range(9)),
         "line 9, column", "more than 64 aliases"),
        (b"a: &a [x,x,x,x,x,x,x,x,x,x]\n" + b"".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n".encode() for i in range(5)),
         "line 4, column", "aliases expand the document beyond 10,000 values"),
        (b"a: &a [*a]\n", "line 1, column 4", "an alias refers to the value it is inside of"),
        (b"a: " + b"[" * 100_000 + b"]" * 100_000, "line 1, column 35", "nested deeper than 32 levels"),
        (b"a: {" + b"b: {" * 5000 + b"}" * 5001, "line 1, column", "nested deeper than 32 levels"),
        (b"trials: " + b"1" * 5000 + b"\n", "", "Exceeds the limit"),
        (b"when: 2024-13-45\n", "", "month must be in 1..12"),
        (b"# comment\n" * 120_000, "", "larger than 1024 KiB"),
    ],
)
def test_unreadable_files_are_clean_errors(tmp_path, capsys, content, where, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    (found_where, message), = caught.value.problems
    assert found_where.startswith(where) and expected in message, caught.value.problems
    code, output = cli_validate(path, capsys)
    assert code == 2 and str(path) in output and "Traceback" not in output and len(output) < 4000


def test_a_long_error_is_capped(tmp_path):
    data = patched()
    data["techniques"]["streaming_llm"] = {f"p{i}" * 500: "x" * 10_000 for i in range(60)}
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    text = str(caught.value)
    assert len(caught.value.problems) == 60 and len(text) < 10_000 and "... and 40 more" in text


def test_cli_run_checks_name_and_trials_before_anything(tmp_path, capsys, monkeypatch):
    from paretoray.orchestrator.cli import main

    monkeypatch.setenv("PARETORAY_HOME", str(tmp_path / "runs"))
    path = write(tmp_path, VALID)
    for argv, expected in [
        (["sweep", "run", str(path), "--name", "../escape"], "--name: expected letters, digits"),
        (["sweep", "run", str(path), "--name", "x" * 101], "--name: at most 100 characters"),
        (["sweep", "run", str(path), "--trials", "-5"], "--trials: expected 1 to 100,000 trials, got -5"),
        (["sweep", "run", str(path), "--trials", "100001"], "--trials: expected 1 to 100,000 trials"),
        (["sweep", "resume", "t", "--trials", "0"], "--trials: expected 1 to 100,000 trials, got 0"),
        (["sweep", "resume", "a/../b"], "NAME: expected letters, digits"),
    ]:
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        assert expected in out.err and "Traceback" not in out.err
    assert not (tmp_path / "runs").exists()  # refused before any store was created


def test_context_only_placement_is_refused_for_a_technique_that_cannot_serve_it(tmp_path):
    found = problems(tmp_path, patched(workload__query_placement="context_only", techniques={"dense": None, "moa": {"density": 0.5}}))
    assert "whole prompt" in found["techniques.moa"]
    # Speculative techniques serve it (nothing is compressed: context then question is their prompt).
    ok = patched(workload__query_placement="context_only", techniques={"dense": None, "prompt_lookup": {}, "self_spec+snapkv": {}})
    load_spec(write(tmp_path, ok, "ok.yaml"))
