"""Training SpecDec++'s acceptance-prediction head the way its reference makes the data.

Huang et al., 2024; reference code Kaffaljidhmah2/SpecDec_pp (`data/gen_*.py`, `specdec_pp/train.py`).
Per prompt:
  1. the target writes a continuation X (sampled at the head's temperature, greedy at 0): the head
     learns on the target's text as prefix, as the committed text is the target's when decoding;
  2. at every position j the draft makes one proposal d_j on the target's prefix (prompt + X[:j]):
     one draft forward over prompt + X;
  3. each proposal's label is the probability that the target accepts it at that temperature,
     p_acc = min(1, p(d_j) / q(d_j)) (at temperature 0: 1 where the target's argmax is d_j);
  4. the draft reads prompt + Z, where Z is d with a share `mixing_ratio` (0.15) of positions
     replaced by X's token; the head reads the draft's hidden state at each position of Z, that is
     after the candidate has been fed, and learns p_acc at the draft's positions only (the mixed-in
     target tokens and the prompt carry no loss).
The draft is frozen, so its hidden states are computed once. The loss is the reference's
class-weighted soft cross-entropy normalised by the weighted label mass:
    sum(w (1 - y) CE_reject + y CE_accept) / sum(w (1 - y) + y),  w = 6.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from paretoray.actors.generation import with_cache
from paretoray.actors.models import model_identity
from paretoray.actors.prompts import as_chat
from paretoray.actors.techniques.specdec_pp import AcceptanceHead, model_fingerprint
from paretoray.actors.techniques.speculative import DraftHead, draft_hidden
from paretoray.recipes import corpus

REJECT_WEIGHT = 6.0  # the reference's weight_mismatch (its README's setting)
MIXING_RATIO = 0.15  # the reference's share of the target's own tokens mixed into the draft's input
NUM_LAYERS = 3  # the reference's resnet_num_layers in its README


@dataclass
class HeadReport:
    pairs: int
    observed_acceptance: float
    temperature: float
    steps: int
    final_loss: float
    calibration: list[dict[str, float]]  # held-out: per predicted-probability bin, mean predicted vs observed
    train_s: float


@torch.inference_mode()
def target_continuation(target: PreTrainedModel, ids: torch.Tensor, new_tokens: int, temperature: float,
                        eos_token_ids: set[int], generator: torch.Generator) -> torch.Tensor:
    """ids [T] -> the target's own continuation [n] (sampled at `temperature`, greedy at 0)."""
    out: list[int] = []
    step = ids[None]
    cache = DynamicCache(config=target.config)
    for _ in range(new_tokens):
        logits = target(input_ids=step, **with_cache(target, cache), use_cache=True, logits_to_keep=1).logits[0, -1].float()
        if temperature > 0:
            token = int(torch.multinomial((logits / temperature).softmax(-1).cpu(), 1, generator=generator))
        else:
            token = int(logits.argmax())
        out.append(token)
        if token in eos_token_ids:
            break
        step = torch.tensor([[token]], device=ids.device)
    return torch.tensor(out, dtype=torch.long, device=ids.device)


