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

import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from paretoray.actors.generation import Generation, cache_nbytes, synchronize
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
        """After `proposed` proposals this round (the last one's draft hidden state given)."""
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
    return draft.base_model(input_ids=tokens, past_key_values=cache, use_cache=cache is not None,
                            attention_mask=attention_mask).last_hidden_state


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0  # verification forwards (the prefill not counted)
    draft_calls: int = 0  # draft forwards (the prefill not counted)



@dataclass(frozen=True)
class Speculative(Technique):
    """Base of draft-and-verify techniques (not registered itself)."""

    phase = "decode"
    params = {}
    needs_draft = True
    lossless = True  # the verifier keeps exactly the target's own tokens

    def policy(self, draft: PreTrainedModel) -> DraftPolicy:
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
    ) -> Generation:
        if draft is None:
            raise ValueError(f"{self.name} needs a draft model: set `model.draft` in the sweep spec")
        if forced_tokens is not None or question_ids is not None:
            raise ValueError(f"{self.name} decodes the target's own continuation; fidelity and context-only placement do not apply")
        return speculative_generate(self, model, draft, input_ids, max_new_tokens, eos_token_ids or set(), seed)


def _forward(model: PreTrainedModel, tokens: list[int], cache: DynamicCache, device: torch.device, last_only: bool = False):
    ids = torch.tensor([tokens], device=device)
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1 if last_only else 0).logits[0]


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
) -> Generation:
    device = input_ids.device
    temperature = float(getattr(technique, "temperature", 0.0))
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    stats = SpeculativeStats()
    target_cache = target_cache if target_cache is not None else DynamicCache(config=target.config)
    draft_cache = draft_cache if draft_cache is not None else DynamicCache(config=draft.config)
    policy = technique.policy(draft)
    head = DraftHead.of(draft)
    prompt = input_ids[0].tolist()

    synchronize(device)
    started = time.perf_counter()
    target_logits = _forward(target, prompt, target_cache, device, last_only=True)
    draft_hidden(draft, input_ids, draft_cache)
    first = distribution(target_logits[-1:], temperature)[0]
    committed = [int(first.argmax()) if generator is None else int(torch.multinomial(first, 1, generator=generator))]
    synchronize(device)
    prefill_s = time.perf_counter() - started

    step_s: list[float] = []
    draft_seen = len(prompt)  # tokens the draft's cache holds
    while len(committed) < max_new_tokens and committed[-1] not in eos_token_ids:
        synchronize(device)
        round_start = time.perf_counter()
        sequence = prompt + committed
        # 1. draft: catch up on committed tokens it has not seen, then propose.
        pending = torch.tensor([sequence[draft_seen:]], device=device)
        # Made now, while the device is idle after the last round's read: a host-to-device copy
        # of a pageable tensor waits for the stream, so made after the draft steps it would stall.
        last_token = torch.tensor([sequence[-1]], device=device)
        # Greedy proposals stay on the device (no sync per draft step); sampled ones need host ids.
        draft_tokens: list = []
        draft_dists: list[torch.Tensor] = []
        policy.begin_round()
        while True:
            hidden = draft_hidden(draft, pending, draft_cache)[0, -1]
            logits = head.logits(hidden)
            stats.draft_calls += 1
            if generator is None:  # greedy: the argmax is all verification needs
                token = head.token(logits.argmax())
                pending = token.view(1, 1)
            else:
                q = head.full(distribution(logits[None], temperature)[0])
                token = int(torch.multinomial(q, 1, generator=generator))
                draft_dists.append(q)
                pending = torch.tensor([[token]], device=device)
            draft_tokens.append(token)
            room = max_new_tokens - len(committed)
            if len(draft_tokens) >= room or policy.stop(len(draft_tokens), hidden):
                break
        k = len(draft_tokens)
        draft_seen = len(sequence) + k - 1  # the last proposal was never fed
        # 2. target: one forward over the last committed token and every proposal.
        if generator is None:
            proposals = torch.stack(draft_tokens)
            verified = torch.cat([last_token, proposals])
        else:
            verified = torch.tensor([sequence[-1], *draft_tokens], device=device)
        logits = target(input_ids=verified[None], past_key_values=target_cache, use_cache=True).logits[0]
        stats.target_calls += 1
        # 3. verify (greedy compares argmaxes, so the raw logits serve).
        if generator is None:
            new = verify_greedy(logits, proposals)
        else:
            accepted, following = verify(distribution(logits, temperature), torch.stack(draft_dists), draft_tokens, generator)
            new = draft_tokens[:accepted] + [following]
        accepted = len(new) - 1
        stats.drafted += k
        stats.accepted += accepted
        # 4. roll both caches back to the accepted prefix.
        if accepted < k:
            target_cache.crop(-(k - accepted))
        kept_in_draft = len(sequence) + accepted
        if draft_seen > kept_in_draft:
            draft_cache.crop(-(draft_seen - kept_in_draft))
            draft_seen = kept_in_draft
        committed.extend(new)
        synchronize(device)
        elapsed = time.perf_counter() - round_start
        step_s.extend([elapsed / len(new)] * len(new))  # a round's time, shared by the tokens it produced

    committed = committed[:max_new_tokens]
    if any(t in eos_token_ids for t in committed):
        committed = committed[: next(i for i, t in enumerate(committed) if t in eos_token_ids) + 1]
    return Generation(
        tokens=committed,
        prefill_s=prefill_s,
        step_s=step_s[: max(len(committed) - 1, 0)],
        kv_bytes=cache_nbytes(target_cache) + cache_nbytes(draft_cache),
        stats=asdict(stats),
    )
