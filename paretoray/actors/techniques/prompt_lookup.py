"""Prompt lookup decoding: speculative decoding whose draft is an n-gram match in the text so far.

Saxena, "Prompt Lookup Decoding" (2023), github.com/apoorvumang/prompt-lookup-decoding; the same
method is transformers' `prompt_lookup_num_tokens` (PromptLookupCandidateGenerator) and vLLM's
n-gram speculator. No draft model: each round the last n tokens of prompt + generated text are
looked up earlier in that text (n from `ngram_size` down to 1, the longest match wins) and the
up to `max_candidates` tokens that followed the match are proposed. The target verifies them in
one forward with the loop of `speculative` (greedy: the longest prefix equal to its argmaxes;
sampling: the standard rule with a deterministic draft, q one-hot on the proposed token, which
accepts d with probability p(d) and on rejection samples from p with d removed, renormalized).
No match: the round is a plain one-token step. Lossless either way.

Where this departs from the references:
- the most recent earlier occurrence of the n-gram is used (vLLM's choice); Saxena's function
  and transformers take the earliest (Saxena's also skips a match with fewer than
  `max_candidates` tokens after it; transformers truncates, as here);
- proposals stop at the first end-of-sequence token (transformers drops it, here it is kept:
  accepted, it ends the generation) and at the token budget: a round never drafts a token
  whose acceptance could not be used (at most `remaining - 1`, the target's own next token
  being free);
- the search runs on the host over a numpy copy of the token ids, every round; its cost is part
  of each measured round's time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from paretoray.actors.generation import BatchGeneration, Generation, cache_nbytes, timed, with_cache
from paretoray.actors.techniques.base import Technique, param, register
from paretoray.actors.techniques.speculative import (
    TEMPERATURE,
    Proposal,
    RowProposals,
    RowProposer,
    Sampler,
    Speculative,
    SpeculativeStats,
    generated,
    roll_back,
    round_steps,
    speculate_batch,
    verify_proposal,
)


def lookup(tokens: np.ndarray, ngram_size: int, max_candidates: int) -> np.ndarray:
    """The tokens that followed the most recent earlier occurrence of the longest suffix n-gram.

    tokens [L] (prompt + committed tokens); tries n = min(ngram_size, L - 1) down to 1 and
    returns up to `max_candidates` tokens [k] following the last window tokens[i:i+n] equal to
    tokens[L-n:] with i < L - n (the suffix itself excluded, so k >= 1); [0] when no n matches.
    """
    length = len(tokens)
    if max_candidates < 1:
        return tokens[:0]
    for n in range(min(ngram_size, length - 1), 0, -1):
        pattern = tokens[length - n:]
        # hits[i]: window i (i = 0 .. L-n-1) equals the pattern, compared one offset at a time.
        hits = tokens[: length - n] == pattern[0]
        for j in range(1, n):
            hits &= tokens[j: length - n + j] == pattern[j]
        found = np.flatnonzero(hits)
        if found.size:
            start = int(found[-1]) + n
            return tokens[start: start + max_candidates]
    return tokens[:0]


def one_hot_proposal(tokens: torch.Tensor, vocab_size: int, sampler: Sampler) -> Proposal:
    """Candidates [k] (device) as a `Proposal`: a deterministic draft, q_i one-hot on d_i (sampling
    only). With it `speculative.verify` accepts d_i with probability p_i(d_i) and resamples a
    rejection from p_i with d_i zeroed, renormalized (max(0, p - q) = p off d_i)."""
    q = None if sampler.greedy else torch.nn.functional.one_hot(tokens, vocab_size).float()  # [k, V]
    return Proposal(tokens, q)


@contextmanager
def static_target(target: PreTrainedModel, cache: DynamicCache, room: int, compiled: bool):
    """The target's cache as a static rollback cache with `room` more tokens, the target on the
    static attention (compiled), or the cache as it is (eager). Yields the cache and which rounds
    go unmeasured (None: all are measured). `speculative.static_models` for one model."""
    if not compiled:
        yield cache, None
        return
    from paretoray.actors import static_decode

    static = static_decode.RollbackCache(target, cache, room)
    with static_decode.static_attention_installed(target):
        yield static, static_decode.warmup_watch(static.position.device)


@register
@dataclass(frozen=True)
class PromptLookup(Technique):
    ngram_size: int = param("int", 3, low=1, high=8, doc="longest suffix n-gram looked up (then shorter ones down to 1)")
    max_candidates: int = param("int", 10, low=1, high=64, doc="tokens proposed per round after a match")
    temperature: float = TEMPERATURE.field()

    name = "prompt_lookup"
    phase = "decode"
    lossless = True  # the verifier keeps exactly the target's own tokens
    rollback = True  # a DynamicCache (eager) or a RollbackCache (compiled), cropped to the accepted prefix
    reports = Speculative.reports  # the same counters as specdec; draft_calls stays 0 (no draft model)
    static_decode = True  # the target verifies over a static rollback cache, a symbolic token count
    examples = {"covers": {}, "bigram_three": {"ngram_size": 2, "max_candidates": 3}, "unigram_one": {"ngram_size": 1, "max_candidates": 1}}
    # A batch: each row looks up its own text, the target verifies every row in one forward
    # (rows padded to the longest proposal), and each row rolls back to its own length.
    batched = True

    def generate_batch(self, model, prompts, max_new_tokens, eos_token_ids=None, question_ids=None, compiled=False,
                       seed: int = 0) -> BatchGeneration:
        """B sequences, each row's tokens what `generate` gives it alone (greedy)."""
        from paretoray.actors import static_decode

        device = prompts[0].device
        eos = eos_token_ids or set()
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        samplers = [Sampler.of(self.temperature, seed, device) for _ in prompts]
        vocab_size = model.get_output_embeddings().weight.shape[0]
        fulls, sequences, prompt_lens, prefill_s, alone = [], [], [], [], []
        with torch.inference_mode():
            for b, prompt in enumerate(prompts):
                input_ids = prompt if question_ids is None or question_ids[b] is None else torch.cat([prompt, question_ids[b]], -1)
                took: list[float] = []
                with timed(device, took):
                    cache = DynamicCache(config=model.config)
                    logits = model(input_ids=input_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits
                    sequences.append(input_ids[0].tolist() + [samplers[b].first(logits[0, -1])])
                fulls.append(cache)
                alone.append(cache_nbytes(cache))
                prompt_lens.append(input_ids.shape[-1])
                prefill_s.append(took[0])
            target = static_decode.RollbackCache.stacked(model, fulls, max(budgets) + self.max_candidates + 1)
            del fulls
            proposer = LookupRows(self, eos, vocab_size, samplers, device)
            with static_decode.static_attention_installed(model):
                tokens, step_s, active, warmup_s, stats, row_steps = speculate_batch(
                    model, target, compiled, proposer, sequences, prompt_lens, budgets, eos, samplers,
                    unmeasured=static_decode.warmup_watch(device) if compiled else None)
        return BatchGeneration(tokens=tokens, prefill_s=prefill_s, step_s=step_s, active=active, kv_bytes=cache_nbytes(target),
                               kv_bytes_alone=alone, stats=[asdict(s) for s in stats], compiled=compiled, warmup_s=warmup_s,
                               row_step_s=row_steps)

    @torch.inference_mode()
    def generate(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: set[int] | None = None,
        forced_tokens: list[int] | None = None,
        question_ids: torch.Tensor | None = None,
        compiled: bool = False,
        seed: int = 0,
    ) -> Generation:
        if forced_tokens is not None:
            raise ValueError(f"{self.name} decodes the target's own continuation; fidelity does not apply")
        if question_ids is not None:  # nothing is compressed: the context then the question is the prompt
            input_ids = torch.cat([input_ids, question_ids], dim=-1)
        return lookup_generate(self, model, input_ids, max_new_tokens, eos_token_ids or set(), seed, compiled=compiled)


def lookup_generate(
    technique: PromptLookup,
    target: PreTrainedModel,
    input_ids: torch.Tensor,  # [1, prompt_len]
    max_new_tokens: int,
    eos_token_ids: set[int],
    seed: int = 0,
    cache: DynamicCache | None = None,  # given by tests that inspect the cache afterwards
    compiled: bool = False,
) -> Generation:
    device = input_ids.device
    sampler = Sampler.of(technique.temperature, seed, device)
    vocab_size = target.get_output_embeddings().weight.shape[0]
    cache = cache if cache is not None else DynamicCache(config=target.config)
    stats = SpeculativeStats()
    prompt_len = input_ids.shape[1]
    # prompt + committed tokens on the host, where the lookup runs: [:length] is filled.
    sequence = np.empty(prompt_len + max_new_tokens + technique.max_candidates + 1, dtype=np.int64)
    sequence[:prompt_len] = input_ids[0].cpu().numpy()
    length = prompt_len

    prefill_s: list[float] = []
    with timed(device, prefill_s):
        logits = target(input_ids=input_ids, **with_cache(target, cache), use_cache=True, logits_to_keep=1).logits
        sequence[length] = sampler.first(logits[0, -1])
        length += 1

    rounds: list[tuple[float, int]] = []  # (seconds, tokens committed) per measured round
    warmup_s = 0.0
    with static_target(target, cache, max_new_tokens + 1, compiled) as (cache, unmeasured):
        while length - prompt_len < max_new_tokens and int(sequence[length - 1]) not in eos_token_ids:
            took: list[float] = []
            with timed(device, took):
                remaining = max_new_tokens - (length - prompt_len)  # the target's next token comes free
                candidates = lookup(sequence[:length], technique.ngram_size, min(technique.max_candidates, remaining - 1))
                ends = [i for i, t in enumerate(candidates.tolist()) if t in eos_token_ids]
                candidates = candidates[: ends[0] + 1] if ends else candidates
                # [last committed token, d_1..d_k] in one host-to-device copy (a copy: the lookup's
                # candidates view the host buffer)
                ids = torch.tensor(np.concatenate([sequence[length - 1: length], candidates]), device=device)
                new = verify_proposal(target, cache, ids[:1], one_hot_proposal(ids[1:], vocab_size, sampler), sampler)
                roll_back(cache, length + len(new) - 1)  # all but the newest token, not fed yet
                sequence[length: length + len(new)] = new
                length += len(new)
            stats.drafted += len(candidates)  # not `add_round`: that counts a draft forward per drafted token
            stats.accepted += len(new) - 1
            stats.target_calls += 1
            if unmeasured is not None and unmeasured(stats.target_calls - 1):
                warmup_s += took[0]  # it compiled a graph (or recorded CUDA graphs): not a measured round
            else:
                rounds.append((took[0], len(new)))

    tokens = generated(sequence[prompt_len:length].tolist(), max_new_tokens, eos_token_ids)
    return Generation(
        tokens=tokens,
        prefill_s=prefill_s[0],
        step_s=round_steps(rounds, len(tokens)),
        kv_bytes=cache_nbytes(cache),
        stats=asdict(stats),
        compiled=unmeasured is not None,
        warmup_s=warmup_s,
    )


class LookupRows(RowProposer):
    """prompt_lookup's proposals for a batch: each row's own n-gram match, padded to the longest."""

    def __init__(self, technique: PromptLookup, eos: set[int], vocab_size: int, samplers: list[Sampler], device):
        self.technique, self.eos, self.vocab_size, self.samplers, self.device = technique, eos, vocab_size, samplers, device

    def propose(self, sequences, room, active):
        rows = []
        for sequence, left, a in zip(sequences, room, active):
            if not a:
                rows.append([])
                continue
            found = lookup(np.asarray(sequence, dtype=np.int64), self.technique.ngram_size,
                           min(self.technique.max_candidates, left - 1)).tolist()
            ends = [i for i, t in enumerate(found) if t in self.eos]
            rows.append(found[: ends[0] + 1] if ends else found)
        width = max(len(row) for row in rows)
        tokens = torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.int64, device=self.device)
        q = None
        if not all(s.greedy for s in self.samplers):
            q = torch.nn.functional.one_hot(tokens, self.vocab_size).float()  # [B, K, V]: a deterministic draft
        return RowProposals(tokens, [len(row) for row in rows], q)