@torch.inference_mode()
def pairs_for_sequence(target: PreTrainedModel, draft: PreTrainedModel, ids: torch.Tensor, continuation: torch.Tensor,
                       temperature: float, mixing_ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 for one prompt [T] and its target continuation X [n]: (hidden [m, H], p_acc [m])
    at the m <= n positions where the draft's input holds its own proposal."""
    head = DraftHead.of(draft)
    start = ids.shape[0]
    joint = torch.cat([ids, continuation])[None]  # [1, T + n]
    # 2. one proposal per position, on the target's prefix: the state at t - 1 proposes token t.
    proposing = draft_hidden(draft, joint)[0, start - 1 : -1]  # [n, H]
    draft_logits = head.logits(proposing).float()  # [n, K]
    if temperature > 0:
        q_rows = (draft_logits / temperature).softmax(-1)
        rows = torch.multinomial(q_rows.cpu(), 1, generator=generator)[:, 0].to(q_rows.device)
        q = q_rows.gather(-1, rows[:, None])[:, 0]
    else:
        rows = draft_logits.argmax(-1)
        q = None
    proposals = head.token(rows)  # [n] vocabulary ids
    # 3. the target's judgement of each proposal on the same prefix.
    target_logits = target(joint).logits[0, start - 1 : -1].float()  # [n, V]
    if temperature > 0:
        p = (target_logits / temperature).softmax(-1).gather(-1, proposals[:, None])[:, 0]
        p_acc = (p / q.clamp_min(1e-12)).clamp(max=1.0)
    else:
        p_acc = (target_logits.argmax(-1) == proposals).float()
    # 4. the draft reads prompt + Z; the state at Z_j's own position is paired with d_j's label.
    mixed = torch.rand(continuation.shape[0], generator=generator).to(ids.device) < mixing_ratio
    z = torch.where(mixed, continuation, proposals)
    after = draft_hidden(draft, torch.cat([ids, z])[None])[0, start:]  # [n, H]
    keep = ~mixed
    return after[keep].float().cpu(), p_acc[keep].cpu()


def collect_pairs(target: PreTrainedModel, draft: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  new_tokens: int, temperature: float = 0.0, mixing_ratio: float = MIXING_RATIO,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft hidden state [N, H], acceptance label [N]) over all prompts, made the reference's way."""
    generator = torch.Generator().manual_seed(seed)
    eos = set(tokenizer.all_special_ids)
    hiddens, labels = [], []
    for prompt in tqdm(prompts, desc="target writes, draft proposes, target judges", unit="prompt"):
        ids = tokenizer(as_chat(tokenizer, prompt), return_tensors="pt").input_ids[0].to(draft.device)
        continuation = target_continuation(target, ids, new_tokens, temperature, eos, generator)
        hidden, label = pairs_for_sequence(target, draft, ids, continuation, temperature, mixing_ratio, generator)
        hiddens.append(hidden)
        labels.append(label)
    return torch.cat(hiddens), torch.cat(labels)


def weighted_soft_ce(logits: torch.Tensor, labels: torch.Tensor, reject_weight: float = REJECT_WEIGHT) -> torch.Tensor:
    """The reference's loss: class-weighted soft cross-entropy over the weighted label mass."""
    log_p = logits.float().log_softmax(-1)
    weighted = reject_weight * (1 - labels) * -log_p[:, 0] + labels * -log_p[:, 1]
    return weighted.sum() / (reject_weight * (1 - labels) + labels).sum()


def calibration(head: AcceptanceHead, hidden: torch.Tensor, labels: torch.Tensor, bins: int = 5) -> list[dict[str, float]]:
    with torch.no_grad():
        predicted = head(hidden).float().softmax(-1)[:, 1]
    table = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (predicted >= low) & ((predicted < high) | (b == bins - 1))
        if inside.any():
            table.append({"bin": f"{low:.1f}-{high:.1f}", "count": int(inside.sum()),
                          "predicted": float(predicted[inside].mean()), "observed": float(labels[inside].mean())})
    return table


def train_head(hidden: torch.Tensor, labels: torch.Tensor, steps: int, num_layers: int = NUM_LAYERS, lr: float = 1e-3,
               batch_size: int = 256, seed: int = 0) -> tuple[AcceptanceHead, float]:
    """AdamW with the reference's schedule shape: 3% linear warm-up, then cosine decay."""
    torch.manual_seed(seed)
    head = AcceptanceHead(hidden.shape[-1], num_layers)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    warmup = max(1, round(0.03 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="training the acceptance head", unit="step"):
        batch = torch.randint(0, hidden.shape[0], (min(batch_size, hidden.shape[0]),))
        loss = weighted_soft_ce(head(hidden[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return head.eval(), loss.item()


def train_acceptance_head(target: PreTrainedModel, draft: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path,
                          prompts: int = 96, new_tokens: int = 48, steps: int = 500, temperature: float = 0.0,
                          mixing_ratio: float = MIXING_RATIO, seed: int = 0) -> HeadReport:
    """Collect pairs on `prompts` prompts of the recipe's corpus, train the head, save it in `out`
    (the draft's folder) with what it was trained for and its report."""
    started = time.perf_counter()
    chosen = corpus.chat_prompts(prompts, seed=seed + 100)
    hidden, labels = collect_pairs(target, draft, tokenizer, chosen, new_tokens, temperature, mixing_ratio, seed)
    # Held-out pairs drawn across every prompt, not just the first prompts collected.
    order = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(seed))
    hidden, labels = hidden[order], labels[order]
    held = max(1, hidden.shape[0] // 10)
    head, loss = train_head(hidden[held:], labels[held:], steps, seed=seed)
    head.trained_for = {"temperature": temperature, "draft": model_fingerprint(draft), "target": model_fingerprint(target),
                        "draft_identity": model_identity(draft), "target_identity": model_identity(target),
                        "mixing_ratio": mixing_ratio, "reject_weight": REJECT_WEIGHT}
    report = HeadReport(pairs=int(hidden.shape[0]), observed_acceptance=float(labels.mean()), temperature=temperature,
                        steps=steps, final_loss=loss, calibration=calibration(head, hidden[:held], labels[:held]),
                        train_s=time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    head.save(out)
    (out / "acceptance_head_report.json").write_text(json.dumps(asdict(report), indent=1))
    return report
