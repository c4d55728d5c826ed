"""KVzip: keep the KV entries the model needs to repeat its context, whatever the question.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", 2025
(arXiv:2505.23416; reference code snu-mllab/KVzip `model/wrapper.py`, `attention/score.py`, and
kvpress's `KVzipPress`).

Scoring. Once the context (L tokens) is prefilled, the model is teacher-forced to reconstruct it,
`chunk_size` context tokens a forward. Chunk i (context positions [s, e)) is fed as

    "\\n\\nRepeat the previous context exactly."                                   (i = 0)
    "\\n\\nRepeat the part of the previous context exactly, starting with " + the
    previous chunk's last 8 tokens                                                   (i > 0)
    then the assistant-turn suffix, then the chunk itself,

after the whole uncompressed context (its positions continue from L), and its own entries are
dropped afterwards. In every layer, each of its queries (prompt, suffix and chunk alike) takes a
softmax over exactly the sinks, the chunk's context keys [s, e) and the input's own keys (causal),
as the reference does; a context key's score is the largest weight it receives, over those queries
and the query heads of its KV group. The first `n_sink` context tokens stand for the reference's
system prompt: never reconstructed, in every softmax, always kept.

Selection (`head_budget`), with B = `max_capacity_prompt` entries per layer and KV head on average,
the sinks included: `global` keeps the B x layers x KV heads best scores over all layers and heads
at once (the reference's default pair-level ratio; kvpress `layerwise=False`), so layers and heads
keep different numbers; `layerwise` keeps B x KV heads per layer, shared by its heads as the scores
say (kvpress `layerwise=True`); `uniform` keeps each head's B best (the reference's "uniform" head
budget). Kept keys keep their original positions. Heads keep different numbers of entries, stored at
their own lengths (AdaKV's packed `RaggedLayer`, no padding: the KV bytes are the sum of the heads'
lengths, as the reference's flattened varlen layout), and attended head by head.

Cost. The reconstruction forwards run inside the prefill (the first forward's hook runs them), so
the time to first token includes them: about one more prefill over the context plus the scores.
Each generation reports `reconstruction_tokens` (tokens fed to reconstruct) and
`reconstruction_s` (seconds of those forwards with their scoring, and of the selection; device
synchronized; a part of the prefill's time).

Where this departs from the reference:
- exactly the budget is kept (top-k, as kvpress), where the original thresholds with a strict `>`
  and may keep fewer on ties; scores are computed in fp32 (the original softmaxes in the model's
  dtype), the queries of a chunk `QUERY_CHUNK` at a time (exact: softmax rows are independent);
- prompts here are raw text, not chat turns: the suffix is the chat template's assistant opening
  as kvpress derives it, "\\n" for a tokenizer without a template (the original writes one per
  model family); the tokenizer is read from `model.config.name_or_path`, as kvpress does;
- a context no longer than its budget is not reconstructed (nothing would be evicted);
- KVzip+'s normalisation (kvpress `kvzip_plus_normalization`) is not offered;
- it is offered to no composition (`provides` is empty): the packed per-head layers are its own.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.cache_utils import Cache

from paretoray.actors.generation import timed, with_cache
from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.adakv import RaggedLayer, ragged_attention_installed
from paretoray.actors.techniques.kv_compression import CAPACITY, PromptCompression, budget_tokens, project_queries

REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with "
PREVIOUS_TAIL = 8  # tokens of the previous chunk quoted in the next chunk's prompt (reference: 8)
# Reconstruction queries scored at once: bounds the [queries x keys] weights. On a CPU a block that
# stays in cache is faster (128: 37% less scoring time than 512 for a 2K context, 1 core).
QUERY_CHUNK = {"cpu": 128}
QUERY_CHUNK_DEFAULT = 1024

_RECORDS: ContextVar[list[dict[str, float]] | None] = ContextVar("kvzip_records", default=None)


class KVzipLayer(RaggedLayer):
    """AdaKV's packed per-head cache (each KV head at its own length), plus dropping the
    reconstruction's entries before packing."""

    def truncate(self, length: int) -> None:
        """Forget every entry after the first `length` (the reconstruction's own)."""
        self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]
        self.seen = length


def assistant_suffix(tokenizer) -> str:
    """What a chat template writes between a user turn's text and the assistant's answer (kvpress's
    derivation); "\\n" without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    marker = "\n" + "#" * 13
    text = tokenizer.apply_chat_template([{"role": "user", "content": "dummy context" + marker}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    return text.split(marker)[1]


@functools.cache
def repeat_prompts(name_or_path: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Token ids of the first chunk's prompt, the following chunks' prompt, and the suffix."""
    if not name_or_path:
        raise ValueError("kvzip writes its repeat prompt with the model's tokenizer: model.config.name_or_path is empty")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    return encode(REPEAT_FIRST), encode(REPEAT_NEXT), encode(assistant_suffix(tokenizer))


