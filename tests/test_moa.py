"""MoA's profile, plan search and technique on a tiny random model."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paretoray.actors import artifacts
from paretoray.actors.generation import with_cache
from paretoray.actors.techniques import build_technique
from paretoray.kernels.sliding_window_prefill import _allowed
from paretoray.recipes.moa import (
    BLOCK,
    Plan,
    Profile,
    Rule,
    by_distance,
    candidate_rules,
    distance_influence,
    moa_folder,
    profile_model,
    search_plan,
    value_influence,
)


@pytest.fixture
def fresh_plans(monkeypatch):
    """No plan remembered from another test, and no builder but the ones a test installs."""
    from paretoray.actors.techniques import moa

    monkeypatch.setattr(moa, "_PLANS", {})
    monkeypatch.setattr(moa, "_SERVING", {})
    monkeypatch.setattr(artifacts, "_BUILDERS", {})


def test_influence_is_the_loss_change_of_dropping_a_value_for_a_linear_loss():
    """For L = sum_k A_k c_k the first-order formula is exact (up to the reference's eps)."""
    generator = torch.Generator().manual_seed(0)
    n = 48
    logits = torch.randn(n, n, generator=generator)
    attention = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    weights = torch.randn(n, n, generator=generator)  # c = dL/dA
    influence = value_influence(attention, weights)
    for query, key in [(40, 17), (12, 12), (47, 0)]:
        row = attention[query]
        dropped = row.clone()
        dropped[key] = 0
        true_change = float(((dropped / dropped.sum() - row) * weights[query]).sum())
        assert float(influence[query, key]) == pytest.approx(abs(true_change), rel=2e-2)


def test_by_distance_sums_the_lower_diagonals():
    values = torch.rand(2, 3, 7, 7)
    expected = torch.stack([torch.diagonal(values, offset=-d, dim1=-2, dim2=-1).sum(-1) for d in range(7)], dim=-1)
    assert torch.allclose(by_distance(values), expected)


@pytest.mark.parametrize("span", [64, 128, 70, 300])
def test_a_spans_profiled_loss_is_the_influence_the_served_prefill_mask_drops(span):
    """The profile and the served mask agree token for token: a span's loss is exactly the
    influence of the values the prefill mask (sinks + token band) leaves out."""
    generator = torch.Generator().manual_seed(1)
    n = 200
    attention = torch.rand(2, 3, n, n, generator=generator)
    grad = torch.randn(2, 3, n, n, generator=generator)
    by_dist = distance_influence(attention, grad)  # [3, n]
    dropped_by_mask = ~_allowed(n, span, BLOCK, torch.device("cpu")) & torch.ones(n, n, dtype=torch.bool).tril()
    expected = (value_influence(attention, grad).sum(0) * dropped_by_mask).sum(dim=(-1, -2))
    assert torch.allclose(by_dist[:, span:].sum(-1), expected, rtol=1e-4)


def test_rules_keep_the_sink_block_and_their_span_and_count_density_in_tokens():
    rule = Rule(alpha=128, beta=0.25)  # at 1024 tokens: 2 + 4 = 6 blocks
    assert rule.blocks(1024) == 6 and rule.span(1024) == 6 * BLOCK
    assert rule.density(1024) == pytest.approx(7 / 16)  # the reference's kv density at a multiple of 64
    assert rule.density(1000) == pytest.approx((BLOCK + rule.span(1000)) / 1000)  # what the cache holds
    assert Rule(4096, 0.0).density(1000) == 1.0


def test_candidate_rules_are_filtered_by_the_longest_length_served():
    profiled = [1024, 2048]
    assert Rule(2048, 0.0) in candidate_rules(profiled)  # serving the profiled lengths: 2048 tokens fit at 2K
    served_1k = candidate_rules(profiled, served=[1024])
    assert all(r.alpha + r.beta * 1024 <= 1024 for r in served_1k) and Rule(2048, 0.0) not in served_1k
    assert Rule(1024, 0.0) in served_1k
    served_4k = candidate_rules(profiled, served=[4096])
    assert all(r.alpha + r.beta * 8192 <= 8192 and r.alpha + r.beta * 1024 > 0 for r in served_4k)
    # no two candidates keep the same tokens at every profiled, served and extension length
    for rules, lengths in [(served_1k, [1024, 2048]), (served_4k, [1024, 2048, 4096, 8192])]:
        signatures = {tuple(min(r.span(n), n - BLOCK) for n in lengths) for r in rules}
        assert len(signatures) == len(rules)
    assert Rule(-1024, 1.0) not in candidate_rules(profiled)  # nothing left at 1K


def synthetic_profile(layers=3, heads=2, lengths=(512, 1024), seed=0) -> Profile:
    generator = torch.Generator().manual_seed(seed)
    influence = {}
    for n in lengths:
        values = torch.rand(layers, heads, n, generator=generator) * 0.01
        values[0, 0, n // 2 :] += 1.0  # head (0, 0) needs distant context
        influence[n] = values
    return Profile("synthetic", list(lengths), influence, 1, 0.0)


@pytest.mark.parametrize("density", [0.4, 0.6])
def test_plan_meets_the_density_budget_at_every_length_and_the_extension(density):
    profile = synthetic_profile()
    plan = search_plan(profile, density, alpha_step=256)
    assert plan.lengths == [512, 1024] and plan.extend_length == 2048
    for n in profile.lengths:
        assert 0.9 * density - 1e-9 <= plan.achieved_density[str(n)] <= density + 1e-9
        assert plan.mean_density(n) == pytest.approx(plan.achieved_density[str(n)])
    assert plan.mean_density(2048) <= density + 1e-9
    for layer in range(3):
        assert len(set(plan.rules(layer))) <= 2
    # The head that relies on distant context gets the longest span at the longest length.
    spans = [[rule.span(1024) for rule in plan.rules(layer)] for layer in range(3)]
    assert spans[0][0] == max(max(row) for row in spans)


@pytest.mark.parametrize("density", [0.25, 0.5])
def test_a_plan_for_an_unprofiled_length_meets_its_budget_there(density):
    """Profiled at 1K/2K, served at 4K: the budget holds at 4K (and at 8K, the extension)."""
    profile = synthetic_profile(lengths=(1024, 2048))
    plan = search_plan(profile, density, lengths=[4096])
    assert plan.lengths == [4096] and plan.extend_length == 8192 and plan.profiled_lengths == [1024, 2048]
    assert set(plan.achieved_density) == {"4096", "8192"}
    assert 0.9 * density - 1e-9 <= plan.mean_density(4096) <= density + 1e-9
    assert plan.mean_density(8192) <= density + 1e-9
    assert all(rule.span(4096) <= 4096 for layer in range(3) for rule in plan.rules(layer))


def test_an_impossible_budget_says_why():
    with pytest.raises(ValueError, match="no MoA plan reaches mean density 0.01"):
        search_plan(synthetic_profile(), 0.01, alpha_step=256)


def recording_builder(profile, folder, asked: list):
    """A moa_plan builder that searches `profile` and records the lengths each plan was asked for."""

    def build(model, density, lengths):
        asked.append(lengths)
        path = folder / f"plan-{density}-{lengths}.json"
        search_plan(profile, density, lengths=lengths, alpha_step=128).save(path)
        return path

    return build


def test_profile_plan_and_technique_on_a_tiny_model(tiny_model, fresh_plans, tmp_path):
    model, tokenizer = tiny_model
    profile = profile_model(model, tokenizer, [256, 512], samples_per_length=1, response_tokens=8)
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was
    assert profile.influence[512].shape == (model.config.num_hidden_layers, model.config.num_key_value_heads, 512)
    assert all(float(v.sum()) > 0 for v in profile.influence.values())
    asked = []
    artifacts.install({"moa_plan": recording_builder(profile, tmp_path, asked)})
    technique = build_technique("moa", {"density": 0.8})
    technique.prepare(model, [300, 400])
    plan = Plan.load(tmp_path / "plan-0.8-[300, 400].json")
    ids = torch.randint(4, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with technique.applied(model) as cache, torch.inference_mode():
        model(input_ids=ids, **with_cache(model, cache), use_cache=True)
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.spans == [rule.span(300) for rule in plan.rules(layer_idx)]
        assert layer.lengths == [min(300, BLOCK + s) for s in layer.spans]
    run = technique.generate(model, ids, 6)
    technique.generate(model, ids[:, :64], 2)  # a warm-up prompt: the trial's plan, no new build
    assert asked == [[300, 400]]
    assert len(run.tokens) == 6 and math.isfinite(run.prefill_s)
    assert run.stats["kv_density"] == pytest.approx(plan.mean_density(300))
    assert 0.72 - 1e-9 <= plan.mean_density(300) <= 0.8 + 1e-9
    for layer in cache.layers:  # packed: each head its own slots, never more than sinks + span
        assert layer.keys.shape[1] == sum(layer.region) and all(r <= BLOCK + s for r, s in zip(layer.region, layer.spans))


def test_without_prepare_the_technique_plans_for_its_prompts_length(tiny_model, fresh_plans, tmp_path):
    model, _ = tiny_model
    profile = synthetic_profile(layers=model.config.num_hidden_layers, heads=model.config.num_key_value_heads,
                                lengths=(256, 512))
    asked = []
    artifacts.install({"moa_plan": recording_builder(profile, tmp_path, asked)})
    ids = torch.randint(4, model.config.vocab_size, (1, 700), generator=torch.Generator().manual_seed(0))
    run = build_technique("moa", {"density": 0.5}).generate(model, ids, 3)
    assert asked == [[700]]
    assert 0.45 - 1e-9 <= run.stats["kv_density"] <= 0.5 + 1e-9


def test_no_builder_names_the_commands_that_build_a_plan(tiny_model, fresh_plans):
    model, _ = tiny_model
    with pytest.raises(artifacts.ArtifactMissing, match="paretoray moa profile"):
        build_technique("moa", {"density": 0.5}).prepare(model, [1024])


def test_first_use_build_profiles_once_caches_by_identity_and_rebuilds_an_unsafe_profile(tiny_model_dir, tmp_path,
                                                                                         monkeypatch, capfd):
    from transformers import AutoModelForCausalLM

    from paretoray.actors.models import model_identity
    from paretoray.recipes import build, builders, moa
    from tests.test_caches import write_code_running_pickle

    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path))
    monkeypatch.setattr(moa, "DEFAULT_LENGTHS", [256, 512])
    assert builders()["moa_plan"] is build.BUILDERS["moa_plan"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    first = builders()["moa_plan"](model=model, density=0.8, lengths=[1000])
    second = builders()["moa_plan"](model=model, density=0.8, lengths=[1000])
    assert first == second and Plan.load(first).lengths == [1000]
    assert capfd.readouterr().err.count("moa: profiling") == 1
    identity = model_identity(model)
    assert first.parent == moa_folder(str(tiny_model_dir)) == moa_folder(model)
    assert first.parent.name == f"tiny-llama-{identity[:16]}" and Plan.load(first).model == identity
    assert Profile.load(first.parent / "profile.pt", identity).identity == identity
    # A cached profile that would run code when unpickled is never loaded: the build profiles again.
    marker = tmp_path / "ran"
    write_code_running_pickle(first.parent / "profile.pt", marker)
    first.unlink()
    assert builders()["moa_plan"](model=model, density=0.8, lengths=[1000]) == first
    err = capfd.readouterr().err
    assert not marker.exists() and "not a profile that loads safely" in err and err.count("moa: profiling") == 1
    assert Profile.load(first.parent / "profile.pt", identity).lengths == [256, 512]
    # A plan searched for another model is searched again.
    plan = Plan.load(first)
    plan.model = "0" * 64
    plan.save(first)
    builders()["moa_plan"](model=model, density=0.8, lengths=[1000])
    assert Plan.load(first).model == identity and "moa: profiling" not in capfd.readouterr().err


def test_uniform_window_reports_its_kv_density(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(4, model.config.vocab_size, (1, 640), generator=torch.Generator().manual_seed(0))
    run = build_technique("uniform_window", {"density": 0.25, "sink_tokens": 64}).generate(model, ids, 3)
    assert run.stats["kv_density"] == pytest.approx(160 / 640)  # 64 sinks + a 96-token span
    assert run.stats["target_calls"] == len(run.step_s)


def test_kv_density_is_a_metric_broken_down_by_length():
    from paretoray.actors.metrics import aggregate, metric_direction

    rows = [{"kv_density": 0.5, "context_length": 1024}, {"kv_density": 0.3, "context_length": 2048},
            {"kv_density": 0.4, "context_length": 2048}]
    metrics = aggregate(rows, [1024, 2048])
    assert metrics["kv_density"] == pytest.approx(0.4)
    assert metrics["kv_density/ctx1024"] == pytest.approx(0.5) and metrics["kv_density/ctx2048"] == pytest.approx(0.35)
    assert metric_direction("kv_density") == "minimize"


def test_the_actor_package_does_not_import_the_recipes():
    code = ("import sys, paretoray.actors.runner, paretoray.actors.techniques, paretoray.actors.techniques.moa; "
            "print('paretoray.recipes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    source = (Path(__file__).parents[1] / "paretoray" / "actors" / "techniques" / "moa.py").read_text()
    assert "fcntl" not in source and "print(" not in source
