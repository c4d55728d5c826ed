"""The loop speculative techniques share: a draft proposes, the target verifies in one forward.

Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (ICML 2023) and
Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling" (2023) give
the verification rule; gpt-fast's `speculative_decode` is the shape this follows.

One round:
  1. the draft catches up on committed tokens it has not seen, then proposes d_1..d_k one at a
     time; the technique's `DraftPolicy` decides when to stop proposing (fixed gamma, or
     SpecDec++'s acceptance head);
  2. the target runs [last committed token, d_1..d_k] in one forward: k + 1 distributions;
  3. greedy: accept while the target's argmax equals d_i; sampling: accept d_i with probability
     min(1, p_i(d_i) / q_i(d_i)), and resample the first rejection from norm(max(0, p_i - q_i));
     when all k are accepted, the (k+1)-th distribution gives a bonus token for free;
  4. both caches are cropped back to the accepted prefix (no re-prefill).
Each round commits accepted + 1 tokens for one target call.

A draft may predict over a frequent sub-vocabulary only (`DraftHead`, after FR-Spec: Zhao et al.,
"FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked Speculative
Sampling", 2025): for a small draft the output layer over a large vocabulary is most of its cost.
Verification is unchanged and stays lossless: a token the draft cannot propose has q = 0, so the
target's residual max(0, p - q) keeps all of its mass.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from paretoray.actors.generation import Generation, cache_nbytes, timed, with_cache
from paretoray.actors.techniques.base import Param, Technique


def verify(
    target_probs: torch.Tensor,  # [k + 1, V]: p(. | prefix, d_1..d_{i-1}) for i = 1..k+1
    draft_probs: torch.Tensor,  # [k, V]: q_i
    draft_tokens: list[int],  # d_1..d_k
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Sampling verification: how many draft tokens the target accepts, and the token that follows.

    The standard rule, which makes every committed token distributed exactly as the target would
    have sampled it: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
    rejection sample from norm(max(0, p_i - q_i)); if all are accepted, sample the bonus token
    from p_{k+1}.
    """
    k = len(draft_tokens)
    for i, token in enumerate(draft_tokens):
        p, q = target_probs[i, token], draft_probs[i, token]
        if torch.rand((), generator=generator, device=target_probs.device) * q > p:  # reject: u > p / q
            residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
            residual = residual / residual.sum() if residual.sum() > 0 else target_probs[i]
            return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> list[int]:
    """Greedy verification on the device: the accepted draft tokens plus the target's next token.

    target_logits [k + 1, V]; draft_tokens [k] (device). Accept while argmax p_i == d_i; the next
    token is argmax p_{a+1}. Reading the result back is the round's one host sync.
    """
    k = draft_tokens.shape[0]
    argmax = target_logits.argmax(dim=-1)  # [k + 1]
    accepted = (argmax[:k] == draft_tokens).int().cumprod(0).sum()
    # One transfer: the draft tokens, then how many were accepted, then the target's next token.
    flat = torch.cat([draft_tokens, accepted[None], argmax[accepted][None]]).tolist()
    return flat[: flat[k]] + [flat[k + 1]]


def distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next-token probabilities; temperature 0 means greedy (a one-hot on the argmax)."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


TEMPERATURE = Param("float", 0.0, low=0.0, high=2.0, doc="0: greedy; > 0: speculative sampling at this temperature")


class DraftPolicy:
    """Decides, proposal by proposal, when a round of drafting stops."""

    def begin_round(self) -> None:
        """A new round starts: forget the previous round's proposals."""

    def stop(self, proposed: int, draft_hidden: torch.Tensor) -> bool:
        """After `proposed` proposals this round. `draft_hidden` [H] is the draft's state after its
        latest input: the last committed token when proposed == 1, else proposal `proposed - 1`."""
        raise NotImplementedError


DRAFT_VOCAB = "draft_vocab.safetensors"  # beside a draft's weights: the token ids its head predicts over


