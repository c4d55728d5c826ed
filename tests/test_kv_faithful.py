"""Faithfulness of H2O, SnapKV's GQA rules and StreamingLLM's re-rotation, against references
computed independently in the tests (plain eager attention from each layer's q/k, RoPE applied)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from paretoray.actors.generation import greedy_generate, with_cache
from paretoray.actors.techniques import build_technique
from paretoray.actors.techniques.streaming_llm import rope_inv_freq, rotate_by
from tests.masked_reference import causal, masked_logits


def prompt(model, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (1, length), generator=generator)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def layer_qk(model, layer_idx: int, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [Hq, T, D] and keys [Hkv, T, D] of one layer for its inputs [1, T, hidden], RoPE at
    positions 0..T-1, written out here rather than taken from the technique."""
    attn = model.model.layers[layer_idx].self_attn
    length, dim = inputs.shape[1], attn.head_dim
    q = attn.q_proj(inputs).view(length, -1, dim).transpose(0, 1)
    k = attn.k_proj(inputs).view(length, -1, dim).transpose(0, 1)
    cos, sin = model.model.rotary_emb(inputs, torch.arange(length)[None])
    cos, sin = cos[0], sin[0]  # [T, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def record_attention_inputs(model):
    """Forward pre-hooks keeping every attention module's input per call; returns (inputs, handles)."""
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.model.layers))}

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        inputs[module.layer_idx].append(hidden.detach().clone())

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    return inputs, handles


# --- H2O: decode-time accumulated scores ------------------------------------------------------

def h2o_reference(q, k, scaling, kv_head, groups, chunks, budget, recent_fraction):
    """H2O's accumulation for one KV head, as FMInference/H2O's real-drop cache does it: each chunk's
    softmax attention (over what the cache holds, causal inside the chunk) is summed over the chunk's
    queries and added to the kept keys' scores; new keys start at zero; evicted keys are dropped with
    their scores. GQA (absent from the MHA-only reference): the group's query heads are averaged.

    Returns the kept text positions and their scores, in text order.
    """
    heads = list(range(kv_head * groups, (kv_head + 1) * groups))
    recent = min(budget, max(1, round(budget * recent_fraction)))
    kept: list[int] = []
    scores = torch.zeros(0)
    start = 0
    for size in chunks:
        new = list(range(start, start + size))
        kept = kept + new
        logits = (q[heads][:, new] @ k[kv_head, kept].T).double() * scaling  # [g, size, len(kept)]
        visible = torch.tensor(kept)[None, :] <= torch.tensor(new)[:, None]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        scores = torch.cat([scores, torch.zeros(size, dtype=torch.float64)]) + probs.sum(dim=1).mean(dim=0)
        if len(kept) > budget:
            n = len(kept)
            heavy = scores[: n - recent].topk(budget - recent).indices.tolist()
            keep = sorted(heavy + list(range(n - recent, n)))
            kept, scores = [kept[i] for i in keep], scores[keep]
        start += size
    return kept, scores


@pytest.mark.parametrize("split,budget,fraction,steps", [(None, 24, 0.5, 6), (100, 30, 0.25, 5), (None, 124, 0.5, 8)])
def test_h2o_decode_scores_equal_independently_summed_attention(tiny_model, split, budget, fraction, steps):
    """Each layer's carried scores equal attention summed over every query so far (prompt included)
    over the positions still kept, and the kept positions are the reference's heavy hitters plus
    recent tokens. `split`: a context-only placement (the question arrives as a second chunk);
    budget 124 > prompt 120: nothing evicted until decoding passes the budget."""
    model, _ = tiny_model
    ids = prompt(model, 120, seed=11)
    technique = build_technique("h2o", {"max_capacity_prompt": budget, "recent_fraction": fraction})
    inputs, handles = record_attention_inputs(model)
    try:
        with technique.applied(model) as cache:
            if split is None:
                run = greedy_generate(model, ids, cache, max_new_tokens=steps)
                chunks = [120]
            else:
                run = greedy_generate(model, ids[:, :split], cache, max_new_tokens=steps, question_ids=ids[:, split:])
                chunks = [split, 120 - split]
    finally:
        for handle in handles:
            handle.remove()
    chunks += [1] * (len(run.tokens) - 1)  # every generated token but the last is fed back
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    with torch.no_grad():
        for layer_idx, layer in enumerate(cache.layers):
            assert [x.shape[1] for x in inputs[layer_idx]] == chunks
            q, k = layer_qk(model, layer_idx, torch.cat(inputs[layer_idx], dim=1))
            scaling = model.model.layers[layer_idx].self_attn.head_dim ** -0.5
            for kv_head in range(config.num_key_value_heads):
                kept, scores = h2o_reference(q, k, scaling, kv_head, groups, chunks, budget, fraction)
                assert layer.positions[0, kv_head].tolist() == kept
                torch.testing.assert_close(layer.scores[0, kv_head].double(), scores, atol=1e-5, rtol=1e-5)
            assert layer.keys.shape[-2] == min(budget, sum(chunks))


