"""DuoAttention on a tiny random model: the gate-training recipe, its cache, and the technique's
per-head cache checked against a plain reference written here from the rule (retrieval heads:
causal attention over everything; streaming heads: query i sees key j iff j <= i and
(j < sinks or i - j < recent))."""

from __future__ import annotations

import ast
import random
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from paretoray.actors import artifacts, static_decode
from paretoray.actors.duo_gates import Gates, retrieval_count
from paretoray.actors.generation import cache_nbytes, with_cache
from paretoray.actors.models import model_identity
from paretoray.actors.techniques import build_technique
from paretoray.actors.techniques.duo_attention import FULL_SPAN
from paretoray.recipes import duo

# Seconds on the tiny model: one short passkey per sample, a narrow streaming band.
TINY = duo.Recipe(steps=10, min_length=176, max_length=208, sink_size=4, recent_size=16, passkeys=1, passkey_words=2,
                  lr=0.1)
GATES = [[0.9, 0.1], [0.4, 0.7]]  # ranked (0, 0), (1, 1), (1, 0), (0, 1)
SINKS, RECENT = 4, 16


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A private artifact cache, no gates remembered from another test, no builder but a test's own."""
    from paretoray.actors.techniques import duo_attention

    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(duo_attention, "_GATES", {})
    monkeypatch.setattr(artifacts, "_BUILDERS", {})


def install_gates(model, table, folder, identity=None) -> None:
    """A builder answering with a gates file of `table` for the model (or for `identity`)."""
    path = folder / "gates.json"
    Gates(table, identity or model_identity(model)).save(path)
    artifacts.install({"duo_gates": lambda model: path})


