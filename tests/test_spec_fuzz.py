"""Fuzzing `paretoray sweep validate`: every input gets a clean answer in bounded time and memory.

Hundreds of variants derived from the shipped sweeps (type swaps, out-of-range, huge and non-finite
numbers, unknown, duplicated and deleted keys, other encodings, NUL and invalid bytes, aliases up to
billion-laughs, deep nesting, very long strings), deterministic (fixed seed), each run in this
process through the CLI's entry point. Each must exit 0 (valid) or 2 (a SpecError), print no
traceback, print a capped text, and finish in bounded time; memory must stay bounded overall.
"""

from __future__ import annotations

import codecs
import copy
import random
import resource
import time
from pathlib import Path

import pytest
import yaml

from paretoray.orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
SEED = 1414
PER_FILE = 70  # variants derived from each shipped sweep (8 sweeps: 560 cases)
MAX_OUTPUT = 10_000  # characters of stdout + stderr
MAX_CASE_S = 10.0  # generous: this machine is shared
MAX_RSS_GROWTH_MB = 300

ODD_VALUES = [
    "text", "", 1, -1, 0, 1.5, -0.0, True, False, None, [], {}, [1, 2], {"a": 1}, {"low": 1, "high": 0},
    2**31, 2**32, 2**63, -(2**63), 2**64, 10**30, 10**400, -(10**400), float("inf"), float("-inf"), float("nan"),
    1e308, 5e-324, "x" * 5000, "../../etc", "a\u202eb", "\u00e9t\u00e9", [[[[1]]]], {"choices": []},
]


def _paths(data, prefix=()):
    """Every (path, value) in a loaded document."""
    out = [(prefix, data)]
    if isinstance(data, dict):
        for key, value in data.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += _paths(value, prefix + (i,))
    return out


def _set(data, path, value):
    if not path:
        return value
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def _dump(data) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _laughs(levels: int, fanout: int) -> str:
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * fanout)}]"]
    for i in range(1, levels + 1):
        lines.append(f"{names[i]}: &{names[i]} [{', '.join(['*' + names[i - 1]] * fanout)}]")
    return "\n".join(lines) + "\n"


def _variants(text: str, rng: random.Random) -> list[tuple[str, bytes]]:
    data = yaml.safe_load(text)
    leaves = [(p, v) for p, v in _paths(data) if p]
    mappings = [(p, v) for p, v in _paths(data) if isinstance(v, dict)]
    lines = text.splitlines(keepends=True)
    keyed = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith(("#", "-")) and ":" in line]
    raw = text.encode()
    out: list[tuple[str, bytes]] = [("as shipped", raw)]

    def structural(kind: str) -> bytes:
        doc = copy.deepcopy(data)
        path, value = rng.choice(leaves)
        if kind == "swap":
            return _dump(_set(doc, path, rng.choice(ODD_VALUES)))
        if kind == "number":
            numeric = [(p, v) for p, v in leaves if isinstance(v, (int, float)) and not isinstance(v, bool)] or leaves
            path, _ = rng.choice(numeric)
            return _dump(_set(doc, path, rng.choice([-1, 0, 10**6, -(10**9), 2**63, 2**64, 10**400, float("inf"),
                                                     float("nan"), 1e308, -1e308, 0.5, 2**32, 4096, 8193, 10**9])))
        if kind == "unknown":
            path, mapping = rng.choice(mappings)
            mapping = doc if not path else _walk(doc, path)
            mapping[rng.choice(["extra", "trialz", "seed2", "tasks", "x" * 300, "__class__"])] = rng.choice(ODD_VALUES)
            return _dump(doc)
        if kind == "delete":
            path, _ = rng.choice([(p, v) for p, v in leaves if isinstance(p[-1], str)] or leaves)
            del _walk(doc, path[:-1])[path[-1]]
            return _dump(doc)
        if kind == "long":
            strings = [(p, v) for p, v in leaves if isinstance(v, str)] or leaves
            path, _ = rng.choice(strings + [(("name",), None)])
            return _dump(_set(doc, path, rng.choice(["a", "é", "-", "/", "\u00ff"]) * rng.choice([101, 5000, 200_000])))
        raise AssertionError(kind)

    def textual(kind: str) -> bytes:
        if kind == "duplicate":
            i = rng.choice(keyed)
            return "".join(lines[: i + 1] + [lines[i].split(":")[0] + ": 100000\n"] + lines[i + 1:]).encode()
        if kind == "latin-1":
            return text.replace("description:", "description: caf\u00e9 na\u00efve", 1).encode("latin-1", "replace")
        if kind == "utf-16":
            return rng.choice([codecs.BOM_UTF16_LE + text.encode("utf-16-le"), codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
                               text.encode("utf-16-le"), text.encode("utf-32")])
        if kind == "bom":
            return codecs.BOM_UTF8 + raw
        if kind == "nul":
            at = rng.randrange(len(raw) + 1)
            return raw[:at] + b"\x00" + raw[at:]
        if kind == "invalid-utf8":
            at = rng.randrange(len(raw) + 1)
            return raw[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]) + raw[at:]
        if kind == "control":
            at = rng.randrange(len(raw) + 1)
            return raw[:at] + rng.choice([b"\x01", b"\x1b", b"\x7f", "\ufffe".encode(), b"\t"]) + raw[at:]
        if kind == "laughs":
            levels, fanout = rng.choice([(3, 9), (5, 10), (9, 9), (10, 10), (4, 20), (2, 64)])
            doc = _laughs(levels, fanout)
            target = rng.choice(["description", "constraints", "trials", "workload_extra", "technique"])
            last = f"*l{levels}"
            if target == "workload_extra":
                return (doc + text.replace("workload:\n", f"workload:\n  bomb: {last}\n", 1)).encode()
            if target == "technique":
                return (doc + text.replace("techniques:\n", f"techniques:\n  bomb: {last}\n", 1)).encode()
            body = "\n".join(line for line in text.splitlines() if not line.startswith(f"{target}:"))
            return (doc + body + f"\n{target}: {last}\n").encode()
        if kind == "cycle":
            return (text + "\nloop: &loop [*loop]\n").encode()
        if kind == "merge":
            return ("base: &base {count: 1, num_cpus: 1}\n" + text.replace("actors:\n", "actors:\n  <<: *base\n", 1)).encode()
        if kind == "deep":
            depth = rng.choice([31, 33, 100, 5000, 100_000])
            opener, closer = rng.choice([("[", "]"), ("{a: ", "}"), ("- ", "")])
            if opener == "- ":
                nested = "".join("  " * i + "- \n" for i in range(min(depth, 2000)))
                return (text + "\ndeep:\n" + nested).encode()
            return (text + f"\ndeep: {opener * depth}1{closer * depth}\n").encode()
        if kind == "truncate":
            return raw[: rng.randrange(len(raw))]
        if kind == "flip":
            flipped = bytearray(raw)
            for _ in range(rng.choice([1, 3, 10])):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            return bytes(flipped)
        if kind == "tags":
            tag = rng.choice(["!!python/object:os.system", "!!binary aGVsbG8=", "!!timestamp 2024-13-45", "!!int 0x_",
                              "!!float nan", "!!set {a, b}", "!!omap [a: 1]", "!custom 1", "!!str", "!!int " + "9" * 5000])
            return text.replace("trials:", f"trials: {tag}\nxtrials:", 1).encode()
        if kind == "big":
            return raw + b"# " + b"x" * rng.choice([1 << 19, (1 << 20) + 1]) + b"\n"
        if kind == "many":
            return (text + "\nmany: [" + ", ".join(["1"] * rng.choice([1000, 150_000])) + "]\n").encode()
        raise AssertionError(kind)

    kinds = [("swap", structural)] * 14 + [("number", structural)] * 10 + [("unknown", structural)] * 5 + \
        [("delete", structural)] * 5 + [("long", structural)] * 3 + \
        [(k, textual) for k in ("duplicate", "duplicate", "duplicate", "latin-1", "utf-16", "utf-16", "bom", "nul",
                                "invalid-utf8", "invalid-utf8", "control", "laughs", "laughs", "laughs", "cycle", "merge",
                                "deep", "deep", "deep", "truncate", "truncate", "flip", "flip", "flip", "tags", "tags",
                                "big", "many")]
    while len(out) < PER_FILE:
        kind, make = kinds[len(out) % len(kinds)]
        out.append((kind, make(kind)))
    return out


