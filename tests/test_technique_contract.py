"""The contract every registered technique passes, each with its declared example parameters.

Parametrized over every technique the package registers (`available_techniques()`) and each class's `examples` (see `Technique.examples`
in techniques/base.py), so a new technique is tested here without editing this file. On a tiny
random Llama, with a 160-token prompt and 8 new tokens:

- equal to dense (greedy tokens) with its "covers" example, and with every example if `lossless`;
- deterministic: two runs give identical tokens;
- the model left exactly as found (hooks on every module, attention implementation, config,
  parameters and buffers, train/eval mode), also after a generation that raises midway;
- `label` round trip: `parse_technique(t.label) == t`, and `build_technique(name, values) == t`;
- physical KV bytes (`Generation.kv_bytes`) not above dense's, and below them for "compresses"
  (a technique declaring `kv_within_dense = False` is bounded by dense's bytes for each model it
  holds a cache of: target and draft);
- rollback exactly where declared: with `rollback`, `cache.crop(-n)` restores the logits of a cache
  that never saw the n tokens; without it, `crop` raises with a message.

Techniques declaring `uses_model = False` take the label checks only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from paretoray.actors.techniques import (
    available_techniques,
    build_technique,
    parse_technique,
    reference_technique,
    technique_class,
)

from paretoray.actors.generation import with_cache  # the keyword a model's forward takes its cache by


def shipped() -> dict:
    """Every technique the package registers (not those other tests register for themselves)."""
    return {name: cls for name, cls in available_techniques().items()
            if cls.__module__.startswith("paretoray.actors.techniques.")}

PROMPT_LEN, NEW_TOKENS = 160, 8

pytestmark = pytest.mark.filterwarnings("ignore:.*acceptance head does not record")


def _cases(model_only: bool) -> list:
    cases = []
    for name, cls in shipped().items():
        for example in cls.examples:
            marks = [pytest.mark.skip(reason=f"{name} does no model work (uses_model = False)")] if model_only and not cls.uses_model else []
            cases.append(pytest.param(name, example, id=f"{name}-{example}", marks=marks))
    return cases


ALL = _cases(model_only=False)
MODEL = _cases(model_only=True)


def technique_for(name: str, example: str):
    return build_technique(name, technique_class(name).examples[example])


@pytest.fixture(scope="module")
def setting(tiny_model, tmp_path_factory):
    """The tiny target, a 1-layer draft with the same vocabulary (an acceptance head saved beside it),
    a fixed prompt, and artifacts (a MoA plan, say) built on first use into a temporary cache."""
    from transformers import AutoModelForCausalLM

    from paretoray.actors.techniques.specdec_pp import AcceptanceHead
    from tests.tiny import save_tiny_llama

    model, _ = tiny_model
    folder = save_tiny_llama(tmp_path_factory.mktemp("contract") / "draft", num_layers=1, seed=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AcceptanceHead(hidden_size=model.config.hidden_size, num_layers=3).save(folder)
    draft = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(4, model.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))

    try:
        from paretoray.actors import artifacts
        from paretoray.recipes.build import BUILDERS
    except ImportError:  # a version without first-use builders: techniques build what they need themselves
        artifacts, BUILDERS = None, {}
    saved_builders = artifacts.installed() if artifacts else {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARETORAY_CACHE", str(tmp_path_factory.mktemp("contract-cache")))
        if artifacts:
            artifacts.install({**BUILDERS, **cheap_builders(tiny_model, tmp_path_factory.mktemp("artifacts"))})
        try:
            yield {"model": model, "draft": draft, "ids": ids,
                   "dense": reference_technique().generate(model, ids, NEW_TOKENS),
                   "draft_dense": reference_technique().generate(draft, ids, NEW_TOKENS)}
        finally:
            if artifacts:
                artifacts._BUILDERS.clear()
                artifacts._BUILDERS.update(saved_builders)


def cheap_builders(tiny_model, folder) -> dict:
    """Builders for the artifact kinds whose recipes take minutes on a real model, made cheap for the
    tiny one: a MoA plan searched from a profile at 128 and 256 tokens (one sample each), and
    DuoAttention's gates trained for 4 steps on 192-token samples."""
    model, tokenizer = tiny_model
    profile = []

    def moa_plan(model, density: float, lengths: list[int]):
        from paretoray.recipes.moa import profile_model, search_plan

        if not profile:
            profile.append(profile_model(model, tokenizer, [128, 256], samples_per_length=1, response_tokens=4))
        path = folder / f"plan-{density:.4f}-at{'-'.join(map(str, sorted(set(lengths))))}.json"
        if not path.exists():
            search_plan(profile[0], density, lengths, alpha_step=128).save(path)
        return path

    def duo_gates(model):
        from paretoray.recipes.duo import Recipe, train_gates

        path = folder / "duo-gates.json"
        if not path.exists():
            recipe = Recipe(steps=4, min_length=192, max_length=192, sink_size=4, recent_size=16, passkeys=1, passkey_words=2)
            train_gates(model, tokenizer, recipe).save(path)
        return path

    return {"moa_plan": moa_plan, "duo_gates": duo_gates}


