"""KVzip against a reference computed here from plain eager attention: the model reads the context,
then a repeat prompt and the context again; each context key's score is the largest attention a
reconstruction query gives it, softmax renormalised over the reference's key set (sinks, the
chunk, the reconstruction's own keys), max over the KV group's query heads."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from paretoray.actors.generation import cache_nbytes, prefill, with_cache
from paretoray.actors.techniques import build_technique, reference_technique
from paretoray.actors.techniques.kvzip import assistant_suffix
from tests.masked_reference import causal, masked_logits

LENGTH, NEW_TOKENS = 160, 6


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def context(model, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def chunks(tokenizer, ids: torch.Tensor, sinks: int, size: int) -> list[tuple[int, int, torch.Tensor]]:
    """The reconstruction inputs, written out from the reference's strings (no template: "\\n")."""
    assert not tokenizer.chat_template

    def encode(text):
        return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])

    out, length = [], ids.shape[1]
    for start in range(sinks, length, size):
        end = min(start + size, length)
        if start == sinks:
            head = encode("\n\nRepeat the previous context exactly.")
        else:
            head = torch.cat([encode("\n\nRepeat the part of the previous context exactly, starting with "),
                              ids[:, max(start - 8, start - size):start]], dim=1)
        out.append((start, end, torch.cat([head, encode("\n"), ids[:, start:end]], dim=1)))
    return out


@torch.no_grad()
def reference_scores(eager, tokenizer, ids, sinks: int, size: int) -> torch.Tensor:
    """[layers, Hkv, L]: max attention from each chunk's reconstruction queries (eager weights over
    context + reconstruction, renormalised over sinks + chunk + reconstruction), sinks +inf."""
    config = eager.config
    groups = config.num_attention_heads // config.num_key_value_heads
    length = ids.shape[1]
    scores = torch.zeros(config.num_hidden_layers, config.num_key_value_heads, length)
    scores[..., :sinks] = float("inf")
    for start, end, repeat in chunks(tokenizer, ids, sinks, size):
        attentions = eager(torch.cat([ids, repeat], dim=1), output_attentions=True).attentions
        total = length + repeat.shape[1]
        columns = [*range(sinks), *range(start, end), *range(length, total)]
        for layer, weights in enumerate(attentions):
            p = weights[0, :, length:, :][..., columns]  # [Hq, T, S]: reconstruction rows
            p = p / p.sum(dim=-1, keepdim=True)
            chunk = p[..., sinks : sinks + end - start]
            scores[layer, :, start:end] = chunk.view(config.num_key_value_heads, groups, -1, end - start).amax(dim=(1, 2))
    return scores


