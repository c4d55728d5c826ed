"""Compositions (`outer+inner`): built from declarations, labelled with every member's parameters,
validated with the reason, swept like any technique, and equal to applying the members by hand."""

from __future__ import annotations

import pytest
import torch
import yaml

from paretoray.actors.declarations import CompositionError, composition_declaration, technique_declarations
from paretoray.actors.techniques import build_technique, parse_technique
from paretoray.actors.techniques.compose import Composition
from paretoray.orchestrator.spec import SpecError, load_spec, search_space


def prompt(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def test_label_names_every_member_and_round_trips():
    technique = build_technique("kv_quant+snapkv", {"kv_quant.bits": 2, "snapkv.max_capacity_prompt": 128})
    assert technique.label == ("kv_quant(bits=2,group_size=32,residual_length=32)+"
                               "snapkv(window_size=32,kernel_size=7,pooling=avgpool,max_capacity_prompt=128,gqa=group_mean)")
    assert parse_technique(technique.label) == technique
    assert build_technique(technique.name, technique.values()) == technique
    assert technique.values()["snapkv.max_capacity_prompt"] == 128.0
    assert getattr(technique, "kv_quant.bits") == 2  # what a trial record reads per declared parameter


@pytest.mark.parametrize("name,reason", [
    ("snapkv+kv_quant", "the outer technique comes first: kv_quant+snapkv"),
    ("kv_quant+h2o", "evicts while decoding"),
    ("kv_quant+streaming_llm", "evicts while decoding"),
    ("self_spec+kv_quant", "static slot cache"),
    ("self_spec+specdec", "specdec is not one"),
    ("self_spec+nope", "unknown member(s) ['nope']"),
    ("snapkv+snapkv", "appears twice"),
    ("dense+snapkv", "dense takes no member"),
])
def test_compositions_that_do_not_fit_are_refused_with_the_reason(name, reason):
    with pytest.raises(CompositionError, match=None) as caught:
        composition_declaration(name, technique_declarations())
    assert reason in str(caught.value)
    with pytest.raises(ValueError):
        build_technique(name, {})


def test_capabilities_follow_from_the_members():
    declared = technique_declarations(["self_spec+snapkv", "kv_quant+pyramidkv", "snapkv+kv_quant"])
    assert "snapkv+kv_quant" not in declared  # invalid compositions are left out
    self_spec = declared["self_spec+snapkv"].capabilities
    assert self_spec["lossless"] and not self_spec["measures_fidelity"]  # the draft cache cannot change the output
    assert self_spec["static_decode"] and self_spec["members"] == ["self_spec", "snapkv"]
    assert "accepted" in self_spec["reports"]
    quant = declared["kv_quant+pyramidkv"].capabilities
    assert not quant["lossless"] and quant["measures_fidelity"] and not quant["static_decode"]
    assert set(declared["kv_quant+pyramidkv"].params) == {
        *(f"kv_quant.{k}" for k in build_technique("kv_quant", {}).params),
        *(f"pyramidkv.{k}" for k in build_technique("pyramidkv", {}).params)}


def test_kv_quant_over_snapkv_is_snapkvs_kept_entries_quantized(tiny_model):
    """The composition equals applying its members by hand: SnapKV's prefill, then kv_quant.adopt."""
    model, _ = tiny_model
    ids = prompt(model, 150, seed=11)
    params = {"kv_quant.bits": 4, "kv_quant.residual_length": 8, "snapkv.max_capacity_prompt": 48, "snapkv.window_size": 8}
    composed = build_technique("kv_quant+snapkv", params)
    snapkv, kv_quant = composed.members[1], composed.members[0]
    run = composed.generate(model, ids, 16)
    by_hand = kv_quant.generate(model, ids, 16, member=snapkv)
    assert run.tokens == by_hand.tokens and run.kv_bytes == by_hand.kv_bytes
    alone = snapkv.generate(model, ids, 16)
    assert run.kv_bytes < alone.kv_bytes  # SnapKV's kept entries, stored in 4 bits
    # 8 bits with everything in the residual: exactly SnapKV's own tokens.
    exact = build_technique("kv_quant+snapkv", {**params, "kv_quant.bits": 8, "kv_quant.residual_length": 4096})
    assert exact.generate(model, ids, 16).tokens == alone.tokens


def test_self_spec_over_a_member_equals_passing_it_by_hand(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 120, seed=12)
    composed = build_technique("self_spec+pyramidkv", {"self_spec.gamma": 3, "pyramidkv.max_capacity_prompt": 40})
    assert isinstance(composed, Composition) and composed.lossless
    run = composed.generate(model, ids, 16)
    by_hand = composed.members[0].generate(model, ids, 16, member=composed.members[1])
    assert run.tokens == by_hand.tokens and run.stats == by_hand.stats


SPEC = {
    "name": "c",
    "model": "smollm2-135m",
    "workload": {"task": "passkey", "context_lengths": [256]},
    "techniques": {
        "dense": None,
        "kv_quant+snapkv": {"kv_quant": {"bits": [2, 4]}, "snapkv": {"max_capacity_prompt": {"low": 64, "high": 256}}},
        "self_spec+streaming_llm": {"self_spec": {"gamma": [2, 4]}, "streaming_llm": {"window": 128}},
    },
    "objectives": {"latency_ms_per_token": "minimize", "accuracy": "maximize"},
    "trials": 4,
}


def _load(tmp_path, data):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)


def test_a_spec_sweeps_each_members_parameters(tmp_path):
    space = search_space(_load(tmp_path, SPEC))
    dims = {d.name: d for d in space["kv_quant+snapkv"]}
    assert dims["kv_quant.bits"].choices == (2, 4)
    assert (dims["snapkv.max_capacity_prompt"].low, dims["snapkv.max_capacity_prompt"].high) == (64, 256)
    assert {d.name: d.value for d in space["self_spec+streaming_llm"] if d.kind == "fixed"} == {"streaming_llm.window": 128}


@pytest.mark.parametrize("techniques,field,says", [
    ({"snapkv+kv_quant": {}}, "techniques.snapkv+kv_quant", "the outer technique comes first"),
    ({"kv_quant+h2o": {}}, "techniques.kv_quant+h2o", "evicts while decoding"),
    ({"kv_quant+snapkv": {"h2o": {"max_capacity_prompt": 3}}}, "techniques.kv_quant+snapkv.h2o", "not a member"),
    ({"kv_quant+snapkv": {"kv_quant": {"bits": 3}}}, "techniques.kv_quant+snapkv.kv_quant.bits", "expected one of [2, 4, 8]"),
    ({"kv_quant+snapkv": {"kv_quant": {"nope": 3}}}, "techniques.kv_quant+snapkv.kv_quant.nope", "unknown parameter"),
    ({"kv_quant+snapkv": {"kv_quant": 4}}, "techniques.kv_quant+snapkv.kv_quant", "expected the member's parameters"),
])
def test_a_bad_composition_in_a_spec_names_the_field(tmp_path, techniques, field, says):
    data = {**SPEC, "techniques": techniques}
    with pytest.raises(SpecError) as caught:
        search_space(_load(tmp_path, data))
    found = dict(caught.value.problems)
    assert field in found and says in found[field], found
