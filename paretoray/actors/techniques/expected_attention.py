"""Expected Attention: keep the keys that future queries are expected to attend to.

Devoto, Jeblick and Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution" (arXiv:2510.00636; reference code NVIDIA/kvpress,
`kvpress/presses/expected_attention_press.py`, `ExpectedAttentionPress`).

Rule, per layer at the end of the prefill (L prompt tokens, s = n_sink, d = head_dim, n =
n_future_positions), as kvpress computes it:
1. Query statistics: the queries before RoPE of prompt tokens s .. L-1 (`q_proj` of the layer
   input, then `q_norm` where the model has one), per query head: mean mu [d] and covariance
   Sigma = mean over those tokens of (q - mu)(q - mu)^T [d, d] (divided by L - s). All the prompt
   after the sinks is used, not a recent window.
2. Future positions: the RoPE rotation averaged over positions L .. L+n-1,
   Rbar = mean_p (cos_p I + sin_p P), where P x = rotate_half(x) (cos and sin as the model's rotary
   embedding gives them, attention factor included); mu <- Rbar mu, Sigma <- Rbar Sigma Rbar^T.
3. Each cached key k after the sinks (RoPE applied, as stored) gets the log of its expected
   attention, z = mu.k / sqrt(d) + k^T Sigma k / (2 d) (the Gaussian moment generating function;
   the second term only with `use_covariance`), softmax over those keys, per query head.
4. GQA: the softmax scores are averaged over each KV head's query-head group, and positions are
   selected per KV head (kvpress's rule, which is also the shared mechanism's group-mean rule).
5. `use_vnorm`: score = (score + epsilon) * ||v||_2 (the value of the same position, per KV head).
6. The first n_sink positions are always kept (kvpress pads them with the maximum score + 1); the
   rest of the budget goes to the highest scores. No recent window is protected (kvpress's
   `ScorerPress` keeps the top scores only).
Defaults are kvpress's: n_future_positions 512, n_sink 4, use_covariance and use_vnorm on,
epsilon 0. The rule never reads the question: the statistics come from the tokens being compressed,
so in a context-only placement the context alone decides (as kvpress compresses a context before
its questions). Decoding appends to the compressed cache and evicts nothing.

Departures from kvpress:
- Budget: `max_capacity_prompt` entries per layer (sinks included; a fraction of the prompt if
  <= 1) instead of `compression_ratio` (kvpress keeps int(L * (1 - ratio))).
- Booleans are declared as 0/1 integers (`use_covariance`, `use_vnorm`), so labels round-trip.
- Statistics and scores are computed in float32 (kvpress: the model's dtype).
- The shared mechanism hands a scorer the cached keys only, so the values for `use_vnorm` are
  recomputed from the layer input with `v_proj` (at the prefill exactly what the layer stored).
- kvpress reads the model's rotary embedding for the future positions; the hook sees only the
  attention module, so a Llama rotary embedding is built from the module's config, checked
  against the cos/sin the model handed the layer for the prompt's positions (a model whose RoPE
  differs is refused with a ValueError rather than scored with the wrong rotation).
- A prompt of at most n_sink tokens has no key to score: its sinks are kept (kvpress asserts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.kv_compression import CAPACITY, PromptCompression, budget_tokens


def prerope_queries(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The module's queries before RoPE, in float32. hidden_states [B, T, hidden] -> [B, Hq, T, D]."""
    query = module.q_proj(hidden_states).view(*hidden_states.shape[:-1], -1, module.head_dim)
    if hasattr(module, "q_norm"):  # Qwen3-style query norm, applied before RoPE
        query = module.q_norm(query)
    return query.transpose(1, 2).float()