@dataclass(frozen=True)
class DraftHead:
    """A draft's output layer, restricted to `token_ids` when its directory carries DRAFT_VOCAB."""

    weight: torch.Tensor  # [K, H]: rows of the draft's own output embedding
    token_ids: torch.Tensor | None  # [K] full-vocabulary id of each row; None: the whole vocabulary
    vocab_size: int  # V

    @classmethod
    def of(cls, draft: PreTrainedModel) -> DraftHead:
        if draft not in _DRAFT_HEADS:
            weight = draft.get_output_embeddings().weight
            path = Path(str(draft.name_or_path)) / DRAFT_VOCAB
            token_ids = None
            if path.exists():
                from safetensors.torch import load_file

                token_ids = load_file(str(path))["token_ids"].to(weight.device)
                weight = weight[token_ids].detach().contiguous()
            _DRAFT_HEADS[draft] = cls(weight, token_ids, draft.get_output_embeddings().weight.shape[0])
        return _DRAFT_HEADS[draft]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., K]"""
        return torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight)

    def token(self, row: torch.Tensor) -> torch.Tensor:
        """Vocabulary id of a head row (a device scalar: no host sync)."""
        return row if self.token_ids is None else self.token_ids[row]

    def full(self, probs: torch.Tensor) -> torch.Tensor:
        """[K] probabilities over the head's rows -> [V] over the vocabulary (zero off the rows)."""
        if self.token_ids is None:
            return probs
        return torch.zeros(self.vocab_size, dtype=probs.dtype, device=probs.device).index_copy_(0, self.token_ids, probs)


_DRAFT_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per loaded draft