# --- SnapKV: the original per-query-head GQA rule ---------------------------------------------

@pytest.fixture(scope="module")
def eager_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def snapkv_kept_prefix(attn, window, kernel, pooling, budget, gqa, kv_heads) -> list[set[int]]:
    """The prefix positions SnapKV keeps, one set per query head (repeat_kv, then top-k per query
    head on the pooled window votes) or per KV head (votes averaged over the group)."""
    q_heads, length, _ = attn.shape
    votes = attn[:, length - window :, : length - window].sum(dim=1)  # [Hq, L-w], per query head
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    if gqa == "group_mean":
        pooled = pooled.view(kv_heads, q_heads // kv_heads, -1).mean(dim=1)
    return [set(row.topk(budget - window).indices.tolist()) for row in pooled]


def test_snapkv_per_query_head_selects_per_query_head_on_repeated_kv(tiny_model, eager_model):
    model, _ = tiny_model
    length, window, kernel, budget = 150, 8, 5, 40
    ids = prompt(model, length, seed=3)
    technique = build_technique("snapkv", {"window_size": window, "kernel_size": kernel, "max_capacity_prompt": budget,
                                           "gqa": "per_query_head"})
    with technique.applied(model) as cache:
        greedy_generate(model, ids, cache, max_new_tokens=1)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        attentions = eager_model(ids, output_attentions=True).attentions  # repeat_kv inside: [1, Hq, L, L]
        model(ids, **with_cache(model, dense), use_cache=True)
    q_heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    groups = q_heads // kv_heads
    for layer_idx, layer in enumerate(cache.layers):
        expected = snapkv_kept_prefix(attentions[layer_idx][0], window, kernel, "avgpool", budget, "per_query_head", kv_heads)
        assert layer.keys.shape == (1, q_heads, budget, layer.keys.shape[-1])  # num_attention_heads heads kept
        for head in range(q_heads):
            positions = layer.positions[0, head].tolist()
            assert set(positions) == expected[head] | set(range(length - window, length))
            torch.testing.assert_close(layer.keys[0, head], dense.layers[layer_idx].keys[0, head // groups, positions])
            torch.testing.assert_close(layer.values[0, head], dense.layers[layer_idx].values[0, head // groups, positions])
        # The rule matters on this model: some group's query heads keep different positions.
        assert any(expected[h] != expected[h + 1] for h in range(0, q_heads, groups))


@pytest.mark.parametrize("gqa", ["per_query_head", "group_mean"])
def test_snapkv_decoding_matches_a_masked_dense_reference(tiny_model, eager_model, tiny_model_dir, gqa):
    """Decoding with the compressed cache gives the logits of the full sequence run densely with each
    query head of each layer masked, after the prompt, to its kept prefix plus everything since."""
    model, _ = tiny_model
    length, window, kernel, budget, steps = 120, 6, 7, 30, 6
    ids = prompt(model, length, seed=4)
    continuation = prompt(model, steps, seed=5)
    technique = build_technique("snapkv", {"window_size": window, "kernel_size": kernel, "max_capacity_prompt": budget,
                                           "gqa": gqa})
    with torch.no_grad(), technique.applied(model) as cache:
        logits = [model(ids, **with_cache(model, cache), use_cache=True).logits[0, -1]]
        for token in continuation[0]:
            logits.append(model(token.view(1, 1), **with_cache(model, cache), use_cache=True).logits[0, -1])
    full = torch.cat([ids, continuation], dim=1)
    total = full.shape[1]
    q_heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    allowed = {}
    with torch.no_grad():
        attentions = eager_model(ids, output_attentions=True).attentions
        for layer_idx in range(model.config.num_hidden_layers):
            prefix = snapkv_kept_prefix(attentions[layer_idx][0], window, kernel, "avgpool", budget, gqa, kv_heads)
            allowed[layer_idx] = causal(q_heads, total)
            for head in range(q_heads):
                keep = prefix[head if gqa == "per_query_head" else head // (q_heads // kv_heads)]
                dropped = [p for p in range(length - window) if p not in keep]
                allowed[layer_idx][head, length:, dropped] = False
        unmasked = eager_model(full).logits[0, length - 1 :]
    expected = masked_logits(tiny_model_dir, full, allowed)[length - 1 :]
    torch.testing.assert_close(torch.stack(logits), expected, atol=1e-4, rtol=1e-4)
    # The comparison has teeth: the first logit (prefill) is dense, the later ones are not.
    torch.testing.assert_close(logits[0], unmasked[0], atol=1e-4, rtol=1e-4)
    assert (torch.stack(logits)[1:] - unmasked[1:]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_per_query_head_reports_groups_times_the_kv_bytes(tiny_model, name):
    model, _ = tiny_model
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    ids = prompt(model, 100, seed=6)
    params = {"window_size": 8, "max_capacity_prompt": 40}
    mean = build_technique(name, {**params, "gqa": "group_mean"}).generate(model, ids, 5)
    per_head = build_technique(name, {**params, "gqa": "per_query_head"}).generate(model, ids, 5)
    assert per_head.kv_bytes == groups * mean.kv_bytes
    # As in the reference, the cache holds the repeated heads even when nothing is compressed.
    covered = build_technique(name, {**params, "max_capacity_prompt": 512, "gqa": "per_query_head"}).generate(model, ids, 5)
    dense = build_technique("dense", {}).generate(model, ids, 5)
    assert covered.tokens == dense.tokens and covered.kv_bytes == groups * dense.kv_bytes
    assert build_technique(name, {"gqa": "per_query_head"}).label.count("gqa=per_query_head") == 1


def test_pyramidkv_per_query_head_keeps_the_pyramid_per_query_head(tiny_model):
    model, _ = tiny_model
    technique = build_technique("pyramidkv", {"window_size": 4, "max_capacity_prompt": 40, "beta": 4, "gqa": "per_query_head"})
    with technique.applied(model) as cache:
        greedy_generate(model, prompt(model, 200, seed=7), cache, max_new_tokens=1)
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[1] == model.config.num_attention_heads
        assert layer.keys.shape[-2] == technique.layer_budget(i, len(cache.layers), 200)


# --- StreamingLLM: models whose RoPE the sink re-rotation would get wrong ----------------------

def tiny_llama(**rope) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **rope)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def run_streaming(model, length: int = 40):
    return build_technique("streaming_llm", {"n_sink": 2, "window": 8}).generate(model, prompt(model, length), 4)


SHIFTABLE = {
    "default": {},
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16, "rope_theta": 10000.0}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                 "rope_theta": 10000.0}},
}


@pytest.mark.parametrize("kind", list(SHIFTABLE))
def test_streaming_runs_and_rotates_exactly_for_fixed_frequency_rope(kind):
    """For these RoPE types moving a key by `shift` with rotate_by equals the model's own RoPE at the
    later position (yarn's attention factor included), so streaming_llm accepts them."""
    model = tiny_llama(**SHIFTABLE[kind])
    run = run_streaming(model)
    assert len(run.tokens) == 4
    key = torch.randn(1, 2, 1, model.config.head_dim)
    position = torch.tensor([[5]])
    for shift in (1, 7, 50):
        cos, sin = model.model.rotary_emb(key, position)
        cos2, sin2 = model.model.rotary_emb(key, position + shift)
        at, later = key * cos + rotate_half(key) * sin, key * cos2 + rotate_half(key) * sin2
        torch.testing.assert_close(rotate_by(at, shift, rope_inv_freq(model)), later, atol=1e-5, rtol=1e-5)


def test_streaming_refuses_dynamic_ntk_rope():
    model = tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=r"LlamaConfig\.rope_parameters\['rope_type'\]='dynamic'"):
        run_streaming(model)


def test_streaming_refuses_partial_rotary():
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       max_position_embeddings=64, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match=r"PhiConfig\.partial_rotary_factor=0\.5"):
        run_streaming(PhiForCausalLM(config).eval())


def test_streaming_refuses_rotary_dim_below_the_head():
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64, rotary_dim=8)
    with pytest.raises(ValueError, match=r"GPTJConfig\.rotary_dim=8"):
        run_streaming(GPTJForCausalLM(config).eval())


def test_streaming_refuses_rope_per_layer_type():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                              sliding_window=16)
    with pytest.raises(ValueError, match=r"Gemma3TextConfig\.rope_parameters differs between layer types"):
        run_streaming(Gemma3ForCausalLM(config).eval())


def test_streaming_refusal_reaches_the_trial_record():
    """The error is raised when the technique is applied (at generate), where the runner records it."""
    technique = build_technique("streaming_llm", {"n_sink": 2, "window": 8})  # building it does not need the model
    model = tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="streaming_llm"):
        with technique.applied(model):
            pass
