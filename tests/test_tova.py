"""TOVA on a tiny random Llama, against references computed independently here: the prefill keeps
the top of the last prompt token's eager attention (transformers' own attention matrices), every
decoding step evicts the argmin of that step's attention (recomputed from each layer's recorded
inputs), the static slots (eager rules and torch.compile) evict the same positions and decode the
same tokens, and the cache physically stays at its budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from paretoray.actors import static_decode
from paretoray.actors.generation import decode, eager_step, greedy_generate, prefill
from paretoray.actors.techniques import build_technique
from tests.test_kv_faithful import layer_qk, record_attention_inputs


def prompt(model, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def eager_model(tiny_model_dir):
    """The same tiny model with eager attention, which returns every attention matrix."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def same_for_every_head(layer) -> list[int]:
    """The positions a layer keeps, asserted identical across its KV heads (one selection per layer)."""
    heads = [sorted(head) for head in layer.positions[0].tolist()]
    assert all(head == heads[0] for head in heads), "TOVA selects per layer: every head keeps the same positions"
    return heads[0]


# --- prefill ------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,capacity", [(150, 40), (150, 0.3), (97, 96)])
def test_prefill_keeps_the_top_of_the_last_tokens_head_averaged_attention(tiny_model, eager_model, length, capacity):
    model, _ = tiny_model
    ids = prompt(model, length, seed=length)
    technique = build_technique("tova", {"max_capacity_prompt": capacity})
    budget = technique.layer_budget(0, 1, length)
    with technique.applied(model) as cache:
        greedy_generate(model, ids, cache, max_new_tokens=1)  # the prefill alone: no token fed back
    with torch.no_grad():
        attentions = eager_model(ids, output_attentions=True).attentions  # per layer [1, Hq, L, L]
    for layer, attn in zip(cache.layers, attentions):
        scores = attn[0, :, -1, :].double().mean(dim=0)  # the last token's attention, mean over all query heads [L]
        expected = sorted(scores.topk(budget).indices.tolist())
        assert same_for_every_head(layer) == expected
        assert layer.keys.shape[-2] == layer.values.shape[-2] == budget


# --- decoding: one eviction per step ---------------------------------------------------------------

def record_kept(model, cache):
    """Forward hooks, registered after the technique's own, snapshotting every layer's kept positions
    (head 0, text order) after each forward; returns (snapshots per layer, handles)."""
    kept: dict[int, list[list[int]]] = {i: [] for i in range(len(model.model.layers))}

    def hook(module, args, output):
        kept[module.layer_idx].append(sorted(cache.layers[module.layer_idx].positions[0, 0].tolist()))

    return kept, [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]


