"""Caches are read safely and keyed by what they depend on: a model's identity (its config and
weights), never its folder's name; a profile that would run code when loaded is refused unread."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from paretoray.actors import artifacts
from paretoray.actors.models import model_identity
from paretoray.recipes.moa import PROFILE_FORMAT, Plan, Profile, ProfileError, moa_folder, search_plan
from tests.tiny import save_tiny_llama


class _RunsCode:
    """Unpickling this calls Path.touch(marker): what a tampered cache file could do to every actor."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def write_code_running_pickle(path: pathlib.Path, marker: pathlib.Path) -> None:
    """A file shaped like a profile whose unpickling (weights_only=False) creates `marker`."""
    torch.save({"format": PROFILE_FORMAT, "model": "m", "lengths": [256], "influence": {256: torch.zeros(1, 1, 256)},
                "samples_per_length": 1, "seconds": 0.0, "identity": None, "payload": _RunsCode(marker)}, path)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def two_llamas(tmp_path_factory):
    """Two different tiny random Llamas, both in folders named `llama` (in different parents)."""
    root = tmp_path_factory.mktemp("same-name")
    return save_tiny_llama(root / "a" / "llama", seed=0), save_tiny_llama(root / "b" / "llama", seed=1)


def test_models_in_folders_of_the_same_name_get_different_moa_caches(two_llamas):
    a, b = two_llamas
    assert a.name == b.name
    assert model_identity(str(a)) != model_identity(str(b))
    assert moa_folder(str(a)) != moa_folder(str(b))
    assert moa_folder(str(a)).name.startswith("llama-") and moa_folder(str(b)).name.startswith("llama-")


def test_identity_is_stable_ignores_path_and_dtype_and_changes_with_a_weight(two_llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    a, _ = two_llamas
    identity = model_identity(str(a))
    assert model_identity(str(a)) == identity  # stable across calls
    assert model_identity(AutoModelForCausalLM.from_pretrained(a)) == identity  # the folder and the model loaded from it
    assert model_identity(AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)) == identity
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "renamed")
    assert model_identity(str(copy)) == identity  # contents, not the path
    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    model.save_pretrained(copy)
    assert model_identity(str(copy)) != identity  # one weight changed on disk
    # A model made in memory: its tensors; a weight changed in place changes it.
    fresh = AutoModelForCausalLM.from_config(model.config)
    fresh.name_or_path = ""
    before = model_identity(fresh)
    assert model_identity(fresh) == before
    with torch.no_grad():
        fresh.lm_head.weight[0, 0] += 1.0
    assert model_identity(fresh) != before


def test_a_profile_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "profile.pt"
    write_code_running_pickle(path, marker)
    with pytest.raises(ProfileError, match="not a profile that loads safely.*profile again"):
        Profile.load(path)
    assert not marker.exists()
    # The payload is real: loading the file the unsafe way would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_profile_of_another_model_or_of_none_is_refused(two_llamas, tmp_path):
    a, b = two_llamas
    id_a, id_b = model_identity(str(a)), model_identity(str(b))
    profile = Profile(str(a), [256], {256: torch.rand(2, 2, 256)}, 1, 0.0, identity=id_a)
    path = tmp_path / "profile.pt"
    profile.save(path)
    assert Profile.load(path, id_a).identity == id_a
    with pytest.raises(ProfileError, match="another model"):
        Profile.load(path, id_b)
    Profile(str(a), [256], {256: torch.rand(2, 2, 256)}, 1, 0.0).save(path)  # no identity recorded
    with pytest.raises(ProfileError, match="records no model"):
        Profile.load(path, id_a)
    torch.save({"model": "m", "lengths": [64], "influence": {64: torch.zeros(1, 1, 64)}}, path)  # the block format
    with pytest.raises(ProfileError, match="earlier format"):
        Profile.load(path, id_a)


def test_the_technique_refuses_a_plan_searched_for_another_model(tiny_model, tmp_path, monkeypatch):
    from paretoray.actors.techniques import build_technique, moa

    monkeypatch.setattr(moa, "_PLANS", {})
    monkeypatch.setattr(moa, "_SERVING", {})
    model, _ = tiny_model
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    profile = Profile("other", [256, 512], {n: torch.rand(layers, heads, n) for n in (256, 512)}, 1, 0.0, identity="f" * 64)

    def build(model, density, lengths):
        path = tmp_path / "plan.json"
        search_plan(profile, density, lengths=lengths, alpha_step=128).save(path)
        return path

    monkeypatch.setattr(artifacts, "_BUILDERS", {"moa_plan": build})
    with pytest.raises(ValueError, match="another model"):
        build_technique("moa", {"density": 0.8}).prepare(model, [300])
    assert Plan.load(tmp_path / "plan.json").model == "f" * 64


def test_a_registry_draft_distilled_from_another_target_is_not_current(two_llamas, tmp_path, monkeypatch):
    """The draft records its target's identity; a target whose weights changed makes it stale."""
    import json

    from paretoray.actors import models
    from paretoray.actors.registry import RECIPE_FILE, DistilledDraft, recipe_stamp

    target = shutil.copytree(two_llamas[0], tmp_path / "target")
    entry = DistilledDraft(target=str(target), layers=1, steps=1, head_vocab=8, head_steps=1, description="test")
    folder = tmp_path / "draft"
    folder.mkdir()
    (folder / "acceptance_head.safetensors").write_bytes(b"")
    (folder / RECIPE_FILE).write_text(recipe_stamp(entry))
    assert models.draft_is_current(folder, entry)  # an earlier version's draft, which recorded no target
    (folder / models.TARGET_FILE).write_text(json.dumps({"identity": model_identity(str(target))}))
    assert models.draft_is_current(folder, entry)
    save_tiny_llama(target, seed=5)  # another model in the target's folder
    assert not models.draft_is_current(folder, entry)