def _walk(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _cases() -> list[tuple[str, str, bytes]]:
    rng = random.Random(SEED)
    return [(path.name, kind, content) for path in SWEEPS for kind, content in _variants(path.read_text(), rng)]


def test_every_variant_gets_a_clean_answer(tmp_path, capsys):
    cases = _cases()
    assert len(cases) >= 500
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    codes = {0: 0, 2: 0}
    slowest = (0.0, "")
    for i, (source, kind, content) in enumerate(cases):
        path = tmp_path / f"{i:03d}-{source}"
        path.write_bytes(content)
        t0 = time.perf_counter()
        code = main(["sweep", "validate", str(path)])
        took = time.perf_counter() - t0
        out = capsys.readouterr()
        text = out.out + out.err
        where = f"case {i} ({kind} of {source})"
        assert code in (0, 2), f"{where}: exit {code}\n{text[:2000]}"
        assert "Traceback" not in text and 'File "' not in text, f"{where}:\n{text[:2000]}"
        assert len(text) < MAX_OUTPUT, f"{where}: {len(text)} characters of output"
        assert str(path) in text, f"{where}: the answer does not name the file\n{text[:500]}"
        assert took < MAX_CASE_S, f"{where}: {took:.1f} s"
        if kind == "as shipped":
            assert code == 0, f"{where}: {text}"
        codes[code] += 1
        slowest = max(slowest, (took, where))
        path.unlink()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert grown < MAX_RSS_GROWTH_MB, f"peak memory grew by {grown:.0f} MB"
    print(f"{len(cases)} cases in {time.perf_counter() - started:.1f} s: {codes[0]} valid, {codes[2]} refused; "
          f"slowest {slowest[0]:.2f} s ({slowest[1]}); peak RSS growth {grown:.0f} MB")
    assert codes[2] > len(cases) // 2  # most mutations are refused, and the shipped files pass


@pytest.mark.parametrize("levels,fanout", [(9, 9), (10, 10), (4, 10)])
def test_billion_laughs_is_refused_quickly(tmp_path, capsys, levels, fanout):
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(levels, fanout) + (ROOT / "sweeps" / "quickstart.yaml").read_text().replace(
        "description:", f"bomb: *l{levels}\ndescription:", 1))
    t0 = time.perf_counter()
    assert main(["sweep", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 5 and len(err) < 1000
    assert "aliases" in err
