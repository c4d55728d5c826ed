"""Self-speculative decoding: the model drafts with its own KV cache compressed, verifies with the full one.

Sadhukhan et al., "MagicDec: Breaking the Latency-Throughput Tradeoff for Long Context Generation
with Speculative Decoding" (ICLR 2025; reference code Infini-AI-Lab/MagicDec) and Sun et al.,
"TriForce: Lossless Acceleration of Long Sequence Generation with Hierarchical Speculative
Decoding" (COLM 2024). At long contexts and large batches a decode step reads the KV cache more
than the weights, so the same model over a small cache (StreamingLLM's sinks + window in
MagicDec) is a cheap draft that agrees with itself often; verification over the full cache keeps
the output exactly the target's.

The draft cache is any KV technique's (`self_spec+snapkv`, `self_spec+pyramidkv`, ...; alone,
StreamingLLM with its defaults as in MagicDec), built by that technique's own prefill and
continued by its own static-decode rules (`static_decode.py`: rings roll, H2O evicts). One round:
  1. the draft reads the committed tokens it has not seen, then proposes up to `gamma` tokens one
     at a time (stopping early, SpecDec++-style, once the chance that some proposal is rejected,
     1 - prod(draft confidence), exceeds `stop_threshold`: the draft's own top probability stands
     in for SpecDec++'s trained acceptance head);
  2. the target reads [last committed, d_1..d_k] over its full cache in one forward and keeps the
     accepted prefix plus its own next token (`speculative.verify_greedy` / `verify`);
  3. the target's cache is cropped to the committed tokens, the draft's rewound (the slots its
     rejected proposals took are freed).
Both caches take the accepted tokens: the target's from its verification, the draft's from its
own proposals (its KV for them was computed over the compressed cache, as in MagicDec).

Deviations, measured in BENCHMARKS.md: the prompt is prefilled twice (the full cache, then the
member's compressed one through its own hooks, both inside the time to first token) where MagicDec
slices the draft cache out of one prefill; rewinding a ring does not bring back the entries the
rejected proposals displaced (at most gamma per round, recovered as the window refills).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from paretoray.actors import static_decode
from paretoray.actors.generation import Generation, cache_nbytes, timed, with_cache
from paretoray.actors.techniques.base import Technique, build_technique, param, register
from paretoray.actors.generation import BatchGeneration
from paretoray.actors.techniques.speculative import (
    TEMPERATURE,
    Proposal,
    RowProposals,
    RowProposer,
    Sampler,
    SpeculativeStats,
    distribution,
    generated,
    roll_back,
    round_steps,
    speculate_batch,
    target_forward,
    verify,
    verify_greedy,
)

DEFAULT_DRAFT_CACHE = "streaming_llm"  # MagicDec's


@register
@dataclass(frozen=True)
class SelfSpec(Technique):
    gamma: int = param("int", 4, low=1, high=32, doc="most tokens the draft proposes per round")
    stop_threshold: float = param("float", 1.0, low=0.0, high=1.0,
                                  doc="stop a round once 1 - prod(draft top probability) exceeds it (1: always gamma)")
    temperature: float = TEMPERATURE.field()

    name = "self_spec"
    phase = "decode"
    lossless = True  # the target verifies every token over its full cache
    rollback = True  # the target's full cache (what `applied` yields) crops exactly; the draft's is rewound
    kv_within_dense = False  # kv_bytes counts the draft's compressed cache beside the full one
    reports = ("drafted", "accepted", "target_calls", "draft_calls")
    static_decode = True
    trial_timeout_s = 7200.0
    accepts = "kv_cache"  # self_spec+snapkv: the draft cache is SnapKV's
    member_requires = {"static_decode": (True, "the draft decodes and rewinds over the member's static slot cache")}
    member_shapes_output = False  # the member only decides how often the draft is right
    examples = {"covers": {}, "one_candidate": {"gamma": 1}, "threshold": {"gamma": 6, "stop_threshold": 0.5}}
    # A batch (MagicDec's setting): every row drafts over its own compressed cache, the target
    # verifies all rows in one forward, and each row rolls back to its own length.
    batched = True

    def generate_batch(self, model, prompts, max_new_tokens, eos_token_ids=None, question_ids=None, compiled=False,
                       member: Technique | None = None, seed: int = 0) -> BatchGeneration:
        """B sequences (each row's tokens are what `generate` gives it alone under greedy decoding;
        sampling seeds every row with `seed`)."""
        member = member if member is not None else build_technique(DEFAULT_DRAFT_CACHE, {})
        for prompt in prompts:
            member.prepare_for_prompt(model, prompt.shape[-1])
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        with torch.inference_mode():
            return self_speculative_batch(self, model, member, prompts, budgets, eos_token_ids or set(), seed, compiled,
                                          question_ids)

    def generate(self, model, input_ids, max_new_tokens, eos_token_ids=None, forced_tokens=None, question_ids=None,
                 compiled=False, member: Technique | None = None, seed: int = 0) -> Generation:
        if forced_tokens is not None:
            raise ValueError(f"{self.name} decodes the target's own continuation; fidelity does not apply")
        member = member if member is not None else build_technique(DEFAULT_DRAFT_CACHE, {})
        member.prepare_for_prompt(model, input_ids.shape[-1])
        with torch.inference_mode():
            return self_speculative_generate(self, model, member, input_ids, max_new_tokens, eos_token_ids or set(), seed,
                                             compiled, question_ids)


def draft_cache(model: PreTrainedModel, member: Technique, input_ids: torch.Tensor, room: int,
                question_ids: torch.Tensor | None = None) -> static_decode.StaticDecodeCache:
    """The member's cache of the prompt [1, T] (its own prefill, hooks and compression) as a static
    slot cache with `room` more tokens. `question_ids`: the context is compressed first, then the
    question appended (context-only placement)."""
    with member.applied(model) as cache:
        for chunk in (input_ids, question_ids):
            if chunk is not None:
                model(input_ids=chunk, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        static = member.static_cache(model, cache, room, release=True)
    if static is None:
        raise ValueError(f"self_spec: {member.name} cannot continue its cache statically; it cannot be the draft cache")
    return static


def draft_logits(model: PreTrainedModel, cache: static_decode.StaticDecodeCache, token: torch.Tensor, compiled: bool) -> torch.Tensor:
    """token [1] through the model over the draft cache -> next-token logits [V]."""
    ids = token.view(1, 1)
    if compiled:
        return static_decode.compiled_forward(model, cache, ids)[0, -1]
    with static_decode.static_attention_installed(model):
        return static_decode._forward(model, cache, ids)[0, -1]


def propose(model, cache, technique: SelfSpec, sampler: Sampler, pending: torch.Tensor, room: int, compiled: bool,
            stats: SpeculativeStats) -> Proposal:
    """Phase 1: catch up on `pending` [P] committed tokens, then propose until gamma, the stopping
    rule or `room`."""
    for token in pending[:-1]:
        draft_logits(model, cache, token, compiled)
        stats.draft_calls += 1
    token = pending[-1]
    tokens, dists, confident = [], [], 1.0
    while True:
        logits = draft_logits(model, cache, token, compiled)  # [V]
        if sampler.greedy:
            token, q = logits.argmax(), None
        else:
            q = distribution(logits[None], sampler.temperature)[0]
            token = torch.multinomial(q, 1, generator=sampler.generator)[0]
            dists.append(q)
        tokens.append(token)
        if len(tokens) >= min(technique.gamma, room):
            break
        if technique.stop_threshold < 1.0:  # SpecDec++'s rule with the draft's confidence (one host read)
            confident *= float(q[token] if q is not None else torch.softmax(logits.float(), -1).max())
            if 1.0 - confident > technique.stop_threshold:
                break
    stats.draft_calls += len(tokens)  # one draft forward per proposal
    return Proposal(torch.stack(tokens), torch.stack(dists) if dists else None)


def target_logits(model: PreTrainedModel, cache, ids: torch.Tensor) -> torch.Tensor:
    """ids [T] over the target's full cache -> logits [T, V]."""
    if isinstance(cache, static_decode.RollbackCache):
        return cache.forward(model, ids[None])[0]
    return model(input_ids=ids[None], **with_cache(model, cache), use_cache=True).logits[0]


