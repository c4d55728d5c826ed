"""A draft for a target with no smaller sibling: its first layers, distilled from it.

The draft copies the target's embeddings, its first `layers` decoder layers, its final norm and
its output head, so it starts as a truncated target and shares the tokenizer. It is then
distilled on a broad offline corpus (`corpus.py`: text that ships with Python): passages of prose
and code as they are, and the target's own sampled answers to chat requests of many styles,
minimising KL(target || draft) over every position of each sequence, restricted to the target's
top-64 tokens, which are scored once for the whole corpus. Its report gives the acceptance rate
on the shipped prompt templates and on everyday requests the recipe never trains on
(`corpus.UNSEEN_CHAT`).

The draft's output layer may be restricted to the `head_vocab` most frequent tokens (FR-Spec,
Zhao et al. 2025): for a 4-layer draft of a 49K-vocabulary model the full output layer costs more
than its layers. Frequency is counted on the corpus; the rest of the head is filled in the
tokenizer's merge order (BPE merges the most frequent pairs first), and special tokens are always
kept so the draft can propose the end of a sequence. The ids are saved beside the draft
(`DRAFT_VOCAB`); the draft's own weights stay a complete, ordinary model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from paretoray.actors.prompts import PROMPT_SETS, as_chat, make_prompts
from paretoray.actors.techniques.speculative import DRAFT_VOCAB, DraftHead, draft_hidden
from paretoray.recipes import corpus


@dataclass
class DraftReport:
    layers: int
    target_layers: int
    steps: int
    corpus_sequences: int
    head_vocab: int  # tokens the draft's output layer predicts over
    head_vocab_coverage: float  # held-out: fraction of the target's next tokens that are among them
    final_kl: float
    greedy_agreement: float  # held-out: fraction of positions where draft and target argmax agree
    acceptance_rate: float  # greedy specdec (gamma 4) on fresh prompts of the shipped templates: accepted / drafted
    acceptance_rate_unseen: float  # the same on corpus.UNSEEN_CHAT: request styles the recipe never trains on
    train_s: float


def truncated_copy(target: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A model of the target's architecture with its first `layers` layers and shared-shape weights."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = draft.load_state_dict(target.state_dict(), strict=False)
    leftover = [k for k in unexpected if not any(k.startswith(f"model.layers.{i}.") for i in range(layers, target.config.num_hidden_layers))]
    if missing or leftover:
        raise RuntimeError(f"cannot build a truncated draft: missing {missing[:5]}, unexpected {leftover[:5]}")
    return draft


@torch.inference_mode()
def sample_corpus(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  new_tokens: int, batch_size: int = 8, seed: int = 0) -> list[list[int]]:
    """The target's own continuations (sampled, temperature 0.8) of each prompt, prompt included,
    in the prompts' order. Prompts are batched by length, so little padding is computed."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    texts = [as_chat(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i]).input_ids))
    sequences: dict[int, list[int]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="target samples its own continuations", unit="batch"):
        chosen = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in chosen], return_tensors="pt", padding=True)
        out = target.generate(**batch.to(target.device), max_new_tokens=new_tokens, do_sample=True, temperature=0.8,
                              top_p=0.95, pad_token_id=tokenizer.pad_token_id)
        for i, row, mask in zip(chosen, out, batch["attention_mask"]):
            tokens = row[int((mask == 0).sum()) :].tolist()  # drop the left padding
            ended = False
            while tokens and tokens[-1] == tokenizer.pad_token_id:  # right padding after a finished row
                tokens.pop()
                ended = True
            if ended and tokenizer.pad_token_id == tokenizer.eos_token_id:
                tokens.append(tokenizer.eos_token_id)  # the pad was the end-of-sequence token itself
            sequences[i] = tokens
    return [sequences[i] for i in range(len(texts))]


TEACHER_TOP_K = 64  # the target's most likely tokens per position: nearly all of its probability mass


@torch.inference_mode()
def teacher_targets(target: PreTrainedModel, sequences: list[list[int]], top_k: int = TEACHER_TOP_K):
    """The target's top-k log-probabilities at every position, computed once for the whole corpus."""
    cached = []
    for seq in tqdm(sequences, desc="target scores the corpus once", unit="seq"):
        log_p = target(torch.tensor([seq], device=target.device)).logits[0].float().log_softmax(-1)
        values, index = log_p.topk(top_k, dim=-1)
        cached.append((values.cpu(), index.cpu()))
    return cached


def frequent_vocabulary(sequences: list[list[int]], vocab_size: int, size: int, always: list[int]) -> torch.Tensor:
    """The `size` token ids a restricted draft head keeps: `always`, then by corpus count, then by id."""
    counts = torch.bincount(torch.tensor([t for seq in sequences for t in seq]), minlength=vocab_size)[:vocab_size].float()
    # Ties (every unseen token) break towards low ids: BPE assigns them to its earliest, most frequent merges.
    score = counts - torch.arange(vocab_size) / vocab_size
    score[torch.tensor(always, dtype=torch.long)] = float("inf")
    return score.topk(min(size, vocab_size)).indices.sort().values