def prompt_values(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The values the layer stored at the prefill. hidden_states [B, L, hidden] -> [B, Hkv, L, D]."""
    value = module.v_proj(hidden_states).view(*hidden_states.shape[:-1], -1, module.head_dim)
    return value.transpose(1, 2)


def query_statistics(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [B, Hq, D] and covariance [B, Hq, D, D] (divided by T) of queries [B, Hq, T, D]."""
    mean = queries.mean(dim=2)
    centered = queries - mean.unsqueeze(2)
    return mean, centered.transpose(-1, -2) @ centered / queries.shape[2]


def future_rotation(module, position_embeddings, length: int, count: int) -> torch.Tensor:
    """Rbar^T [D, D]: the RoPE rotation averaged over positions length .. length + count - 1, transposed
    (so that row vectors rotate as `x @ Rbar^T`).

    Built from the module's config, and refused unless it reproduces the cos/sin the model gave the
    layer at the prompt's last position."""
    name = type(module.config).__name__
    try:
        rotary = LlamaRotaryEmbedding(module.config)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"expected_attention: {name}.rope_parameters do not describe one Llama RoPE ({error!r})") from None
    positions = torch.arange(length - 1, length + count)[None]
    cos, sin = (x[0] for x in rotary(torch.zeros(1), positions))  # [1 + count, D], float32
    given_cos, given_sin = (x[0, -1] for x in position_embeddings)  # the prompt's last position, as the layer got it
    tol = max(1e-5, torch.finfo(given_cos.dtype).eps)
    same_shape = cos.shape[-1] == given_cos.shape[-1] == module.head_dim
    if not same_shape or not (torch.allclose(cos[0], given_cos.float().cpu(), atol=tol)
                              and torch.allclose(sin[0], given_sin.float().cpu(), atol=tol)):
        raise ValueError(f"expected_attention: {name}'s rotary embedding is not the full-head Llama RoPE its config "
                         "describes; the rotation of the future positions would be wrong")
    # R_p^T has rows RoPE_p(e_i) = e_i * cos_p + rotate_half(e_i) * sin_p, linear in (cos_p, sin_p):
    # averaging the rotations is rotating with the averaged cos and sin.
    identity = torch.eye(module.head_dim)
    return identity * cos[1:].mean(dim=0) + rotate_half(identity) * sin[1:].mean(dim=0)


@register
@dataclass(frozen=True)
class ExpectedAttention(PromptCompression):
    max_capacity_prompt: float = CAPACITY.field()
    n_future_positions: int = param("int", 512, low=1, high=131072, log=True,
                                    doc="future positions whose RoPE rotation is averaged (kvpress: 512)")
    n_sink: int = param("int", 4, low=0, high=1024,
                        doc="first tokens always kept and left out of the query statistics (kvpress: 4)")
    use_covariance: int = param("int", 1, low=0, high=1,
                                doc="1: add the query covariance term k^T Sigma k / 2d to the expected logit (kvpress: on)")
    use_vnorm: int = param("int", 1, low=0, high=1,
                           doc="1: multiply each score (plus epsilon) by its value's L2 norm (kvpress: on)")
    epsilon: float = param("float", 0.0, low=0.0, high=1.0,
                           doc="added to the expected attention before the value-norm rescaling (kvpress: 0)")

    name = "expected_attention"
    examples = {"covers": {}, "compresses": {"max_capacity_prompt": 0.25},
                "mean_only": {"max_capacity_prompt": 0.25, "use_covariance": 0, "use_vnorm": 0, "n_future_positions": 64}}

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        return budget_tokens(self.max_capacity_prompt, prompt_len)

    def prefill_scores(self, module, hidden_states, position_embeddings, keys, budget):
        batch, kv_heads, length, _ = keys.shape
        sinks = min(self.n_sink, length)
        protected = torch.arange(length, device=keys.device) < sinks
        scores = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)
        if sinks < length:
            scores[..., sinks:] = self.expected_attention(module, hidden_states, position_embeddings, keys, sinks)
        return scores, protected

    def expected_attention(self, module, hidden_states, position_embeddings, keys, sinks: int) -> torch.Tensor:
        """Scores [B, Hkv, L - sinks] of the keys after the sinks (steps 1-5 of the module docstring)."""
        batch, kv_heads, length, dim = keys.shape
        mean, cov = query_statistics(prerope_queries(module, hidden_states[:, sinks:]))  # [B, Hq, D], [B, Hq, D, D]
        rotation_t = future_rotation(module, position_embeddings, length, self.n_future_positions).to(keys.device)
        groups = mean.shape[1] // kv_heads
        mean = (mean @ rotation_t).view(batch, kv_heads, groups, dim)  # Rbar mu
        k = keys[..., sinks:, :].float()  # [B, Hkv, N, D]
        logits = torch.einsum("bhgd,bhnd->bhgn", mean, k) / math.sqrt(dim)
        if self.use_covariance:
            cov = (rotation_t.mT @ cov @ rotation_t).view(batch, kv_heads, groups, dim, dim)  # Rbar Sigma Rbar^T
            logits = logits + torch.einsum("bhnd,bhgde,bhne->bhgn", k, cov, k) / (2 * dim)
        scores = logits.softmax(dim=-1).mean(dim=2)  # [B, Hkv, N]: GQA group mean
        if self.use_vnorm:
            values = prompt_values(module, hidden_states[:, sinks:]).float()  # [B, Hkv, N, D]
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        return scores
