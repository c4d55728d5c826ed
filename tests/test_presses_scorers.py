"""Faithfulness of the query-free scorers `knorm` and `expected_attention` (kvpress's KnormPress and
ExpectedAttentionPress): the kept positions against references recomputed here, in float64, from
each attention module's recorded input, plus dense equality when the budget covers the prompt,
physical KV bytes, and the context-only placement."""

from __future__ import annotations

import math

import pytest
import torch

from paretoray.actors.generation import greedy_generate
from paretoray.actors.techniques import build_technique

NAMES = ["knorm", "expected_attention"]


def prompt(model, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (1, length), generator=generator)


def compress(model, technique, ids, question=None):
    """Prefill `ids` (then `question`, context-only) under `technique`, one decoding step; returns the
    cache and every attention module's prefill input [1, L, hidden]."""
    inputs: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs):
        inputs.setdefault(module.layer_idx, (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone())

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad(), technique.applied(model) as cache:
            greedy_generate(model, ids, cache, max_new_tokens=1, question_ids=question)
    finally:
        for handle in handles:
            handle.remove()
    return cache, inputs


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R_p = cos_p I + sin_p P [n, D, D] with P the rotate-half matrix (P x = [-x2, x1])."""
    dim = cos.shape[-1]
    half = torch.eye(dim // 2, dtype=cos.dtype)
    p = torch.zeros(dim, dim, dtype=cos.dtype)
    p[: dim // 2, dim // 2 :], p[dim // 2 :, : dim // 2] = -half, half
    return torch.diag_embed(cos) + p * sin[:, None, :]  # sin_j = sin_{j +- D/2}: row or column scaling agree


def layer_kv(model, layer_idx: int, hidden: torch.Tensor):
    """Keys [Hkv, L, D] (RoPE at 0..L-1, applied as R_p k) and values [Hkv, L, D] in float64."""
    attn = model.model.layers[layer_idx].self_attn
    length, dim = hidden.shape[1], attn.head_dim
    h = hidden[0].double()
    k = (h @ attn.k_proj.weight.double().T).view(length, -1, dim)
    v = (h @ attn.v_proj.weight.double().T).view(length, -1, dim).transpose(0, 1)
    cos, sin = (x[0].double() for x in model.model.rotary_emb(hidden, torch.arange(length)[None]))
    rotated = torch.einsum("lij,lhj->hli", rope_matrix(cos, sin), k)
    return rotated, v


def top_sets(scores: torch.Tensor, count: int, always: range = range(0)) -> list[set[int]]:
    """Per head: `always` plus the `count` best of scores [H, N] (offset by len(always))."""
    offset = len(always)
    return [set(always) | {offset + i for i in row.topk(count).indices.tolist()} for row in scores]


# --- KNorm --------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,budget", [(150, 40), (97, 0.5)])
def test_knorm_keeps_the_lowest_key_norms(tiny_model, length, budget):
    model, _ = tiny_model
    ids = prompt(model, length, seed=1)
    cache, inputs = compress(model, build_technique("knorm", {"max_capacity_prompt": budget}), ids)
    kept = 40 if budget == 40 else round(budget * length)
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = layer_kv(model, layer_idx, inputs[layer_idx])
        expected = top_sets(-keys.norm(dim=-1), kept)
        positions = layer.positions[0, :, :kept]  # the prompt's entries (the decoded token follows)
        assert [set(row.tolist()) for row in positions] == expected
        for head, row in enumerate(positions):  # the stored entries are those positions' own keys and values
            torch.testing.assert_close(layer.keys[0, head, :kept].double(), keys[head, row], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.values[0, head, :kept].double(), values[head, row], atol=1e-5, rtol=1e-5)
        # Teeth: the lowest norms are not simply the first or last positions.
        assert all(s != set(range(kept)) and s != set(range(length - kept, length)) for s in expected)


# --- ExpectedAttention ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny model with its query and key projections x4. The random model attends almost
    uniformly, so the value norm alone would decide what expected_attention keeps; with sharper
    logits every term of the rule (rotation, covariance, value norm) changes the kept set."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def expected_attention_reference(model, layer_idx, hidden, *, n_future, n_sink, covariance, vnorm, epsilon, rotate=True):
    """Scores [Hkv, L - n_sink] of the non-sink keys, written as kvpress's first version did: the
    statistics of the layer input h (mean, covariance) pushed through each head's block of W_q, the
    explicit RoPE matrices of positions L .. L+n-1 from the model's rotary embedding, averaged."""
    attn = model.model.layers[layer_idx].self_attn
    config = model.config
    q_heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
    length = hidden.shape[1]
    keys, values = layer_kv(model, layer_idx, hidden)
    keys, values = keys[:, n_sink:], values[:, n_sink:]
    h = hidden[0, n_sink:].double()
    w = attn.q_proj.weight.double().view(q_heads, dim, -1)  # [Hq, D, hidden]
    mean_h = h.mean(dim=0)
    cov_h = (h - mean_h).T @ (h - mean_h) / h.shape[0]
    mu = w @ mean_h  # [Hq, D]
    sigma = w @ cov_h @ w.transpose(1, 2)  # [Hq, D, D]
    cos, sin = (x[0].double() for x in model.model.rotary_emb(hidden, torch.arange(length, length + n_future)[None]))
    r = rope_matrix(cos, sin).mean(dim=0) if rotate else torch.eye(dim, dtype=torch.float64)
    mu, sigma = mu @ r.T, r @ sigma @ r.T
    k = keys.repeat_interleave(q_heads // kv_heads, dim=0)  # [Hq, N, D]
    logits = torch.einsum("hd,hnd->hn", mu, k) / math.sqrt(dim)
    if covariance:
        logits = logits + torch.einsum("hnd,hde,hne->hn", k, sigma, k) / dim / 2
    scores = logits.softmax(dim=-1).view(kv_heads, -1, keys.shape[1]).mean(dim=1)
    return (scores + epsilon) * values.norm(dim=-1) if vnorm else scores


CONFIGS = [
    {"n_future_positions": 512, "n_sink": 4, "use_covariance": 1, "use_vnorm": 1, "epsilon": 0.0},  # kvpress's defaults
    {"n_future_positions": 64, "n_sink": 4, "use_covariance": 0, "use_vnorm": 0, "epsilon": 0.0},
    {"n_future_positions": 300, "n_sink": 0, "use_covariance": 1, "use_vnorm": 0, "epsilon": 0.0},
    {"n_future_positions": 32, "n_sink": 2, "use_covariance": 0, "use_vnorm": 1, "epsilon": 0.01},
]


def reference_kwargs(params: dict) -> dict:
    return {"n_future": params["n_future_positions"], "n_sink": params["n_sink"], "covariance": params["use_covariance"],
            "vnorm": params["use_vnorm"], "epsilon": params["epsilon"]}


@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: "-".join(f"{k[:5]}{v}" for k, v in p.items()))
def test_expected_attention_keeps_the_reference_positions(sharp_model, params):
    model = sharp_model
    length, budget = 140, 36
    ids = prompt(model, length, seed=2)
    technique = build_technique("expected_attention", {"max_capacity_prompt": budget, **params})
    cache, inputs = compress(model, technique, ids)
    sinks = params["n_sink"]
    for layer_idx, layer in enumerate(cache.layers):
        scores = expected_attention_reference(model, layer_idx, inputs[layer_idx], **reference_kwargs(params))
        assert [set(row.tolist()) for row in layer.positions[0, :, :budget]] == top_sets(scores, budget - sinks, range(sinks))
        # The scores themselves (not only their order), from the technique's scorer on the same input.
        attn = model.model.layers[layer_idx].self_attn
        embeddings = model.model.rotary_emb(inputs[layer_idx], torch.arange(length)[None])
        keys = layer_kv(model, layer_idx, inputs[layer_idx])[0].float()[None]
        with torch.no_grad():
            got, protected = technique.prefill_scores(attn, inputs[layer_idx], embeddings, keys, budget)
        assert protected.tolist() == [i < sinks for i in range(length)]
        torch.testing.assert_close(got[0, :, sinks:].double(), scores, atol=1e-6, rtol=1e-4)


def test_expected_attention_every_term_changes_what_is_kept(sharp_model):
    """The reference test has teeth: on this model, dropping the future rotation, the covariance term
    or the value norm, or rotating to the next position only, changes the kept sets, and ranking by
    key norm (knorm) keeps others."""
    model = sharp_model
    length, budget = 140, 36
    ids = prompt(model, length, seed=2)
    _, inputs = compress(model, build_technique("knorm", {"max_capacity_prompt": 1.0}), ids)
    full = reference_kwargs(CONFIGS[0])

    def kept(**change):
        return [top_sets(expected_attention_reference(model, i, inputs[i], **{**full, **change}), budget - 4)
                for i in inputs]

    default = kept()
    assert kept(rotate=False) != default
    assert kept(covariance=0) != default
    assert kept(vnorm=0) != default
    assert kept(n_future=1) != default
    by_norm = [top_sets(-layer_kv(model, i, inputs[i])[0][:, 4:].norm(dim=-1), budget - 4) for i in inputs]
    assert by_norm != default


def test_expected_attention_a_prompt_of_sinks_keeps_sinks(tiny_model):
    """No key after the sinks (kvpress asserts there): the budget is filled from the sinks."""
    model, _ = tiny_model
    technique = build_technique("expected_attention", {"max_capacity_prompt": 3, "n_sink": 8})
    cache, _ = compress(model, technique, prompt(model, 6, seed=8))
    assert all(layer.positions.shape[-1] == 3 and layer.positions.max() < 6 for layer in cache.layers)


def test_expected_attention_refuses_a_rope_it_would_rotate_wrongly():
    """Phi's partial rotary (half the head rotated) is not the Llama RoPE the future rotation assumes."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       max_position_embeddings=256, partial_rotary_factor=0.5)
    torch.manual_seed(0)
    model = PhiForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="expected_attention: PhiConfig's rotary embedding"):
        build_technique("expected_attention", {"max_capacity_prompt": 10}).generate(model, ids, 2)
    assert len(build_technique("knorm", {"max_capacity_prompt": 10}).generate(model, ids, 2).tokens) == 2


# --- Both ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [1.0, 512.0])
def test_a_budget_covering_the_prompt_equals_dense(tiny_model, name, budget):
    model, _ = tiny_model
    ids = prompt(model, 70, seed=3)
    technique = build_technique(name, {"max_capacity_prompt": budget})
    dense = build_technique("dense", {})
    assert technique.generate(model, ids, 10).tokens == dense.generate(model, ids, 10).tokens
    question = ids[:, 60:]
    split = technique.generate(model, ids[:, :60], 10, question_ids=question)
    assert split.tokens == dense.generate(model, ids[:, :60], 10, question_ids=question).tokens
    assert split.kv_bytes == dense.generate(model, ids, 10).kv_bytes


@pytest.mark.parametrize("name", NAMES)
def test_kv_bytes_shrink_with_the_budget(tiny_model, name):
    """Every layer stores exactly budget + decoded entries: bytes fall by one entry's size per token."""
    model, _ = tiny_model
    ids = prompt(model, 160, seed=4)
    config = model.config
    entry = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    dense = build_technique("dense", {}).generate(model, ids, 6)
    runs = {b: build_technique(name, {"max_capacity_prompt": b}).generate(model, ids, 6) for b in (120, 80, 40)}
    assert dense.kv_bytes - runs[120].kv_bytes == 40 * entry
    assert runs[120].kv_bytes - runs[80].kv_bytes == runs[80].kv_bytes - runs[40].kv_bytes == 40 * entry
    assert runs[40].kv_bytes < dense.kv_bytes / 3


@pytest.mark.parametrize("name", NAMES)
def test_context_only_the_question_does_not_change_what_is_kept(tiny_model, name):
    """The same context compressed before two different questions keeps the same entries; the same
    two questions inside the compressed prompt (query-aware) would change them for expected_attention."""
    model, _ = tiny_model
    context, budget = prompt(model, 120, seed=5), 30
    first, second = prompt(model, 24, seed=6), prompt(model, 24, seed=7)
    technique = build_technique(name, {"max_capacity_prompt": budget})
    a, _ = compress(model, technique, context, question=first)
    b, _ = compress(model, technique, context, question=second)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.positions[..., :budget], lb.positions[..., :budget])
        assert torch.equal(la.keys[..., :budget, :], lb.keys[..., :budget, :])
        assert la.positions[0, 0, budget:].tolist() == list(range(120, 144))  # the question, appended in full
    aware = [compress(model, technique, torch.cat([context, q], dim=1))[0] for q in (first, second)]
    kept = [[set(p for p in row.tolist() if p < 120) for row in layer.positions[0]] for c in aware for layer in c.layers]
    if name == "expected_attention":  # its statistics include whatever prompt it compresses
        assert kept[: len(a.layers)] != kept[len(a.layers) :]


def test_a_sweep_over_both_is_accepted_context_only_and_batched(tmp_path):
    """Declared like SnapKV: a sweep may range over the budget and every scorer parameter, in the
    context-only placement and with batches."""
    import yaml

    from paretoray.orchestrator.spec import load_spec, search_space

    spec = {
        "name": "scorers", "model": "smollm2-135m", "trials": 4,
        "workload": {"task": "passkey", "context_lengths": [256], "query_placement": "context_only", "batch_size": 2},
        "techniques": {
            "knorm": {"max_capacity_prompt": {"low": 32, "high": 256, "log": True}},
            "expected_attention": {"max_capacity_prompt": [64, 128], "n_future_positions": {"low": 16, "high": 1024, "log": True},
                                   "n_sink": [0, 4], "use_covariance": [0, 1], "use_vnorm": [0, 1], "epsilon": [0.0, 0.01]},
        },
        "objectives": {"accuracy": "maximize", "kv_cache_mb": "minimize"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert search_space(load_spec(path))
