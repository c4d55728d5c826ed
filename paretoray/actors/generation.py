"""Greedy generation split into its two phases, timed the honest way.

`prefill` runs the whole prompt once; `decode_one_token` feeds one token. Each phase is timed
with the device synchronized on both sides (CUDA kernels are asynchronous: without the sync a
timer measures only the launch).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, into: list[float]) -> Iterator[None]:
    """Append the wall time of the block to `into`, the device synchronized on both sides: the one
    phase timer of every decoding loop (prefill, a decode step, a speculative round)."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    into.append(time.perf_counter() - start)


@functools.cache
def _cache_keyword(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_cache(model: torch.nn.Module, cache: Cache | None) -> dict[str, Any]:
    """The keyword a model's forward takes its KV cache by: `cache` from transformers 5.23 on
    (where `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    return {_cache_keyword(type(model)): cache}


@contextmanager
def attention_installed(model: PreTrainedModel, name: str) -> Iterator[None]:
    """`model` attends through the attention function registered as `name` (transformers'
    `AttentionInterface`) until exit; its own is restored whatever happens."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def cache_nbytes(cache: Cache) -> int:
    """KV bytes physically held by a cache (what compression saves), not positions masked out.
    A cache that counts its own (static_decode's slot buffers) is asked, and so is a layer that does."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "nbytes"):  # a layer that stores more than `keys`/`values` (kv_quant's packed codes)
            total += layer.nbytes()
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class Generation:
    tokens: list[int]  # generated token ids (the forced ones in teacher-forced mode)
    prefill_s: float  # time to first token: the prompt forward plus the first argmax
    step_s: list[float] = field(default_factory=list)  # one entry per measured decode step after the first token
    kv_bytes: int = 0  # KV bytes held when generation ended
    agreement: float | None = None  # teacher-forced: fraction of steps whose argmax equals the forced token
    stats: dict[str, int] = field(default_factory=dict)  # technique counters (speculative: drafted, accepted, calls)
    compiled: bool = False  # the decode steps ran through the compiled static-shape step
    warmup_s: float = 0.0  # decode steps left out of `step_s`: compiling a new graph, recording CUDA graphs

    @property
    def tokens_per_s(self) -> float | None:
        """Decode throughput: the measured steps' tokens over their time (a batch of one's total)."""
        seconds = sum(self.step_s)
        return len(self.step_s) / seconds if seconds > 0 else None


Step = Callable[[torch.Tensor], torch.Tensor]  # [B, 1] token ids in -> [B, 1] the next (greedy) tokens


def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,  # [1, prompt_len]
    cache: Cache,
    question_ids: torch.Tensor | None = None,  # [1, question_len]
    question_by_token: bool = False,
) -> tuple[int, float]:
    """The prompt (or the context, then the question) through the model: the first token and the
    time to it. Compression hooks of a technique run here, eagerly. `question_by_token`: the
    question is fed one token per forward, as decoded tokens are (`Technique.question_by_token`)."""
    prefill_s: list[float] = []
    with timed(input_ids.device, prefill_s):
        logits = model(input_ids=input_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits
        if question_ids is not None:
            chunks = question_ids.split(1, dim=-1) if question_by_token else (question_ids,)
            for chunk in chunks:
                logits = model(input_ids=chunk, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits
        first = int(logits[0, -1].argmax())
    return first, prefill_s[0]


def eager_step(model: PreTrainedModel, cache: Cache) -> Step:
    """One token through the model with a dynamic cache, as transformers runs it."""

    def step(token: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=token, **with_cache(model, cache), use_cache=True).logits
        return logits[:, -1].argmax(dim=-1, keepdim=True)

    return step


def decode(
    step: Step,
    first_token: int,
    steps: int,
    device: torch.device,
    eos_token_ids: set[int] | None = None,
    forced_tokens: list[int] | None = None,
    unmeasured: Callable[[int], bool] | None = None,
) -> tuple[list[int], list[float], float, int]:
    """The greedy decode loop: (tokens, measured step times, warm-up seconds, agreeing steps).

    `unmeasured(i)`, called after step i, says the step paid for compilation or graph recording:
    its time goes to the warm-up seconds, not to the measured steps.
    """
    eos = eos_token_ids or set()
    tokens: list[int] = []
    step_s: list[float] = []
    warmup_s, agree = 0.0, 0
    next_token = first_token
    for i in range(steps):
        if forced_tokens is not None:
            agree += int(next_token == forced_tokens[i])
            next_token = forced_tokens[i]
        tokens.append(next_token)
        if i == steps - 1 or (forced_tokens is None and next_token in eos):
            break
        took: list[float] = []
        with timed(device, took):
            next_token = int(step(torch.tensor([[next_token]], device=device)))
        if unmeasured is not None and unmeasured(i):
            warmup_s += took[0]
        else:
            step_s += took
    return tokens, step_s, warmup_s, agree


@dataclass
class BatchGeneration:
    """B sequences decoded together (`Technique.generate_batch`): each prefilled alone, one after
    another, then every decode step feeds all B (one token each). A sequence that reached EOS or
    its budget stops counting tokens; the batch steps until every sequence is done."""

    tokens: list[list[int]]  # per sequence: its generated token ids
    prefill_s: list[float]  # per sequence: its prompt forward plus first argmax (run one after another)
    step_s: list[float] = field(default_factory=list)  # measured batch steps (each gives one token to every active sequence)
    active: list[int] = field(default_factory=list)  # per measured step: sequences whose token counted
    kv_bytes: int = 0  # the batch's slot buffers (every row padded to the largest capacity)
    kv_bytes_alone: list[int] = field(default_factory=list)  # per sequence: its cache's bytes before stacking
    stats: list[dict[str, float]] = field(default_factory=list)  # per sequence: technique counters
    compiled: bool = False  # the steps ran the compiled static-shape step (else the same step, eagerly)
    warmup_s: float = 0.0  # steps left out of `step_s`: compiling a new graph, recording CUDA graphs
    # Per sequence, where its steps differ from the batch's (speculation: a round's time shared by
    # the tokens it gave that sequence): what its latency is read from. None: the batch's steps.
    row_step_s: list[list[float]] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float | None:
        """Total throughput: tokens the measured steps gave to active sequences over their time."""
        seconds = sum(self.step_s)
        return sum(self.active) / seconds if seconds > 0 else None


def decode_batch(
    step: Step,
    first_tokens: list[int],
    steps: list[int],
    device: torch.device,
    eos_token_ids: set[int] | None = None,
    unmeasured: Callable[[int], bool] | None = None,
) -> tuple[list[list[int]], list[float], list[int], float]:
    """`decode` for B sequences in one step: (tokens per sequence, measured step times, active
    sequences per measured step, warm-up seconds). `steps`: each sequence's budget. One host read
    per step (the B next tokens)."""
    eos = eos_token_ids or set()
    tokens: list[list[int]] = [[] for _ in first_tokens]
    done = [False] * len(first_tokens)
    step_s: list[float] = []
    active: list[int] = []
    warmup_s = 0.0
    current = list(first_tokens)
    for i in range(max(steps)):
        for row, token in enumerate(current):
            if not done[row]:
                tokens[row].append(token)
                done[row] = token in eos or len(tokens[row]) == steps[row]
        if all(done):
            break
        took: list[float] = []
        with timed(device, took):
            current = step(torch.tensor(current, device=device).view(-1, 1)).view(-1).tolist()
        if unmeasured is not None and unmeasured(i):
            warmup_s += took[0]
        else:
            step_s += took
            active.append(sum(not d for d in done))
    return tokens, step_s, active, warmup_s


def greedy_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,  # [1, prompt_len]
    cache: Cache,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    forced_tokens: list[int] | None = None,
    question_ids: torch.Tensor | None = None,  # [1, question_len]
) -> Generation:
    """Greedy decoding with an explicit cache, eagerly.

    With `question_ids`, `input_ids` is the context alone: it is prefilled first (a compressing
    cache compresses it without seeing the question, as a cached document is served), then the
    question is fed as a second chunk. Both count in the time to first token.

    With `forced_tokens`, the loop feeds those tokens instead of its own argmax (teacher forcing)
    and reports how often its argmax agreed with them: the fidelity of a technique to the
    reference continuation, measured on identical prefixes.
    """
    first, prefill_s = prefill(model, input_ids, cache, question_ids)
    steps = len(forced_tokens) if forced_tokens is not None else max_new_tokens
    tokens, step_s, _, agree = decode(eager_step(model, cache), first, steps, input_ids.device, eos_token_ids, forced_tokens)
    return Generation(
        tokens=tokens,
        prefill_s=prefill_s,
        step_s=step_s,
        kv_bytes=cache_nbytes(cache),
        agreement=(agree / steps) if forced_tokens is not None and steps else None,
    )