def draft_hidden(draft: PreTrainedModel, tokens: torch.Tensor, cache: DynamicCache | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The draft's final (normed) hidden states [B, T, H]: its base model only, no output layer."""
    base = draft.base_model
    if cache is not None and hasattr(cache, "forward"):  # a static rollback cache runs its compiled step
        return cache.forward(base, tokens)
    return base(input_ids=tokens, **with_cache(base, cache), use_cache=cache is not None,
                attention_mask=attention_mask).last_hidden_state


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0  # verification forwards (the prefill not counted)
    draft_calls: int = 0  # draft forwards (the prefill not counted)

    def add_round(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.target_calls += 1
        self.draft_calls += drafted


@dataclass(frozen=True)
class Speculative(Technique):
    """Base of draft-and-verify techniques (not registered itself)."""

    phase = "decode"
    needs_draft = True
    trial_timeout_s = 7200.0  # two models; SpecDec++'s first trial may train its acceptance head
    lossless = True  # the verifier keeps exactly the target's own tokens
    rollback = True  # its caches are DynamicCaches, cropped back to the accepted prefix every round
    kv_within_dense = False  # kv_bytes counts the draft's cache as well as the target's
    reports = ("drafted", "accepted", "target_calls", "draft_calls")  # SpeculativeStats
    # Compiled: both models decode over static rollback caches (static_decode.RollbackCache). The
    # draft's one-token steps are one graph; its catch-up (2 tokens after a fully accepted round) and
    # the target's verification of gamma + 1 tokens take a graph with a symbolic token count (gamma
    # varies with SpecDec++'s stopping). The prefill and the policy (SpecDec++'s head) stay eager.
    static_decode = True
    batch_note = "its draft model decodes one sequence at a time; self_spec and prompt_lookup decode batches"

    def policy(self, draft: PreTrainedModel, target: PreTrainedModel) -> DraftPolicy:
        """A fresh drafting policy for one generation: when to stop proposing in each round."""
        raise NotImplementedError

    @torch.inference_mode()
    def generate(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: set[int] | None = None,
        forced_tokens: list[int] | None = None,
        question_ids: torch.Tensor | None = None,
        draft: PreTrainedModel | None = None,
        seed: int = 0,
        compiled: bool = False,
    ) -> Generation:
        if draft is None:
            raise ValueError(f"{self.name} needs a draft model: set `model.draft` in the sweep spec")
        if forced_tokens is not None:
            raise ValueError(f"{self.name} decodes the target's own continuation; fidelity does not apply")
        if question_ids is not None:  # nothing is compressed: the context then the question is the prompt
            input_ids = torch.cat([input_ids, question_ids], dim=-1)
        return speculative_generate(self, model, draft, input_ids, max_new_tokens, eos_token_ids or set(), seed, compiled=compiled)


@dataclass
class Sampler:
    """Picks tokens at one temperature: 0 is greedy (argmax, kept on the device), else seeded sampling."""

    temperature: float
    generator: torch.Generator | None  # None: greedy

    @classmethod
    def of(cls, temperature: float, seed: int, device: torch.device) -> Sampler:
        return cls(temperature, torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None)

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def first(self, logits: torch.Tensor) -> int:
        """The token after the prompt, from the target's last logits [V]."""
        if self.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(distribution(logits[None], self.temperature)[0], 1, generator=self.generator))

    def draft(self, head: DraftHead, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft proposal from its head's logits [K]: (token id as a device scalar, q over [V] or None)."""
        if self.greedy:  # the argmax is all greedy verification needs: no host sync per draft step
            return head.token(logits.argmax()), None
        q = head.full(distribution(logits[None], self.temperature)[0])
        return torch.multinomial(q, 1, generator=self.generator)[0], q


@dataclass
class Proposal:
    tokens: torch.Tensor  # [k] draft tokens d_1..d_k (device)
    q: torch.Tensor | None  # [k, V] the draft's distributions (sampling only)


def _target_logits(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache, last_only: bool = False) -> torch.Tensor:
    """ids [T] -> logits [T or 1, V], appending to `cache`."""
    if hasattr(cache, "forward"):  # a static rollback cache runs its compiled step
        logits = cache.forward(model, ids[None])[0]
        return logits[-1:] if last_only else logits
    return model(input_ids=ids[None], **with_cache(model, cache), use_cache=True, logits_to_keep=1 if last_only else 0).logits[0]


def prefill(target: PreTrainedModel, draft: PreTrainedModel, prompt: torch.Tensor, target_cache: DynamicCache,
            draft_cache: DynamicCache, sampler: Sampler) -> int:
    """Both models read the prompt [T]; the target picks the first new token."""
    logits = _target_logits(target, prompt, target_cache, last_only=True)
    draft_hidden(draft, prompt[None], draft_cache)
    return sampler.first(logits[-1])


def propose(draft: PreTrainedModel, head: DraftHead, policy: DraftPolicy, sampler: Sampler, pending: torch.Tensor,
            cache: DynamicCache, room: int) -> Proposal:
    """Phase 1: the draft reads the committed tokens it has not seen (`pending` [P]), then proposes
    one token per forward until the policy stops the round (or `room` tokens are proposed).

    `policy.stop` sees the state after the draft's latest input: at the first proposal that is
    the last committed token, then each earlier proposal in turn (what SpecDec++'s head scores)."""
    policy.begin_round()
    tokens, dists = [], []
    while True:
        hidden = draft_hidden(draft, pending[None], cache)[0, -1]  # [H]
        token, q = sampler.draft(head, head.logits(hidden))
        tokens.append(token)
        if q is not None:
            dists.append(q)
        if len(tokens) >= room or policy.stop(len(tokens), hidden):
            break
        pending = token.view(1)
    return Proposal(torch.stack(tokens), torch.stack(dists) if dists else None)


def verify_proposal(target: PreTrainedModel, cache: DynamicCache, last: torch.Tensor, proposal: Proposal,
                    sampler: Sampler) -> list[int]:
    """Phases 2 and 3: the target reads [last committed token, d_1..d_k] in one forward (k + 1
    distributions) and keeps the accepted prefix plus the token that follows it."""
    logits = _target_logits(target, torch.cat([last, proposal.tokens]), cache)  # [k + 1, V]
    if sampler.greedy:  # greedy compares argmaxes, so the raw logits serve
        return verify_greedy(logits, proposal.tokens)
    drafted = proposal.tokens.tolist()
    accepted, following = verify(distribution(logits, sampler.temperature), proposal.q, drafted, sampler.generator)
    return drafted[:accepted] + [following]


def roll_back(cache: DynamicCache, length: int) -> None:
    """Phase 4: drop whatever `cache` holds beyond the first `length` tokens (no re-prefill)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


@contextmanager
def static_models(target: PreTrainedModel, draft: PreTrainedModel, target_cache, draft_cache, room: int, compiled: bool):
    """Both caches as static rollback caches with `room` more tokens and both models on the static
    attention (compiled), or the caches as they are (eager). Yields the two caches and which
    rounds go unmeasured (None: all are measured)."""
    if not compiled:
        yield target_cache, draft_cache, None
        return
    from paretoray.actors import static_decode

    target_static = static_decode.RollbackCache(target, target_cache, room)
    draft_static = static_decode.RollbackCache(draft.base_model, draft_cache, room)
    with static_decode.static_attention_installed(target), static_decode.static_attention_installed(draft):
        yield target_static, draft_static, static_decode.warmup_watch(target_static.position.device)


def generated(tokens: list[int], budget: int, eos_token_ids: set[int]) -> list[int]:
    """What a draft-and-verify loop returns from the tokens it committed after the prompt: at most
    `budget` (the last round may commit more), ending at the first end-of-sequence token."""
    tokens = tokens[:budget]
    ends = [i for i, t in enumerate(tokens) if t in eos_token_ids]
    return tokens[: ends[0] + 1] if ends else tokens


def round_steps(rounds: list[tuple[float, int]], tokens: int) -> list[float]:
    """Per-token step times from (seconds, tokens committed) per measured round: a round's time
    shared by its tokens, as many as the generation's tokens after the first."""
    return [seconds / n for seconds, n in rounds for _ in range(n)][: max(tokens - 1, 0)]


def speculative_generate(
    technique: Speculative,
    target: PreTrainedModel,
    draft: PreTrainedModel,
    input_ids: torch.Tensor,  # [1, prompt_len]
    max_new_tokens: int,
    eos_token_ids: set[int],
    seed: int = 0,
    target_cache: DynamicCache | None = None,  # given by tests that inspect the caches afterwards
    draft_cache: DynamicCache | None = None,
    compiled: bool = False,
) -> Generation:
    device = input_ids.device
    sampler = Sampler.of(float(getattr(technique, "temperature", 0.0)), seed, device)
    target_cache = target_cache if target_cache is not None else DynamicCache(config=target.config)
    draft_cache = draft_cache if draft_cache is not None else DynamicCache(config=draft.config)
    policy, head, stats = technique.policy(draft, target), DraftHead.of(draft), SpeculativeStats()
    sequence = input_ids[0].tolist()  # prompt + committed tokens (host)
    prompt_len = len(sequence)

    prefill_s: list[float] = []
    with timed(device, prefill_s):
        sequence.append(prefill(target, draft, input_ids[0], target_cache, draft_cache, sampler))

    rounds: list[tuple[float, int]] = []  # (seconds, tokens committed) per measured round
    warmup_s = 0.0
    with static_models(target, draft, target_cache, draft_cache, max_new_tokens + 2, compiled) as (target_cache, draft_cache, unmeasured):
        while len(sequence) - prompt_len < max_new_tokens and sequence[-1] not in eos_token_ids:
            took: list[float] = []
            with timed(device, took):
                # Made before the draft runs: a host-to-device copy of a pageable tensor waits for the
                # stream, so made after the draft steps it would stall the round.
                pending = torch.tensor(sequence[draft_cache.get_seq_length():], device=device)
                last = pending[-1:]
                proposal = propose(draft, head, policy, sampler, pending, draft_cache, max_new_tokens - (len(sequence) - prompt_len))
                new = verify_proposal(target, target_cache, last, proposal, sampler)
                committed = len(sequence) + len(new) - 1  # tokens both caches may keep: all but the newest
                roll_back(target_cache, committed)
                roll_back(draft_cache, committed)
                sequence.extend(new)
            stats.add_round(drafted=len(proposal.tokens), accepted=len(new) - 1)
            if unmeasured is not None and unmeasured(stats.target_calls - 1):
                warmup_s += took[0]  # it compiled a graph (or recorded CUDA graphs): not a measured round
            else:
                rounds.append((took[0], len(new)))

    tokens = generated(sequence[prompt_len:], max_new_tokens, eos_token_ids)
    return Generation(
        tokens=tokens,
        prefill_s=prefill_s[0],
        step_s=round_steps(rounds, len(tokens)),
        kv_bytes=cache_nbytes(target_cache) + cache_nbytes(draft_cache),
        stats=asdict(stats),
        compiled=unmeasured is not None,
        warmup_s=warmup_s,
    )


# ---- batches: every row verified in one target forward, each rolled back to its own length -------


@dataclass
class RowProposals:
    """One round's proposals for a batch: tokens [B, K] (a row's first `counts[b]` are its own, the
    rest padding), and the draft's distributions [B, K, V] when sampling."""

    tokens: torch.Tensor
    counts: list[int]
    q: torch.Tensor | None = None


class RowProposer:
    """What drafts for a batch (self_spec's compressed caches, prompt lookup's n-grams)."""

    def propose(self, sequences: list[list[int]], room: list[int], active: list[bool]) -> RowProposals:
        """Proposals for each row: at most room[b] tokens for an active row, none for a done one."""
        raise NotImplementedError

    def committed(self, lengths: list[int]) -> None:
        """After verification: row b keeps its first lengths[b] tokens (the draft forgets the rest)."""


def verify_rows(logits: torch.Tensor, proposals: RowProposals, samplers: list[Sampler]) -> list[list[int]]:
    """Each row's accepted proposals plus the target's token after them, from the target's logits
    [B, K + 1, V] over [last committed, d_1..d_K]: the one-sequence rules, row by row."""
    k = proposals.tokens.shape[1]
    counts = torch.tensor(proposals.counts, device=logits.device)
    if all(s.greedy for s in samplers):  # one host transfer for the whole batch
        argmax = logits.argmax(dim=-1)  # [B, K + 1]
        own = torch.arange(k, device=logits.device) < counts[:, None]
        accepted = ((argmax[:, :k] == proposals.tokens) & own).int().cumprod(1).sum(1)  # [B]
        following = argmax.gather(1, accepted[:, None])[:, 0]
        flat = torch.cat([proposals.tokens, accepted[:, None], following[:, None]], dim=1).tolist()
        return [row[: row[k]] + [row[k + 1]] for row in flat]
    out = []
    for b, sampler in enumerate(samplers):
        n = proposals.counts[b]
        drafted = proposals.tokens[b, :n].tolist()
        accepted, following = verify(distribution(logits[b, : n + 1], sampler.temperature), proposals.q[b, :n], drafted,
                                     sampler.generator)
        out.append(drafted[:accepted] + [following])
    return out


def target_forward(model: PreTrainedModel, cache, ids: torch.Tensor, compiled: bool) -> torch.Tensor:
    """ids [B, T] through the model over a static cache (static attention installed): compiled, or
    the same function run eagerly. Logits [B, T, V]."""
    from paretoray.actors import static_decode

    if compiled:
        return static_decode.compiled_forward(model, cache, ids)
    out = static_decode._forward(model, cache, ids)
    if isinstance(cache, static_decode.RollbackCache):
        cache.advance(ids.shape[1])
    return out


def speculate_batch(
    model: PreTrainedModel,
    target,  # static_decode.RollbackCache.stacked: row b holds sequences[b][:-1]
    compiled: bool,
    proposer: RowProposer,
    sequences: list[list[int]],  # per row: prompt + the first token
    prompt_lens: list[int],
    budgets: list[int],
    eos_token_ids: set[int],
    samplers: list[Sampler],
    unmeasured=None,
) -> tuple[list[list[int]], list[float], list[int], float, list[SpeculativeStats]]:
    """Draft-and-verify for B rows at once: each round every active row gets proposals, the target
    verifies [last committed, proposals] of every row in one forward, and each row keeps its own
    accepted prefix plus the target's next token (a row's tokens are what it decodes alone). The
    target's rows are rolled back to their own lengths. Returns (tokens per row, measured
    pseudo-steps, rows active in each, warm-up seconds, counters per row, steps per row): a round
    committing n_b tokens to row b counts as max n_b steps of its time / max n_b, step j active for
    the rows with n_b > j (so tokens / time is the round's throughput); a row's own steps share
    each round's time among the tokens it gave that row, as one sequence's loop does (its latency)."""
    device = target.position.device
    stats = [SpeculativeStats() for _ in sequences]
    done = [len(s) - p >= budget or s[-1] in eos_token_ids for s, p, budget in zip(sequences, prompt_lens, budgets)]
    step_s: list[float] = []
    active_steps: list[int] = []
    row_rounds: list[list[tuple[float, int]]] = [[] for _ in sequences]
    warmup_s, rounds = 0.0, 0
    while not all(done):
        took: list[float] = []
        with timed(device, took):
            room = [0 if d else budget - (len(s) - p) for s, p, budget, d in zip(sequences, prompt_lens, budgets, done)]
            last = torch.tensor([[s[-1]] for s in sequences], device=device)
            proposals = proposer.propose(sequences, room, [not d for d in done])
            logits = target_forward(model, target, torch.cat([last, proposals.tokens], dim=1), compiled)  # [B, K + 1, V]
            new = verify_rows(logits, proposals, samplers)
            lengths = []
            for b, tokens in enumerate(new):
                if done[b]:
                    new[b] = []
                    lengths.append(len(sequences[b]) - 1)
                    continue
                stats[b].drafted += proposals.counts[b]
                stats[b].accepted += len(tokens) - 1
                stats[b].target_calls += 1
                tokens = new[b] = tokens[: budgets[b] - (len(sequences[b]) - prompt_lens[b])]  # past its budget: not counted
                lengths.append(len(sequences[b]) + len(tokens) - 1)
                sequences[b].extend(tokens)
                done[b] = len(sequences[b]) - prompt_lens[b] >= budgets[b] or any(t in eos_token_ids for t in tokens)
            target.set_lengths(lengths)
            proposer.committed(lengths)
        if unmeasured is not None and unmeasured(rounds):
            warmup_s += took[0]
        else:
            widest = max(len(tokens) for tokens in new)
            for j in range(widest):
                step_s.append(took[0] / widest)
                active_steps.append(sum(len(tokens) > j for tokens in new))
            for b, tokens in enumerate(new):
                if tokens:
                    row_rounds[b].append((took[0], len(tokens)))
        rounds += 1
    out = [generated(s[p:], budget, eos_token_ids) for s, p, budget in zip(sequences, prompt_lens, budgets)]
    return out, step_s, active_steps, warmup_s, stats, [round_steps(r, len(t)) for r, t in zip(row_rounds, out)]