def prompt(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


# ---- the recipe ---------------------------------------------------------------------------------


def test_a_sample_hides_each_passkey_and_asks_for_it_at_the_end(tiny_model):
    _, tokenizer = tiny_model
    recipe = duo.Recipe(passkeys=2, passkey_words=3)
    sample = duo.passkey_sample(tokenizer, 400, recipe, random.Random(0))
    assert sample.ids.shape == (1, 400) and sample.ids[0, 0] == tokenizer.bos_token_id
    start = int(sample.answer.nonzero()[0])
    assert sample.answer[start:].all() and not sample.answer[:start].any()  # one tail: the questions and answers
    context, answers = tokenizer.decode(sample.ids[0, :start]), tokenizer.decode(sample.ids[0, start:])
    keys = [line.split("Passkey: ")[1] for line in answers.split("\n") if line.startswith("Passkey: ")]
    assert len(keys) == 2 and all(len(key.split()) == 3 and set(key.split()) <= set(duo.NATO) for key in keys)
    assert [context.count(f"the {o} passkey to the vault: {key}") for o, key in zip(("first", "second"), keys)] == [1, 1]
    with pytest.raises(ValueError, match="cannot hold 2 passkeys"):
        duo.passkey_sample(tokenizer, 100, recipe, random.Random(0))


def test_the_training_mixture_is_gate_times_full_plus_the_rest_times_streaming():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None]
    band = (j <= i) & ((j < 3) | (i - j < 7))
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    streaming = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=band)
    gates = torch.tensor([[0.0, 1.0], [0.3, 0.8]])
    with duo.mixing(SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")), gates, 3, 7):
        out, _ = duo.mixed_attention(SimpleNamespace(layer_idx=1), q, k, v, None)
    per_query_head = torch.tensor([0.3, 0.3, 0.8, 0.8])[None, :, None, None]
    torch.testing.assert_close(out.transpose(1, 2), per_query_head * full + (1 - per_query_head) * streaming)


def test_training_moves_the_gates_apart_and_lowers_the_loss(tiny_model):
    model, tokenizer = tiny_model
    gates = duo.train_gates(model, tokenizer, TINY)
    total = [distill + TINY.reg_weight * l1 for distill, l1 in gates.history]
    assert len(total) == TINY.steps and gates.history[0][1] == 1.0
    assert gates.history[0][0] < 1e-10  # gates of 1 are full attention: nothing to distil yet
    assert sum(total[-4:]) / 4 < total[0] - 0.002
    flat = [g for row in gates.gates for g in row]
    assert all(0 <= g < 1 for g in flat) and max(flat) - min(flat) > 0.02
    assert gates.model == model_identity(model) and gates.recipe == duo.asdict(TINY)
    # The model is left as found: trainable, its own attention.
    assert all(p.requires_grad for p in model.parameters()) and model.config._attn_implementation == "sdpa"


def test_the_first_use_build_trains_once_per_model_and_retrains_a_file_it_cannot_use(tiny_model_dir, monkeypatch, capfd):
    from transformers import AutoModelForCausalLM

    from paretoray.recipes import build, builders

    monkeypatch.setattr(duo, "DEFAULT_RECIPE", duo.Recipe(**{**duo.asdict(TINY), "steps": 3}))
    assert builders()["duo_gates"] is build.BUILDERS["duo_gates"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    identity = model_identity(model)
    first = builders()["duo_gates"](model=model)
    trained = Gates.load(first)
    assert builders()["duo_gates"](model=model) == first and Gates.load(first) == trained  # the same gates back
    assert capfd.readouterr().err.count("duo: training") == 1
    assert first.parent == duo.duo_folder(str(tiny_model_dir)) and first.parent.name == f"tiny-llama-{identity[:16]}"
    assert trained.model == identity and len(trained.history) == 3
    # Gates of another model, or a torn file, are trained again.
    Gates(trained.gates, "0" * 64).save(first)
    builders()["duo_gates"](model=model)
    first.write_text('{"gates": [[0.5')
    builders()["duo_gates"](model=model)
    assert capfd.readouterr().err.count("duo: training") == 2 and Gates.load(first).model == identity
    # The technique reads them through the installed builder.
    artifacts.install(builders())
    technique = build_technique("duo_attention", {"retrieval_share": 0.5})
    technique.prepare(model, [200])
    assert technique.retrieval_heads(model) == Gates.load(first).retrieval_heads(0.5)


def test_the_technique_refuses_gates_of_another_model(tiny_model, tmp_path):
    model, _ = tiny_model
    install_gates(model, GATES, tmp_path, identity="0" * 64)
    with pytest.raises(ValueError, match="another model"):
        build_technique("duo_attention", {"retrieval_share": 0.5}).prepare(model, [200])


def test_without_a_builder_it_names_the_command_that_trains_the_gates(tiny_model):
    model, _ = tiny_model
    with pytest.raises(artifacts.ArtifactMissing, match="python -m paretoray.recipes.duo"):
        build_technique("duo_attention", {"retrieval_share": 0.5}).prepare(model, [200])


def test_main_trains_and_saves_the_gates(tiny_model_dir, tmp_path):
    out = tmp_path / "gates.json"
    assert duo.main(["--model", str(tiny_model_dir), "--steps", "2", "--min-length", "176", "--max-length", "176",
                     "--passkeys", "1", "--passkey-words", "2", "--sink-size", "4", "--recent-size", "16",
                     "--out", str(out)]) == 0
    gates = Gates.load(out)
    assert len(gates.history) == 2 and gates.recipe["recent_size"] == 16


def test_the_actor_side_does_not_import_the_recipes():
    from paretoray.actors import duo_gates
    from paretoray.actors.techniques import duo_attention

    for module in (duo_attention, duo_gates):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in imported if name and name.startswith("paretoray.recipes")], module.__name__


# ---- deployment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("share,count", [(0.0, 0), (0.25, 1), (0.5, 2), (0.6, 2), (0.625, 3), (0.75, 3), (1.0, 4)])
def test_a_share_keeps_that_many_heads_of_highest_gate_dense(tiny_model, tmp_path, share, count):
    model, _ = tiny_model
    install_gates(model, GATES, tmp_path)
    technique = build_technique("duo_attention", {"retrieval_share": share, "sink_size": SINKS, "recent_size": RECENT})
    ranked = [(0, 0), (1, 1), (1, 0), (0, 1)]
    expected = [[(layer, h) in ranked[:count] for h in range(2)] for layer in range(2)]
    assert technique.retrieval_heads(model) == expected
    with technique.applied(model) as cache, torch.inference_mode():
        model(input_ids=prompt(model, 60, 0), **with_cache(model, cache), use_cache=True)
    assert [layer.spans for layer in cache.layers] == [[FULL_SPAN if d else RECENT for d in row] for row in expected]


def test_ranking_is_over_the_whole_model_with_ties_in_head_order():
    rng = random.Random(0)
    table = [[rng.random() for _ in range(3)] for _ in range(5)]
    flat = sorted((g for row in table for g in row), reverse=True)
    for share in (0.1, 1 / 3, 0.5, 0.9):
        chosen = Gates(table, "m").retrieval_heads(share)
        kept = [g for row, keep in zip(table, chosen) for g, k in zip(row, keep) if k]
        assert sorted(kept, reverse=True) == flat[: retrieval_count(share, 15)]
    assert retrieval_count(0.5, 5) == 3 and retrieval_count(0.1, 15) == 2  # halves up
    assert Gates([[0.5, 0.5], [0.5, 0.5]], "m").retrieval_heads(0.5) == [[True, True], [False, False]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Gates([[1.5]], "m")


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The rule, head by head, over a plain dense cache: causal for retrieval heads, sinks + recent
    band for streaming heads (query i at position p - n + i when the cache holds p keys)."""
    n, p = query.shape[-2], key.shape[-2]
    i, j = torch.arange(p - n, p)[:, None], torch.arange(p)[None]
    causal, band = j <= i, (j <= i) & ((j < SINKS) | (i - j < RECENT))
    dense = _REFERENCE_HEADS[module.layer_idx]
    groups = query.shape[1] // key.shape[1]
    mask = torch.stack([causal if dense[h // groups] else band for h in range(query.shape[1])])[None]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("duo_test_reference", reference_attention)
_REFERENCE_HEADS: list[list[bool]] = []


@contextmanager
def reference(model, heads):
    _REFERENCE_HEADS[:] = heads
    previous = model.config._attn_implementation
    model.config._attn_implementation = "duo_test_reference"
    try:
        yield
    finally:
        model.config._attn_implementation = previous


@torch.inference_mode()
def test_retrieval_heads_cache_what_dense_caches_and_streaming_heads_their_sinks_and_recent_tokens(tiny_model, tmp_path):
    model, _ = tiny_model
    install_gates(model, GATES, tmp_path)
    technique = build_technique("duo_attention", {"retrieval_share": 0.5, "sink_size": SINKS, "recent_size": RECENT})
    heads = technique.retrieval_heads(model)
    ids = prompt(model, 100, 1)
    with reference(model, heads):
        dense_cache = DynamicCache(config=model.config)
        expected = model(input_ids=ids, **with_cache(model, dense_cache), use_cache=True).logits[0, -1]
    with technique.applied(model) as cache:
        logits = model(input_ids=ids, **with_cache(model, cache), use_cache=True).logits[0, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    streaming_positions = list(range(SINKS)) + list(range(100 - RECENT, 100))
    width = model.config.head_dim * 2 * 4  # key and value, float32
    for layer, reference_layer, dense in zip(cache.layers, dense_cache.layers, heads):
        for h, is_dense in enumerate(dense):
            keys, values = layer.head_entries(h)
            kept = list(range(100)) if is_dense else streaming_positions
            torch.testing.assert_close(keys, reference_layer.keys[:, h, kept], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values, reference_layer.values[:, h, kept], rtol=1e-5, atol=1e-5)
        # Physically: a streaming head owns exactly sinks + recent slots.
        assert [r for r, d in zip(layer.region, dense) if not d] == [SINKS + RECENT] * dense.count(False)
        assert layer.keys.shape[1] == sum(layer.region)
    assert cache_nbytes(cache) == sum(sum(layer.region) for layer in cache.layers) * width


def test_decoding_keeps_the_rule_and_static_slots_cost_what_the_rule_keeps(tiny_model, tmp_path, monkeypatch):
    model, _ = tiny_model
    install_gates(model, GATES, tmp_path)
    technique = build_technique("duo_attention", {"retrieval_share": 0.5, "sink_size": SINKS, "recent_size": RECENT})
    heads = technique.retrieval_heads(model)
    ids, steps = prompt(model, 60, 2), 12
    run = technique.generate(model, ids, steps)
    sequence = torch.cat([ids, torch.tensor([run.tokens[:-1]])], dim=1)
    with reference(model, heads), torch.inference_mode():  # every decoded token is the rule's argmax on its prefix
        for step in range(steps):
            assert int(model(input_ids=sequence[:, : 60 + step]).logits[0, -1].argmax()) == run.tokens[step]
    monkeypatch.setattr(static_decode, "_compiled", lambda device: static_decode._step)  # the slot rules, uncompiled
    static = technique.generate(model, ids, steps, compiled=True)
    dense = build_technique("dense", {}).generate(model, ids, steps, compiled=True)
    assert static.compiled and static.tokens == run.tokens
    # Per layer one retrieval head holding dense's slots and one streaming head holding sinks + recent.
    per_slot = model.config.head_dim * 2 * 4  # key and value, float32
    dense_slots = dense.kv_bytes // (per_slot * 4)  # per head
    assert dense_slots >= 60 + steps - 1
    assert static.kv_bytes == 2 * (dense_slots + SINKS + RECENT) * per_slot


def test_a_share_of_one_is_dense_and_needs_no_gates(tiny_model):
    model, _ = tiny_model
    ids = prompt(model, 90, 3)
    technique = build_technique("duo_attention", {"retrieval_share": 1.0, "sink_size": 2, "recent_size": 4})
    assert technique.generate(model, ids, 6).tokens == build_technique("dense", {}).generate(model, ids, 6).tokens


def test_a_question_after_the_context_follows_the_rule_eager_compiled_and_batched(tiny_model, tmp_path, monkeypatch):
    """Context-only: the context is prefilled, the question appended one token per forward (its
    streaming heads' rings roll through it), then decoding; every token is the rule's argmax over
    context + question + the tokens before it, eagerly, on static slots (rings converted whatever
    their order) and in a batch with another sequence."""
    model, _ = tiny_model
    install_gates(model, GATES, tmp_path)
    technique = build_technique("duo_attention", {"retrieval_share": 0.5, "sink_size": SINKS, "recent_size": RECENT})
    heads = technique.retrieval_heads(model)
    context, question, steps = prompt(model, 70, 6), prompt(model, 9, 7), 8
    run = technique.generate(model, context, steps, question_ids=question)
    sequence = torch.cat([context, question, torch.tensor([run.tokens[:-1]])], dim=1)
    with reference(model, heads), torch.inference_mode():
        for step in range(steps):
            assert int(model(input_ids=sequence[:, : 79 + step]).logits[0, -1].argmax()) == run.tokens[step]
    monkeypatch.setattr(static_decode, "_compiled", lambda device: static_decode._step)
    assert technique.generate(model, context, steps, question_ids=question, compiled=True).tokens == run.tokens
    other = prompt(model, 40, 8), prompt(model, 3, 9)
    batch = technique.generate_batch(model, [context, other[0]], steps, question_ids=[question, other[1]], compiled=True)
    assert batch.tokens[0] == run.tokens
    assert batch.tokens[1] == technique.generate(model, other[0], steps, question_ids=other[1]).tokens


@torch.inference_mode()
def test_static_slots_after_a_question_hold_the_keys_of_the_positions_they_name(tiny_model, tmp_path):
    """After the question rolled the streaming rings, each static slot's position names the key it
    holds (the reference's key at that position), and the kept sets are the rule's."""
    from paretoray.actors.generation import prefill

    model, _ = tiny_model
    install_gates(model, GATES, tmp_path)
    technique = build_technique("duo_attention", {"retrieval_share": 0.5, "sink_size": SINKS, "recent_size": RECENT})
    heads = technique.retrieval_heads(model)
    context, question = prompt(model, 70, 6), prompt(model, 13, 7)
    with reference(model, heads):
        dense_cache = DynamicCache(config=model.config)
        model(input_ids=torch.cat([context, question], dim=1), **with_cache(model, dense_cache), use_cache=True)
    with technique.applied(model) as cache:
        prefill(model, context, cache, question, question_by_token=True)
        static = technique.static_cache(model, cache, 4)
    seen = 83
    for layer, reference_layer, dense in zip(static.layers, dense_cache.layers, heads):
        h = 0
        for group in layer.groups:
            for g in range(group.heads):
                positions = group.positions[0, g]
                valid = positions >= 0
                kept = sorted(positions[valid].tolist())
                assert kept == (list(range(seen)) if dense[h] else list(range(SINKS)) + list(range(seen - RECENT, seen)))
                torch.testing.assert_close(group.keys[0, g][valid], reference_layer.keys[0, h, positions[valid]], rtol=1e-5, atol=1e-5)
                h += 1
