"""Training SpecDec++'s acceptance-prediction head (Huang et al., 2024; reference: SpecDec_pp).

Data: the draft continues prompts as it would while drafting; both models then score those
tokens. At every drafted position the draft's last hidden state (the state that proposed the
token) is paired with the probability that the target accepts that token: min(1, p/q) when
sampling (the soft label of the reference), or 1 if the target's argmax agrees when greedy.

Loss: the reference's class-weighted cross-entropy on soft labels,
(1 - y) * w_reject * CE(class 0) + y * CE(class 1), with w_reject = 6.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from paretoray.actors.prompts import PROMPT_SETS, as_chat, make_prompts
from paretoray.actors.techniques.specdec_pp import AcceptanceHead
from paretoray.actors.techniques.speculative import DraftHead, draft_hidden

REJECT_WEIGHT = 6.0  # the reference's weight_mismatch


@dataclass
class HeadReport:
    pairs: int
    observed_acceptance: float
    steps: int
    final_loss: float
    calibration: list[dict[str, float]]  # held-out: per predicted-probability bin, mean predicted vs observed
    train_s: float


@torch.inference_mode()
def draft_continuation(draft: PreTrainedModel, ids: torch.Tensor, new_tokens: int, eos_token_ids: set[int],
                       temperature: float = 0.0) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The draft continues `ids` [1, T] exactly as it drafts in the speculative loop (its own head,
    greedy or tempered sampling): (tokens, the hidden state that proposed each [n, H], q of each [n])."""
    head = DraftHead.of(draft)
    cache = DynamicCache(config=draft.config)
    hidden = draft_hidden(draft, ids, cache)[0, -1]
    tokens, hiddens, q_of_token = [], [], []
    for _ in range(new_tokens):
        logits = head.logits(hidden).float()
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)
            row = torch.multinomial(probs, 1)[0]
        else:
            probs, row = None, logits.argmax()
        tokens.append(int(head.token(row)))
        hiddens.append(hidden)
        q_of_token.append(float(probs[row]) if probs is not None else 1.0)
        if tokens[-1] in eos_token_ids:
            break
        hidden = draft_hidden(draft, torch.tensor([[tokens[-1]]], device=ids.device), cache)[0, -1]
    return tokens, torch.stack(hiddens), torch.tensor(q_of_token)


@torch.inference_mode()
def collect_pairs(target: PreTrainedModel, draft: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  new_tokens: int, temperature: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft hidden state [N, H], acceptance label [N]) at every token the draft proposes."""
    torch.manual_seed(seed)
    hiddens, labels = [], []
    eos = set(tokenizer.all_special_ids)
    for prompt in tqdm(prompts, desc="draft proposes, target judges", unit="prompt"):
        ids = tokenizer(as_chat(tokenizer, prompt), return_tensors="pt").input_ids.to(draft.device)
        tokens, hidden, q = draft_continuation(draft, ids, new_tokens, eos, temperature)
        start = ids.shape[1]
        drafted = torch.tensor(tokens, device=ids.device)
        # Position t - 1 predicts token t: the target's view of each drafted token.
        target_logits = target(torch.cat([ids[0], drafted])[None]).logits[0, start - 1 : -1].float()
        if temperature > 0:
            p = (target_logits / temperature).softmax(-1).gather(-1, drafted[:, None])[:, 0].cpu()
            label = (p / q.clamp_min(1e-12)).clamp(max=1.0)
        else:
            label = (target_logits.argmax(-1) == drafted).float()
        hiddens.append(hidden.float().cpu())
        labels.append(label.cpu())
    return torch.cat(hiddens), torch.cat(labels)


def weighted_soft_ce(logits: torch.Tensor, labels: torch.Tensor, reject_weight: float = REJECT_WEIGHT) -> torch.Tensor:
    log_p = logits.float().log_softmax(-1)
    return (-(1 - labels) * reject_weight * log_p[:, 0] - labels * log_p[:, 1]).mean()


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


def train_head(hidden: torch.Tensor, labels: torch.Tensor, steps: int, num_layers: int = 3, lr: float = 1e-3,
               batch_size: int = 256, seed: int = 0) -> tuple[AcceptanceHead, float]:
    torch.manual_seed(seed)
    head = AcceptanceHead(hidden.shape[-1], num_layers)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="training the acceptance head", unit="step"):
        batch = torch.randint(0, hidden.shape[0], (min(batch_size, hidden.shape[0]),))
        loss = weighted_soft_ce(head(hidden[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.eval(), loss.item()


def train_acceptance_head(target: PreTrainedModel, draft: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path,
                          prompts_per_set: int = 16, new_tokens: int = 48, steps: int = 500, temperature: float = 0.0,
                          seed: int = 0) -> HeadReport:
    """Collect pairs, train the head, save it in `out` (the draft's folder) with its report."""
    started = time.perf_counter()
    prompts = [p for kind in PROMPT_SETS for p in make_prompts(kind, prompts_per_set, seed + 100)]
    hidden, labels = collect_pairs(target, draft, tokenizer, prompts, new_tokens, temperature, seed)
    # Held-out pairs drawn across every prompt set, not just the first prompts collected.
    order = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(seed))
    hidden, labels = hidden[order], labels[order]
    held = max(1, hidden.shape[0] // 10)
    head, loss = train_head(hidden[held:], labels[held:], steps, seed=seed)
    report = HeadReport(pairs=int(hidden.shape[0]), observed_acceptance=float(labels.mean()), steps=steps, final_loss=loss,
                        calibration=calibration(head, hidden[:held], labels[:held]), train_s=time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    head.save(out)
    (out / "acceptance_head_report.json").write_text(json.dumps(asdict(report), indent=1))
    return report