def reconstruction_inputs(context: torch.Tensor, n_sink: int, chunk_size: int, prompts) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, ids [B, T]) per chunk of context[n_sink:]: prompt + suffix + the chunk."""
    first, following, suffix = (torch.tensor(p, dtype=context.dtype, device=context.device) for p in prompts)
    batch, length = context.shape
    inputs = []
    for start in range(n_sink, length, chunk_size):
        end = min(start + chunk_size, length)
        if start == n_sink:
            head = first.expand(batch, -1)
        else:
            head = torch.cat([following.expand(batch, -1), context[:, max(start - PREVIOUS_TAIL, start - chunk_size):start]], dim=1)
        inputs.append((start, end, torch.cat([head, suffix.expand(batch, -1), context[:, start:end]], dim=1)))
    return inputs


def chunk_scores(module, hidden_states, position_embeddings, keys: torch.Tensor, n_sink: int, start: int, end: int) -> torch.Tensor:
    """Max attention each context key in [start, end) receives from the reconstruction's queries.

    The softmax runs over the sinks, the chunk's keys and the reconstruction's own (causal), the
    reference's key set. hidden_states: [B, T, hidden] (the T reconstruction tokens); keys:
    [B, Hkv, L + T, D] (the context, then the reconstruction) -> [B, Hkv, end - start].
    """
    total, span = hidden_states.shape[1], end - start
    subset = torch.cat([keys[:, :, :n_sink], keys[:, :, start:end], keys[:, :, -total:]], dim=2).float()  # [B, Hkv, S, D]
    batch, kv_heads, size, _ = subset.shape
    best = None
    step = QUERY_CHUNK.get(subset.device.type, QUERY_CHUNK_DEFAULT)
    for lo in range(0, total, step):
        hi = min(lo + step, total)
        query = project_queries(module, hidden_states, position_embeddings, lo, hi).float() * module.scaling  # [B, Hq, w, D]
        query = query.reshape(batch, kv_heads, -1, hi - lo, query.shape[-1])  # [B, Hkv, groups, w, D]
        logits = torch.einsum("bhgwd,bhld->bhgwl", query, subset[:, :, : size - (total - hi)])  # these queries see their past only
        own = logits[..., n_sink + span :]  # [.., w, lo + i + 1 visible]: causal among the reconstruction's own keys
        own.masked_fill_(torch.ones(hi - lo, own.shape[-1], dtype=torch.bool, device=own.device).triu(lo + 1), float("-inf"))
        block = logits.softmax(dim=-1)[..., n_sink : n_sink + span].amax(dim=(2, 3))  # over the group and the queries
        best = block if best is None else torch.maximum(best, block)
    return best


def kept_masks(scores: list[torch.Tensor], budget: int, head_budget: str) -> list[torch.Tensor]:
    """The entries each layer keeps, [B, Hkv, L] bool per layer, from its scores [B, Hkv, L]:
    the best `budget` per head (`uniform`), budget x heads per layer (`layerwise`), or
    budget x heads x layers over the whole model (`global`)."""
    stacked = torch.stack(scores, dim=1)  # [B, layers, Hkv, L]
    batch, layers, heads, length = stacked.shape
    per_row = {"uniform": (batch * layers * heads, budget), "layerwise": (batch * layers, budget * heads),
               "global": (batch, budget * heads * layers)}
    rows, k = per_row[head_budget]
    flat = stacked.reshape(rows, -1)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept.scatter_(1, flat.topk(min(k, flat.shape[1]), dim=1).indices, True)
    return list(kept.view(batch, layers, heads, length).unbind(1))


@register
@dataclass(frozen=True)
class KVzip(PromptCompression):
    max_capacity_prompt: float = CAPACITY.field()
    head_budget: str = param("categorical", "global", choices=("global", "layerwise", "uniform"),
                             doc="who shares the budget: all layers and heads (KVzip), each layer's heads (kvpress "
                                 "layerwise), or each head alone (KVzip's uniform)")
    chunk_size: int = param("int", 2000, low=16, high=65536, doc="context tokens reconstructed per forward (reference: 2000)")
    n_sink: int = param("int", 4, low=0, high=1024, doc="first context tokens always kept, never reconstructed (kvpress: 4)")

    name = "kvzip"
    provides = ()  # its packed per-head layers are its own: no outer technique (kv_quant) reads them
    reports = ("target_calls", "reconstruction_tokens", "reconstruction_s")  # see generate
    examples = {"covers": {}, "compresses": {"max_capacity_prompt": 0.25, "chunk_size": 64},
                "layerwise": {"max_capacity_prompt": 0.25, "chunk_size": 64, "head_budget": "layerwise"}}

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_len: int) -> int:
        return budget_tokens(self.max_capacity_prompt, prompt_len)

    def new_cache(self, model: PreTrainedModel) -> Cache:
        return Cache(layers=[KVzipLayer() for _ in range(model.config.num_hidden_layers)])

    def generate(self, model, input_ids, max_new_tokens, eos_token_ids=None, forced_tokens=None, question_ids=None,
                 compiled=False):
        records: list[dict[str, float]] = []
        token = _RECORDS.set(records)
        try:
            run = super().generate(model, input_ids, max_new_tokens, eos_token_ids, forced_tokens, question_ids, compiled)
        finally:
            _RECORDS.reset(token)
        run.stats = {"target_calls": len(run.step_s), **run.stats, **records[0]}
        return run

    def generate_batch(self, model, prompts, max_new_tokens, eos_token_ids=None, question_ids=None, compiled=False):
        records: list[dict[str, float]] = []  # one per sequence, in order: each is prefilled alone
        token = _RECORDS.set(records)
        try:
            run = super().generate_batch(model, prompts, max_new_tokens, eos_token_ids, question_ids, compiled)
        finally:
            _RECORDS.reset(token)
        run.stats = [{"target_calls": len(tokens) - 1, **record} for tokens, record in zip(run.tokens, records)]
        return run

    def compress(self, model: PreTrainedModel, cache: Cache, context: torch.Tensor, scoring: dict) -> dict[str, float]:
        """Reconstruct `context` [B, L] chunk by chunk over the full cache, then keep the best
        entries. `scoring` is what the attention hooks read: the chunk, and the scores they fill."""
        batch, length = context.shape
        budget = self.layer_budget(0, len(cache.layers), length)
        if budget >= length:  # nothing to evict: every head keeps the whole context
            for layer in cache.layers:
                layer.pack_whole()
            return {"reconstruction_tokens": 0, "reconstruction_s": 0.0}
        sinks = min(self.n_sink, length)
        heads = cache.layers[0].keys.shape[1]
        scores = [torch.zeros(batch, heads, length, device=context.device) for _ in cache.layers]
        for layer_scores in scores:
            layer_scores[..., :sinks] = float("inf")  # always kept
        scoring.update(scores=scores, sinks=sinks)
        fed, took = 0, []
        with timed(context.device, took):
            for start, end, ids in reconstruction_inputs(context, sinks, self.chunk_size, repeat_prompts(model.config.name_or_path)):
                scoring["chunk"] = (start, end)
                model.model(input_ids=ids, **with_cache(model.model, cache), use_cache=True)
                for layer in cache.layers:
                    layer.truncate(length)
                fed += ids.shape[1]
            scoring["chunk"] = None
            for layer, kept in zip(cache.layers, kept_masks(scores, budget, self.head_budget)):
                layer.pack(kept)
        return {"reconstruction_tokens": fed, "reconstruction_s": took[0]}

    @contextmanager
    def applied(self, model: PreTrainedModel) -> Iterator[Cache]:
        cache = self.new_cache(model)
        repeat_prompts(model.config.name_or_path)  # the tokenizer is read once per process, not in a prefill
        scoring: dict = {"chunk": None}

        def score(module, args, kwargs, output):  # on every attention module, during a reconstruction
            if scoring["chunk"] is None:
                return
            start, end = scoring["chunk"]
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            layer = cache.layers[module.layer_idx]
            scoring["scores"][module.layer_idx][..., start:end] = chunk_scores(
                module, hidden_states, kwargs.get("position_embeddings"), layer.keys, scoring["sinks"], start, end)

        def after_prefill(module, args, kwargs, output):  # on the model: its first forward is the context
            if cache.layers[0].packed:  # every later forward (question, decoding) only appends
                return
            context = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            record = self.compress(model, cache, context, scoring)
            if (records := _RECORDS.get()) is not None:
                records.append(record)

        handles = [layer.self_attn.register_forward_hook(score, with_kwargs=True) for layer in model.model.layers]
        handles.append(model.register_forward_hook(after_prefill, with_kwargs=True))
        try:
            with ragged_attention_installed(model, cache):
                yield cache
        finally:
            for handle in handles:
                handle.remove()