def self_speculative_generate(technique: SelfSpec, model: PreTrainedModel, member: Technique, input_ids: torch.Tensor,
                              max_new_tokens: int, eos_token_ids: set[int], seed: int = 0, compiled: bool = False,
                              question_ids: torch.Tensor | None = None) -> Generation:
    """Greedy or sampled self-speculation. `question_ids`: context-only placement, which only the
    draft's compressed cache sees as such (the target's full cache holds context + question alike)."""
    context = input_ids
    if question_ids is not None:
        input_ids = torch.cat([input_ids, question_ids], dim=-1)
    device = input_ids.device
    sampler = Sampler.of(technique.temperature, seed, device)
    stats = SpeculativeStats()
    sequence = input_ids[0].tolist()
    prompt_len = len(sequence)
    room = max_new_tokens + technique.gamma + 2

    prefill_s: list[float] = []
    with timed(device, prefill_s):
        full = DynamicCache(config=model.config)
        logits = model(input_ids=input_ids, **with_cache(model, full), use_cache=True, logits_to_keep=1).logits
        sequence.append(sampler.first(logits[0, -1]))
        draft = draft_cache(model, member, context, room, question_ids)
    target = static_decode.RollbackCache(model, full, room) if compiled else full
    if compiled:
        del full
    draft_len = prompt_len  # tokens the draft cache has read

    rounds: list[tuple[float, int]] = []
    warmup_s = 0.0
    unmeasured = static_decode.warmup_watch(device) if compiled else None
    with static_decode.static_attention_installed(model) if compiled else nullcontext():
        while len(sequence) - prompt_len < max_new_tokens and sequence[-1] not in eos_token_ids:
            took: list[float] = []
            with timed(device, took):
                pending = torch.tensor(sequence[draft_len:], device=device)
                left = max_new_tokens - (len(sequence) - prompt_len)
                proposal = propose(model, draft, technique, sampler, pending, left, compiled, stats)
                draft_len = len(sequence) + len(proposal.tokens) - 1
                logits = target_logits(model, target, torch.cat([pending[-1:], proposal.tokens]))  # [k + 1, V]
                if sampler.greedy:
                    new = verify_greedy(logits, proposal.tokens)
                else:
                    drafted = proposal.tokens.tolist()
                    accepted, following = verify(distribution(logits, sampler.temperature), proposal.q, drafted, sampler.generator)
                    new = drafted[:accepted] + [following]
                committed = len(sequence) + len(new) - 1
                roll_back(target, committed)
                if draft_len > committed:
                    draft.rewind(committed)
                    draft_len = committed
                sequence.extend(new)
            stats.drafted += len(proposal.tokens)
            stats.accepted += len(new) - 1
            stats.target_calls += 1
            if unmeasured is not None and unmeasured(stats.target_calls - 1):
                warmup_s += took[0]
            else:
                rounds.append((took[0], len(new)))

    tokens = generated(sequence[prompt_len:], max_new_tokens, eos_token_ids)
    return Generation(
        tokens=tokens,
        prefill_s=prefill_s[0],
        step_s=round_steps(rounds, len(tokens)),
        kv_bytes=cache_nbytes(target) + cache_nbytes(draft),
        stats=asdict(stats),
        compiled=compiled,
        warmup_s=warmup_s,
    )