def run(technique, setting, max_new_tokens: int = NEW_TOKENS, **options):
    """One generation as the runner makes it: `prepare` with the served length, then `generate`."""
    extra = {"draft": setting["draft"]} if technique.needs_draft else {}
    technique.prepare(setting["model"], [PROMPT_LEN])
    return technique.generate(setting["model"], setting["ids"], max_new_tokens, **extra, **options)


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a technique could leave behind on a model: hooks, attention, config, weights, mode."""
    from torch.nn.modules import module as nn_module

    hooks = {
        name: tuple(sorted(getattr(m, kind)) for kind in
                    ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
        for name, m in model.named_modules()
    }
    return {
        "hooks": hooks,
        "global_hooks": (sorted(nn_module._global_forward_hooks), sorted(nn_module._global_forward_pre_hooks)),
        "attn": model.config._attn_implementation,
        "config": model.config.to_dict(),
        "training": [m.training for m in model.modules()],
        "tensors": {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]},
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_same(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    for key in before:
        if key == "tensors":
            changed = [n for n, t in before[key].items() if not torch.equal(t, after[key][n])]
            assert not changed, f"{what}: tensors changed: {changed}"
        else:
            assert before[key] == after[key], f"{what}: {key} differs"


# ---- declarations (no model) -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(shipped()))
def test_each_default_is_written_once(name):
    cls = technique_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert list(cls.params) == list(fields)
    for key, spec in cls.params.items():
        assert fields[key].metadata["param"] is spec and fields[key].default == spec.default
    assert build_technique(name, {}) == cls()
    if cls.uses_model:
        assert "covers" in cls.examples, f"{name}: declare examples['covers'] (a budget covering a {PROMPT_LEN}-token prompt)"


@pytest.mark.parametrize("name,example", ALL)
def test_label_round_trips(name, example):
    technique = technique_for(name, example)
    assert parse_technique(technique.label) == technique
    assert parse_technique(technique.label).label == technique.label
    assert build_technique(technique.name, {key: getattr(technique, key) for key in technique.params}) == technique


# ---- on the tiny model -----------------------------------------------------------------------


@pytest.mark.parametrize("name,example", MODEL)
def test_equal_to_dense_where_its_budget_covers_the_prompt(setting, name, example):
    technique = technique_for(name, example)
    if example != "covers" and not technique.lossless:
        pytest.skip(f"{name} is lossy and '{example}' does not cover the prompt")
    assert run(technique, setting).tokens == setting["dense"].tokens


@pytest.mark.parametrize("name,example", MODEL)
def test_compiled_decoding_gives_the_eager_tokens(setting, name, example):
    """The compiled static-shape step (torch.compile, inductor on this CPU) decodes what the eager
    loop decodes, free-running and teacher-forced; a technique that declares it cannot compile
    says why and decodes eagerly."""
    technique = technique_for(name, example)
    eager = run(technique, setting)
    compiled = run(technique, setting, compiled=True)
    assert compiled.compiled == technique.static_decode
    if not technique.static_decode:
        assert technique.static_note, f"{name}: declare static_note (why it decodes eagerly)"
    assert compiled.tokens == eager.tokens
    assert len(compiled.step_s) + (compiled.warmup_s > 0) <= NEW_TOKENS - 1
    if not technique.capabilities()["measures_fidelity"]:
        return  # the runner never teacher-forces it
    forced = setting["dense"].tokens
    assert run(technique, setting, forced_tokens=forced, compiled=True).agreement == run(
        technique, setting, forced_tokens=forced).agreement


@pytest.mark.parametrize("name,example", MODEL)
def test_a_batch_decodes_each_sequence_as_alone(setting, name, example):
    """`batched`: two prompts of different lengths decoded together (the static step, eagerly) give
    each the tokens it gets alone; a technique that cannot batch says why (`batch_note`)."""
    technique = technique_for(name, example)
    if not technique.batched:
        assert technique.batch_note, f"{name}: declare batch_note (why it decodes one sequence at a time)"
        return
    prompts = [setting["ids"], setting["ids"][:, : PROMPT_LEN - 37]]
    technique.prepare(setting["model"], [PROMPT_LEN])  # as `run`: the shorter prompt is served by the same plan
    batch = technique.generate_batch(setting["model"], prompts, NEW_TOKENS)
    assert batch.tokens == [technique.generate(setting["model"], ids, NEW_TOKENS).tokens for ids in prompts]


@pytest.mark.parametrize("name,example", MODEL)
def test_deterministic(setting, name, example):
    technique = technique_for(name, example)
    assert run(technique, setting).tokens == run(technique, setting).tokens


class _Stop(RuntimeError):
    pass


@pytest.mark.parametrize("name,example", MODEL)
def test_model_left_exactly_as_found(setting, name, example):
    model, draft = setting["model"], setting["draft"]
    technique = technique_for(name, example)
    before, draft_before = snapshot(model), snapshot(draft)
    run(technique, setting)
    assert_same(before, snapshot(model), f"{technique.label}: the model after a generation")
    assert_same(draft_before, snapshot(draft), f"{technique.label}: the draft after a generation")

    # A generation that raises midway (the target's second forward: the first decode step or round).
    calls = []

    def fail_on_second_call(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise _Stop("provoked by the contract test")

    handle = model.lm_head.register_forward_hook(fail_on_second_call)
    try:
        with pytest.raises(_Stop):
            run(technique, setting)
    finally:
        handle.remove()
    assert_same(before, snapshot(model), f"{technique.label}: the model after a generation that raised")
    assert_same(draft_before, snapshot(draft), f"{technique.label}: the draft after a generation that raised")


@pytest.mark.parametrize("name", [n for n, c in shipped().items() if c.uses_model])
def test_kv_bytes_not_above_dense(setting, name):
    cls = technique_class(name)
    example = "compresses" if "compresses" in cls.examples else "covers"
    technique = technique_for(name, example)
    kv_bytes = run(technique, setting).kv_bytes
    bound = setting["dense"].kv_bytes
    if not technique.kv_within_dense:  # it holds a second cache: dense's bytes for each model bound it
        if not technique.needs_draft:
            pytest.skip(f"{technique.label} declares KV bytes that may exceed dense's")
        bound += setting["draft_dense"].kv_bytes
    if example == "compresses":
        assert 0 < kv_bytes < bound, f"{technique.label}: {kv_bytes} KV bytes, dense {bound}"
    else:
        assert 0 < kv_bytes <= bound, f"{technique.label}: {kv_bytes} KV bytes, dense {bound}"


@pytest.mark.parametrize("name,example", MODEL)
def test_rollback_exactly_where_declared(setting, name, example):
    model, ids = setting["model"], setting["ids"]
    technique = technique_for(name, example)
    technique.prepare(model, [PROMPT_LEN])
    fed = [int(t) for t in torch.randint(4, model.config.vocab_size, (3,), generator=torch.Generator().manual_seed(1))]
    instead = [int(t) for t in torch.randint(4, model.config.vocab_size, (2,), generator=torch.Generator().manual_seed(2))]

    def forward(cache, tokens):
        return model(input_ids=torch.tensor([tokens]), use_cache=True, **with_cache(model, cache)).logits[0, -1]

    def continue_with(cache, tokens):
        for token in tokens:  # one token at a time: every cache accepts that after its prompt
            logits = forward(cache, [token])
        return logits

    with torch.inference_mode(), technique.applied(model) as cache:
        forward(cache, ids[0].tolist())
        continue_with(cache, fed)
        if not technique.rollback:
            with pytest.raises((NotImplementedError, ValueError), match=r"\w+"):
                cache.crop(-len(fed))
            return
        cache.crop(-len(fed))
        assert cache.get_seq_length() == PROMPT_LEN
        rolled_back = continue_with(cache, instead)
    with torch.inference_mode(), technique.applied(model) as fresh:
        forward(fresh, ids[0].tolist())
        expected = continue_with(fresh, instead)
    torch.testing.assert_close(rolled_back, expected, rtol=1e-5, atol=1e-5)