def sparse_kl(draft_logits: torch.Tensor, teacher_log_p: torch.Tensor, teacher_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(target || draft) over the target's top-k tokens, mean over real positions.

    draft_logits [B, T, K] over the draft head's rows; teacher_log_p [B, T, k]; teacher_index
    [B, T, k] are rows of the draft head, -1 where the target's token is not among them (its mass
    cannot be matched and is left out); mask [B, T].
    """
    inside = teacher_index >= 0
    draft_log_p = draft_logits.float().log_softmax(-1).gather(-1, teacher_index.clamp_min(0))
    per_position = (inside * teacher_log_p.exp() * (teacher_log_p - draft_log_p)).sum(-1)
    return (per_position * mask).sum() / mask.sum()


def _length_grouped(order: list[int], sequences: list[list[int]], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of similar length from a shuffled order, in shuffled batch order.

    Every batch is padded to its longest sequence; grouping neighbours by length within windows of
    a few batches cuts the padded positions the draft computes on (their loss is masked anyway)
    while keeping the sampling random.
    """
    window = 8 * batch_size
    batches = []
    for start in range(0, len(order) - batch_size + 1, window):
        chunk = sorted(order[start : start + window], key=lambda i: len(sequences[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _batches(sequences: list[list[int]], teacher, batch_size: int, pad: int, generator: torch.Generator,
             starts: list[int] | None = None):
    """Endless shuffled batches; a corpus smaller than one batch makes every batch the whole corpus.
    The loss mask of sequence i covers positions starts[i] onwards (default: all)."""
    if not sequences:
        raise ValueError("no sequences to distil on")
    top_k = teacher[0][0].shape[-1]
    batch_size = min(batch_size, len(sequences))
    while True:
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for chosen in _length_grouped(order, sequences, batch_size, generator):
            length = max(len(sequences[i]) for i in chosen)
            ids = torch.full((batch_size, length), pad)
            mask = torch.zeros(batch_size, length)
            log_p = torch.zeros(batch_size, length, top_k)
            index = torch.zeros(batch_size, length, top_k, dtype=torch.long)
            for row, i in enumerate(chosen):
                n = len(sequences[i])
                ids[row, :n] = torch.tensor(sequences[i])
                mask[row, (starts[i] if starts else 0) : n] = 1
                log_p[row, :n], index[row, :n] = teacher[i]
            yield ids, mask, log_p, index


def distill(target: PreTrainedModel, draft: PreTrainedModel, sequences: list[list[int]], steps: int, pad: int,
            batch_size: int = 8, lr: float = 3e-4, seed: int = 0, head_vocab: torch.Tensor | None = None,
            starts: list[int] | None = None) -> float:
    """Train the draft's layers to match the target's next-token distributions; returns the last KL (EMA).

    `starts[i]`: the first position of sequence i whose prediction is learned (a chat prompt's
    last token, so the draft learns the target's answers rather than the request it was given).

    The embedding and output head stay frozen (they are the target's, shared or tied), so only
    what the truncation changed is trained. With `head_vocab` [K], the draft is trained as it
    will draft: predicting over those tokens only.
    """
    teacher = teacher_targets(target, sequences)
    weight = draft.get_output_embeddings().weight
    vocab_size = weight.shape[0]
    head = DraftHead(weight.detach() if head_vocab is None else weight.detach()[head_vocab], head_vocab, vocab_size)
    row_of = torch.arange(vocab_size)  # full-vocabulary id -> head row (-1: not in the head)
    if head_vocab is not None:
        row_of = torch.full((vocab_size,), -1, dtype=torch.long).index_copy_(0, head_vocab.cpu(), torch.arange(len(head_vocab)))
    generator = torch.Generator().manual_seed(seed)
    draft.get_input_embeddings().weight.requires_grad_(False)
    draft.get_output_embeddings().weight.requires_grad_(False)
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    draft.train()
    ema = float("nan")
    batches = _batches(sequences, teacher, batch_size, pad, generator, starts)
    with tqdm(range(steps), desc="distilling the draft", unit="step") as bar:
        for _ in bar:
            ids, mask, log_p, index = next(batches)
            logits = head.logits(draft_hidden(draft, ids.to(draft.device), attention_mask=mask.long().to(draft.device)))
            loss = sparse_kl(logits, log_p.to(draft.device), row_of[index].to(draft.device), mask.to(draft.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            ema = loss.item() if math.isnan(ema) else 0.9 * ema + 0.1 * loss.item()
            bar.set_postfix(kl=f"{ema:.3f}")
    draft.eval()
    return ema


@torch.inference_mode()
def greedy_agreement(target: PreTrainedModel, draft: PreTrainedModel, sequences: list[list[int]],
                     head_vocab: torch.Tensor | None = None) -> tuple[float, float]:
    """Held-out text: the fraction of positions where draft and target pick the same next token,
    and the fraction where the target's pick is a token the draft's head can propose at all."""
    weight = draft.get_output_embeddings().weight
    head = DraftHead(weight if head_vocab is None else weight[head_vocab], head_vocab, weight.shape[0])
    in_head = torch.ones(weight.shape[0], dtype=torch.bool)
    if head_vocab is not None:
        in_head = torch.zeros_like(in_head).index_fill_(0, head_vocab.cpu(), True)
    agree = covered = total = 0
    for seq in sequences:
        ids = torch.tensor([seq], device=draft.device)
        expected = target(ids).logits.argmax(-1)[0].cpu()
        rows = head.logits(draft_hidden(draft, ids)).argmax(-1)[0].cpu()
        proposed = rows if head_vocab is None else head_vocab.cpu()[rows]
        agree += int((proposed == expected).sum())
        covered += int(in_head[expected].sum())
        total += len(seq)
    return agree / max(total, 1), covered / max(total, 1)


@torch.inference_mode()
def measured_acceptance(target: PreTrainedModel, draft: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        prompts: list[str], new_tokens: int) -> float:
    """Acceptance rate of greedy speculative decoding (gamma 4) with this draft."""
    from paretoray.actors.techniques import build_technique

    technique = build_technique("specdec", {"gamma": 4})
    drafted = accepted = 0
    for prompt in prompts:
        ids = tokenizer(as_chat(tokenizer, prompt), return_tensors="pt").input_ids.to(target.device)
        stats = technique.generate(target, ids, new_tokens, draft=draft).stats
        drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
    return accepted / max(drafted, 1)


def train_draft(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, layers: int = 4,
                steps: int = 300, prompts: int = 192, passages: int = 192, new_tokens: int = 64, batch_size: int = 8,
                head_vocab: int = 8192, seed: int = 0) -> DraftReport:
    """Build, distil and save a draft in `out`; `head_vocab` 0 keeps the full output layer.

    Corpus: the target's sampled answers to `prompts` chat requests (learned on the answer) plus
    `passages` stretches of prose and code (learned everywhere), each cut to `new_tokens` + 32 tokens."""
    started = time.perf_counter()
    requests = corpus.chat_prompts(prompts, seed)
    answered = sample_corpus(target, tokenizer, requests, new_tokens, 2 * batch_size, seed)
    # A chat sequence is learned from its prompt's last position on (the target's answer); a passage
    # of prose or code everywhere.
    starts = [len(tokenizer(as_chat(tokenizer, r)).input_ids) - 1 for r in requests] + [0] * passages
    sequences = answered + [tokenizer(text).input_ids[: new_tokens + 32] for text in corpus.passages(passages, seed)]
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed)).tolist()
    sequences, starts = [sequences[i] for i in order], [starts[i] for i in order]
    held = len(sequences) // 10
    held_out, train, train_starts = sequences[:held], sequences[held:], starts[held:]
    vocab_size = target.get_output_embeddings().weight.shape[0]
    vocab = None
    if 0 < head_vocab < vocab_size:
        vocab = frequent_vocabulary(train, vocab_size, head_vocab, tokenizer.all_special_ids).to(target.device)
    draft = truncated_copy(target, layers).to(target.device)
    kl = distill(target, draft, train, steps, tokenizer.pad_token_id, batch_size, seed=seed, head_vocab=vocab,
                 starts=train_starts)
    agreement, coverage = greedy_agreement(target, draft, held_out, vocab)
    out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if vocab is not None:
        from safetensors.torch import save_file

        save_file({"token_ids": vocab.cpu().contiguous()}, str(out / DRAFT_VOCAB))
    # Measured as actors will load it: from its folder, so its head vocabulary applies.
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(target.device).eval()
    templates = [p for k in PROMPT_SETS for p in make_prompts(k, 2, seed + 1)]
    report = DraftReport(
        layers=layers, target_layers=target.config.num_hidden_layers, steps=steps, corpus_sequences=len(sequences),
        head_vocab=len(vocab) if vocab is not None else vocab_size, head_vocab_coverage=coverage, final_kl=kl,
        greedy_agreement=agreement,
        acceptance_rate=measured_acceptance(target, saved, tokenizer, templates, new_tokens // 2),
        acceptance_rate_unseen=measured_acceptance(target, saved, tokenizer, list(corpus.UNSEEN_CHAT), new_tokens // 2),
        train_s=time.perf_counter() - started,
    )
    (out / "draft_report.json").write_text(json.dumps(asdict(report), indent=1))
    return report