def reference_kept(scores: torch.Tensor, budget: int, head_budget: str) -> list[list[set[int]]]:
    layers, heads, length = scores.shape
    if head_budget == "uniform":
        picks = [[set(scores[l, h].topk(budget).indices.tolist()) for h in range(heads)] for l in range(layers)]
        return picks
    kept = [[set() for _ in range(heads)] for _ in range(layers)]
    if head_budget == "global":
        for i in scores.flatten().topk(budget * heads * layers).indices.tolist():
            kept[i // (heads * length)][(i // length) % heads].add(i % length)
    else:
        for l in range(layers):
            for i in scores[l].flatten().topk(budget * heads).indices.tolist():
                kept[l][i // length].add(i % length)
    return kept


def compressed_cache(model, technique, ids, question=None):
    with torch.inference_mode(), technique.applied(model) as cache:
        prefill(model, ids, cache, question)
    return cache


def kept_positions(cache) -> list[list[set[int]]]:
    return [[set(layer.head(h)[2].tolist()) for h in range(len(layer.lengths))] for layer in cache.layers]


@pytest.mark.parametrize("head_budget,chunk_size", [("global", 48), ("global", 2000), ("layerwise", 48), ("uniform", 64)])
def test_kept_positions_equal_the_eager_reconstruction_reference(tiny_model, eager, head_budget, chunk_size):
    model, tokenizer = tiny_model
    ids = context(model)
    technique = build_technique("kvzip", {"max_capacity_prompt": 40, "head_budget": head_budget, "chunk_size": chunk_size})
    kept = kept_positions(compressed_cache(model, technique, ids))
    expected = reference_kept(reference_scores(eager, tokenizer, ids, 4, chunk_size), 40, head_budget)
    assert kept == expected
    counts = [len(head) for layer in kept for head in layer]
    assert sum(counts) == 40 * len(counts)
    if head_budget != "uniform":
        assert len(set(counts)) > 1, "heads should keep different numbers (the ragged path is exercised)"
    assert all({0, 1, 2, 3} <= head for layer in kept for head in layer)  # the sinks


def test_the_question_never_changes_what_is_kept(tiny_model):
    model, _ = tiny_model
    ids = context(model)
    technique = build_technique("kvzip", {"max_capacity_prompt": 0.25, "chunk_size": 64})
    alone = kept_positions(compressed_cache(model, technique, ids))
    for seed in (1, 2):
        question = context(model, 12, seed)
        cache = compressed_cache(model, technique, ids, question)
        with_question = kept_positions(cache)
        assert [[head - set(range(LENGTH, LENGTH + 12)) for head in layer] for layer in with_question] == alone
        assert all(set(range(LENGTH, LENGTH + 12)) <= head for layer in with_question for head in layer)


def test_a_budget_covering_the_context_equals_dense(tiny_model):
    model, _ = tiny_model
    ids = context(model)
    dense = reference_technique().generate(model, ids, NEW_TOKENS)
    for capacity in (float(LENGTH), 1.0, 1024.0):
        run = build_technique("kvzip", {"max_capacity_prompt": capacity}).generate(model, ids, NEW_TOKENS)
        assert run.tokens == dense.tokens and run.kv_bytes == dense.kv_bytes
        assert run.stats["reconstruction_tokens"] == 0


def test_kv_bytes_are_the_sum_of_the_heads_own_lengths(tiny_model):
    model, _ = tiny_model
    ids = context(model)
    technique = build_technique("kvzip", {"max_capacity_prompt": 0.25, "chunk_size": 64})
    cache = compressed_cache(model, technique, ids)
    per_entry = 2 * model.config.head_dim * 4  # key + value, float32
    heads = model.config.num_key_value_heads
    lengths = [[len(h) for h in layer] for layer in kept_positions(cache)]
    expected = per_entry * sum(map(sum, lengths))
    assert cache_nbytes(cache) == expected == per_entry * round(0.25 * LENGTH) * heads * len(cache.layers)
    assert sum(map(sum, lengths)) < sum(max(row) * len(row) for row in lengths)  # not padded to the longest head
    dense = reference_technique().generate(model, ids, NEW_TOKENS)
    assert technique.generate(model, ids, NEW_TOKENS).kv_bytes < dense.kv_bytes
    static = technique.static_cache(model, cache, NEW_TOKENS)  # the slots compiled decoding runs on
    assert cache_nbytes(static) == expected + sum(heads * NEW_TOKENS * per_entry for _ in cache.layers) < dense.kv_bytes


def test_decoding_attends_each_head_over_exactly_its_kept_entries(tiny_model, tiny_model_dir):
    """After the reconstruction, every forward (a context-only question, then decoded tokens) gives
    the logits of the whole text run densely with each query head masked, after the context, to its
    KV head's kept context positions."""
    model, _ = tiny_model
    ids, question, continuation = context(model), context(model, 9, seed=3), context(model, 5, seed=4)
    technique = build_technique("kvzip", {"max_capacity_prompt": 0.25, "chunk_size": 64})
    with torch.no_grad(), technique.applied(model) as cache:
        model(ids, **with_cache(model, cache), use_cache=True)
        logits = [model(question, **with_cache(model, cache), use_cache=True).logits[0]]
        for token in continuation[0]:
            logits.append(model(token.view(1, 1), **with_cache(model, cache), use_cache=True).logits[0])
    kept = kept_positions(cache)
    full = torch.cat([ids, question, continuation], dim=1)
    total, q_heads = full.shape[1], model.config.num_attention_heads
    groups = q_heads // model.config.num_key_value_heads
    allowed = {}
    for layer, heads in enumerate(kept):
        assert all(h - set(range(LENGTH)) == set(range(LENGTH, total)) for h in heads)  # appended to every head
        allowed[layer] = causal(q_heads, total)
        for head in range(q_heads):
            allowed[layer][head, LENGTH:, sorted(set(range(LENGTH)) - heads[head // groups])] = False
    expected = masked_logits(tiny_model_dir, full, allowed)[LENGTH:]
    with torch.no_grad():
        unmasked = model(full).logits[0, LENGTH:]  # no technique installed: dense
    got = torch.cat(logits)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - unmasked).abs().max() > 1e-2  # the comparison has teeth


def test_the_prefill_time_includes_the_reconstruction(tiny_model):
    """Each base-model forward is slowed by 50 ms: the context's and every chunk's land in prefill_s."""
    model, tokenizer = tiny_model
    ids = context(model)
    technique = build_technique("kvzip", {"max_capacity_prompt": 0.25, "chunk_size": 64})
    inputs = chunks(tokenizer, ids, 4, 64)
    handle = model.model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    try:
        run = technique.generate(model, ids, 2)
        batch = technique.generate_batch(model, [ids, ids[:, :120]], 2)
    finally:
        handle.remove()
    assert run.stats["reconstruction_tokens"] == sum(r.shape[1] for _, _, r in inputs)
    assert run.stats["reconstruction_s"] >= 0.05 * len(inputs)
    assert run.prefill_s >= run.stats["reconstruction_s"] + 0.05  # the context's forward, then the reconstruction
    assert [s["reconstruction_tokens"] for s in batch.stats] == [
        sum(r.shape[1] for _, _, r in chunks(tokenizer, x, 4, 64)) for x in (ids, ids[:, :120])]
    assert all(p >= s["reconstruction_s"] for p, s in zip(batch.prefill_s, batch.stats))
    assert set(technique.reports) <= set(run.stats)


def test_the_suffix_follows_a_chat_template(tiny_model):
    _, tokenizer = tiny_model
    assert assistant_suffix(tokenizer) == "\n"
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert assistant_suffix(templated) == "<|end|><|assistant|>"