def tova_reference_step(q, k, scaling, groups, kept: list[int], query_position: int) -> torch.Tensor:
    """One query's softmax attention over the kept keys (fp64), averaged over every query head. q: [Hq,
    T, D]; k: [Hkv, T, D] -> [len(kept)], in the order of `kept`."""
    probs = []
    for head in range(q.shape[0]):
        logits = (k[head // groups, kept] @ q[head, query_position]).double() * scaling
        probs.append(logits.softmax(dim=-1))
    return torch.stack(probs).mean(dim=0)


@pytest.mark.parametrize("split,capacity,steps", [(None, 24, 10), (100, 30, 8), (None, 124, 10), (None, 0.15, 6)])
def test_each_decoding_step_evicts_the_argmin_of_its_own_attention(tiny_model, split, capacity, steps):
    """Per layer and forward: the kept positions equal an independent simulation (each chunk appended,
    then, above the budget, the top of its last query's head-averaged attention kept), and each
    decoding step drops exactly one entry, the argmin of that step's attention. `split`: a
    context-only placement (the question, 20 tokens, is reduced by its last token's attention);
    budget 124 > prompt 120: nothing is evicted until decoding passes the budget."""
    model, _ = tiny_model
    ids = prompt(model, 120, seed=5)
    technique = build_technique("tova", {"max_capacity_prompt": capacity})
    inputs, handles = record_attention_inputs(model)
    try:
        with technique.applied(model) as cache:
            snapshots, more = record_kept(model, cache)
            handles += more
            if split is None:
                run = greedy_generate(model, ids, cache, max_new_tokens=steps)
            else:
                run = greedy_generate(model, ids[:, :split], cache, max_new_tokens=steps, question_ids=ids[:, split:])
    finally:
        for handle in handles:
            handle.remove()
    chunks = ([120] if split is None else [split, 120 - split]) + [1] * (len(run.tokens) - 1)
    budget = technique.layer_budget(0, 1, chunks[0])
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    evictions = 0
    with torch.no_grad():
        for layer_idx, layer in enumerate(cache.layers):
            assert [x.shape[1] for x in inputs[layer_idx]] == chunks
            q, k = layer_qk(model, layer_idx, torch.cat(inputs[layer_idx], dim=1))
            scaling = model.model.layers[layer_idx].self_attn.head_dim ** -0.5
            kept, start = [], 0
            for size, after in zip(chunks, snapshots[layer_idx]):
                kept = kept + list(range(start, start + size))
                start += size
                if len(kept) > budget:
                    scores = tova_reference_step(q, k, scaling, groups, kept, start - 1)
                    if size == 1:  # a decoding step: one entry over, the least attended leaves
                        assert len(kept) == budget + 1
                        assert sorted(set(kept) - set(after)) == [kept[int(scores.argmin())]]
                        evictions += 1
                    kept = sorted(kept[i] for i in scores.topk(budget).indices.tolist())
                assert after == kept
            assert same_for_every_head(layer) == kept
            assert layer.keys.shape[-2] == min(budget, sum(chunks))
    assert evictions > 0


# --- static slots: the same evictions, the same tokens ------------------------------------------

def kept_per_step(technique, model, ids, steps: int, static: bool, compile: bool = False, split: int | None = None):
    """(tokens, per decoding step the positions each layer keeps) for `steps` tokens, decoded
    eagerly or on static slots (through torch.compile if `compile`); `split`: context ids[:, :split],
    then the rest as the question."""
    trace: list[list[list[int]]] = []

    def snapshot(cache):
        if static:
            trace.append([sorted(p for p in layer.groups[0].positions[0, 0].tolist() if p >= 0) for layer in cache.layers])
        else:
            trace.append([sorted(layer.positions[0, 0].tolist()) for layer in cache.layers])

    def watched(step, cache):
        def run(token):
            out = step(token)
            snapshot(cache)
            return out
        return run

    with torch.inference_mode():
        with technique.applied(model) as cache:
            context, question = (ids, None) if split is None else (ids[:, :split], ids[:, split:])
            first, _ = prefill(model, context, cache, question)
            if not static:
                tokens, *_ = decode(watched(eager_step(model, cache), cache), first, steps, ids.device)
                return tokens, trace
            converted = technique.static_cache(model, cache, steps)
        with static_decode.static_attention_installed(model):
            step = static_decode.compiled_step(model, converted, compile=compile)
            tokens, *_ = decode(watched(step, converted), first, steps, ids.device)
    return tokens, trace


@pytest.mark.parametrize("length,capacity,split", [(100, 20, None), (100, 110, None), (60, 0.25, None), (100, 24, 80)])
def test_static_slots_evict_what_the_eager_cache_evicts(tiny_model, length, capacity, split):
    """The static rules run eagerly (no inductor): 110 > 100 fills while decoding, then evicts;
    split 80: a context-only placement (budget 24 from the context, the question reduced to it)."""
    model, _ = tiny_model
    technique = build_technique("tova", {"max_capacity_prompt": capacity})
    ids = prompt(model, length, seed=length + 1)
    eager = kept_per_step(technique, model, ids, 24, static=False, split=split)
    assert kept_per_step(technique, model, ids, 24, static=True, split=split) == eager
    budget = technique.layer_budget(0, 1, length if split is None else split)
    assert all(len(kept) == min(budget, length + i + 1) for i, step in enumerate(eager[1]) for kept in step)


def test_compiled_decoding_gives_the_eager_tokens_and_evictions(tiny_model):
    model, _ = tiny_model
    technique = build_technique("tova", {"max_capacity_prompt": 30})
    ids = prompt(model, 90, seed=4)
    eager = kept_per_step(technique, model, ids, 12, static=False)
    assert kept_per_step(technique, model, ids, 12, static=True, compile=True) == eager
    assert technique.generate(model, ids, 12, compiled=True).compiled


# --- memory, batches ------------------------------------------------------------------------------

def test_kv_bytes_stay_at_the_budget(tiny_model, monkeypatch):
    monkeypatch.setattr(static_decode, "_compiled", lambda device: static_decode._step)  # the static rules, not inductor
    model, _ = tiny_model
    config = model.config
    ids = prompt(model, 160, seed=8)
    technique = build_technique("tova", {"max_capacity_prompt": 32})
    per_entry = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    eager = technique.generate(model, ids, 10)
    assert eager.kv_bytes == 32 * per_entry  # 160 + 9 fed tokens, 32 kept
    static = technique.generate(model, ids, 10, compiled=True)
    assert static.compiled and static.kv_bytes == 33 * per_entry  # budget + one slot for the incoming token
    assert static.tokens == eager.tokens
    dense = build_technique("dense", {}).generate(model, ids, 10)
    assert dense.kv_bytes == 169 * per_entry


def test_a_batch_with_per_row_budgets_decodes_each_row_as_alone(tiny_model):
    """Budget 90: the 100-token row evicts from its prefill, the 80-token row only once decoding
    brings it past 90, so the rows' caches fill and evict at different steps."""
    model, _ = tiny_model
    technique = build_technique("tova", {"max_capacity_prompt": 90})
    prompts = [prompt(model, 100, seed=1), prompt(model, 80, seed=2)]
    batch = technique.generate_batch(model, prompts, 16)
    assert batch.tokens == [technique.generate(model, ids, 16).tokens for ids in prompts]
    fraction = build_technique("tova", {"max_capacity_prompt": 0.2})  # budgets 20 and 16: from each prompt
    assert fraction.generate_batch(model, prompts, 8).tokens == [fraction.generate(model, ids, 8).tokens for ids in prompts]
