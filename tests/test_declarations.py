"""Technique declarations read without torch: the JSON cache answers exactly as the live registry does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paretoray.actors import declarations
from paretoray.orchestrator import spec as spec_module
from paretoray.orchestrator.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]


def _ordered(found):
    return [(name, d, list(d.params)) for name, d in found.items()]


def test_the_file_holds_exactly_the_live_declarations(tmp_path, monkeypatch):
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path))
    monkeypatch.setattr(declarations, "_FROM_FILE", {})
    live = declarations._live()
    assert "dense" in live and live["specdec"].needs_draft and not live["noop"].uses_model
    assert list(live["pyramidkv"].params)[-1] == "beta"  # field order kept
    first = declarations.cached_declarations()  # a miss: built from the registry and written
    path = declarations.cache_file()
    assert path.exists() and _ordered(first) == _ordered(live)
    assert json.loads(path.read_text())["key"] == declarations.cache_key()  # plain JSON
    monkeypatch.setattr(declarations, "_FROM_FILE", {})
    assert _ordered(declarations.cached_declarations()) == _ordered(live)  # a hit: read back equal
    for broken in ("{not json", json.dumps({"format": declarations.FORMAT, "key": "other", "techniques": {}}),
                   json.dumps({"format": declarations.FORMAT, "key": declarations.cache_key(), "techniques": {"x": {}}})):
        path.write_text(broken)
        monkeypatch.setattr(declarations, "_FROM_FILE", {})
        assert _ordered(declarations.cached_declarations()) == _ordered(live)  # stale or torn: rebuilt
        assert json.loads(path.read_text())["techniques"].keys() == live.keys()


def _outcome(path: Path) -> str:
    try:
        spec = load_spec(path)
    except SpecError as error:
        return str(error)
    return spec.model_dump_json()


def test_validation_is_identical_with_and_without_the_file(tmp_path, monkeypatch):
    from tests.test_spec_fuzz import _cases

    from_file = declarations._decode(declarations._encode(declarations._live()))
    assert from_file is not None
    cases = _cases()[::3]  # every third fuzz case: valid files and every kind of refusal
    paths = []
    for i, (source, kind, content) in enumerate(cases):
        path = tmp_path / f"{i:03d}-{source}"
        path.write_bytes(content)
        paths.append(path)
    live = [_outcome(path) for path in paths]
    monkeypatch.setattr(spec_module, "technique_declarations", lambda names=(): from_file)
    cached = [_outcome(path) for path in paths]
    assert cached == live
    assert sum(not text.startswith(str(tmp_path)) for text in live) >= 8  # some were valid


@pytest.mark.skipif(os.environ.get("PARETORAY_NO_DECLARATIONS_CACHE"), reason="the file is turned off")
def test_a_warm_cache_validates_and_lists_without_torch(tmp_path):
    env = {**os.environ, "PARETORAY_CACHE": str(tmp_path), "PARETORAY_HOME": str(tmp_path / "runs")}
    probe = (
        "import sys\n"
        "from paretoray.orchestrator.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
        "sys.exit(code)\n"
    )

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)

    quickstart = str(ROOT / "sweeps" / "quickstart.yaml")
    cold = run("sweep", "validate", quickstart)
    assert cold.returncode == 0 and "torch imported: True" in cold.stdout, cold.stderr  # a miss imports the registry once
    assert list((tmp_path / "declarations").glob("techniques-*.json"))
    warm = run("sweep", "validate", quickstart)
    assert warm.returncode == 0 and "torch imported: False" in warm.stdout, warm.stderr
    assert warm.stdout.splitlines()[0] == cold.stdout.splitlines()[0]
    listed = run("techniques")
    assert listed.returncode == 0 and "torch imported: False" in listed.stdout
    assert "streaming_llm  (kv-cache, compiled decoding, batches)" in listed.stdout and "window" in listed.stdout