class DraftRows(RowProposer):
    """self_spec's drafts for a batch: the rows' compressed caches stacked into one static cache."""

    def __init__(self, model, cache: static_decode.StaticDecodeCache, technique: SelfSpec, samplers: list[Sampler],
                 read: list[int], compiled: bool, stats: list[SpeculativeStats]):
        self.model, self.cache, self.technique, self.samplers = model, cache, technique, samplers
        self.read, self.compiled, self.stats = read, compiled, stats  # read[b]: tokens row b's draft cache holds

    def forward(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """One token per row -> next-token logits [B, V]."""
        ids = torch.as_tensor(tokens, device=self.cache.position.device).view(-1, 1)
        return target_forward(self.model, self.cache, ids, self.compiled)[:, -1]

    def propose(self, sequences, room, active):
        # Catch up: every row re-reads its last `behind` committed tokens (a row already holding
        # some of them is rewound first: rewriting a token at its own position gives the same entry).
        lengths = [len(s) for s in sequences]
        behind = max(n - r for n, r, a in zip(lengths, self.read, active) if a)
        start = [n - behind for n in lengths]
        if any(r > s for r, s in zip(self.read, start)):
            self.cache.rewind(start)
        for j in range(behind):
            logits = self.forward([s[n - behind + j] for s, n in zip(sequences, lengths)])
            for b, a in enumerate(active):
                self.stats[b].draft_calls += int(a)
        caps = [min(self.technique.gamma, r) if a else 0 for r, a in zip(room, active)]
        tokens, dists, counts, stopped, confident = [], [], [0] * len(sequences), [c == 0 for c in caps], [1.0] * len(sequences)
        greedy = all(s.greedy for s in self.samplers)
        while True:
            if greedy:
                token, q = logits.argmax(dim=-1), None  # [B]
            else:
                q = distribution(logits, self.samplers[0].temperature)  # [B, V]
                token = torch.stack([torch.multinomial(q[b], 1, generator=s.generator)[0] for b, s in enumerate(self.samplers)])
                dists.append(q)
            tokens.append(token)
            probs = None
            if self.technique.stop_threshold < 1.0:
                probs = (q if q is not None else torch.softmax(logits.float(), -1)).gather(1, token[:, None])[:, 0].tolist()
            for b in range(len(sequences)):
                if stopped[b]:
                    continue
                counts[b] += 1
                if counts[b] >= caps[b]:
                    stopped[b] = True
                elif probs is not None:
                    confident[b] *= probs[b]
                    stopped[b] = 1.0 - confident[b] > self.technique.stop_threshold
            if all(stopped):
                break
            logits = self.forward(token)
        for b in range(len(sequences)):
            self.stats[b].draft_calls += counts[b]
        self.read = [n + len(tokens) - 1 for n in lengths]
        return RowProposals(torch.stack(tokens, dim=1), counts, torch.stack(dists, dim=1) if dists else None)

    def committed(self, lengths):
        keep = [min(r, n) for r, n in zip(self.read, lengths)]
        if keep != self.read:
            self.cache.rewind(keep)
            self.read = keep


def self_speculative_batch(technique: SelfSpec, model: PreTrainedModel, member: Technique, prompts: list[torch.Tensor],
                           budgets: list[int], eos_token_ids: set[int], seed: int, compiled: bool,
                           question_ids: list[torch.Tensor | None] | None = None) -> BatchGeneration:
    """Each row prefilled alone (its full cache and its member's compressed one), the rows stacked,
    then `speculative.speculate_batch`."""
    device = prompts[0].device
    samplers = [Sampler.of(technique.temperature, seed, device) for _ in prompts]
    fulls, drafts, sequences, prompt_lens, prefill_s, alone = [], [], [], [], [], []
    for b, context in enumerate(prompts):
        question = None if question_ids is None else question_ids[b]
        input_ids = context if question is None else torch.cat([context, question], dim=-1)
        took: list[float] = []
        with timed(device, took):
            full = DynamicCache(config=model.config)
            logits = model(input_ids=input_ids, **with_cache(model, full), use_cache=True, logits_to_keep=1).logits
            first = samplers[b].first(logits[0, -1])
            draft = draft_cache(model, member, context, budgets[b] + technique.gamma + 2, question)
        fulls.append(full)
        drafts.append(draft)
        alone.append(cache_nbytes(full) + cache_nbytes(draft))
        sequences.append(input_ids[0].tolist() + [first])
        prompt_lens.append(input_ids.shape[-1])
        prefill_s.append(took[0])
    target = static_decode.RollbackCache.stacked(model, fulls, max(budgets) + technique.gamma + 2)
    draft = static_decode.stack(model, drafts)
    del fulls, drafts
    stats = [SpeculativeStats() for _ in prompts]
    proposer = DraftRows(model, draft, technique, samplers, list(prompt_lens), compiled, stats)
    with static_decode.static_attention_installed(model):
        tokens, step_s, active, warmup_s, verified, row_steps = speculate_batch(
            model, target, compiled, proposer, sequences, prompt_lens, budgets, eos_token_ids, samplers,
            unmeasured=static_decode.warmup_watch(device) if compiled else None)
    for row, counters in zip(stats, verified):
        row.drafted, row.accepted, row.target_calls = counters.drafted, counters.accepted, counters.target_calls
    return BatchGeneration(tokens=tokens, prefill_s=prefill_s, step_s=step_s, active=active,
                           kv_bytes=cache_nbytes(target) + cache_nbytes(draft), kv_bytes_alone=alone,
                           stats=[asdict(s) for s in stats], compiled=compiled, warmup_s=warmup_s, row_step_s=row_steps)
