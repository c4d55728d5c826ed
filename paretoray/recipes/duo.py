"""DuoAttention's offline half: learn which KV heads are retrieval heads, with the model frozen.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads" (ICLR 2025; reference code mit-han-lab/duo-attention, duo_attn/train.py, data.py, loss.py,
patch/llama.py). Used by the first-use build the actors ask for (`build_gates`, kind "duo_gates")
and by `python -m paretoray.recipes.duo`. The file format the actors read is
`paretoray.actors.duo_gates.Gates`.

Training, as the reference: every KV head h of layer l gets a gate a in [0, 1] (initially 1).
The training forward mixes, per head, full causal attention and streaming attention (query i sees
key j iff j <= i and (j < sinks or i - j < recent)): out = a * full + (1 - a) * streaming, for
the query heads reading that KV head. The loss is the distillation of the full model's final
hidden states (after the last norm) at the question-and-answer positions,
mean_positions(mean_hidden((h_full - h_mixed)^2)), plus reg_weight * mean |a| (L1). Only the gates
train (AdamW, lr 0.02, no weight decay, the reference's schedule: linear warm-up and cool-down over
a fifth of the steps each, floored at 0.1); they are clamped to [0, 1] before every step.

Data, as the reference's multi-passkey set: passkeys of random NATO-alphabet words, each behind
"...the {ordinal} passkey to the vault: " at sorted random depths in [0.05, 0.95] of a haystack,
then for each passkey its question followed by the passkey; the loss reads every question and
answer token. The haystack is the project's own (`tasks.haystack.essay_sentences`: prose that
ships with Python), not BookSum: nothing is downloaded. Prompt wording is ours.

Scaled for a CPU (the reference: 2000 steps at 1K-32K tokens, 10 passkeys of 32 words, sinks 128
and recent 256 while training, 64 and 256 deployed, on 8 GPUs): `Recipe`'s defaults train 100
steps at 256-384 tokens with 3 passkeys of 6 words and a 32 + 128 streaming band, so that a
streaming head still loses most of the haystack. A step is three passes of the model (the full
forward, the mixed forward, its backward): for SmolLM2-135M several seconds on an idle 2-core CPU,
over a minute on a heavily shared one. Every setting is a `Recipe` field.

Cache (`duo_folder`). Gates are kept under `$PARETORAY_CACHE/duo/NAME-IDENTITY/gates.json`,
IDENTITY being `paretoray.actors.models.model_identity` (a digest of config and weights), as
MoA's profiles: plain JSON recording that identity, the recipe and the loss per step. A file that
does not parse, or was trained on another model, is trained again by the first-use build.
"""

from __future__ import annotations

import argparse
import fcntl
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase

from paretoray.actors.duo_gates import Gates
from paretoray.actors.generation import attention_installed
from paretoray.actors.models import model_identity
from paretoray.actors.tasks.haystack import essay_sentences
from paretoray.actors.techniques.elastic_attention import kv_heads
from paretoray.kernels.sliding_window_prefill import _allowed as streaming_mask
from paretoray.paths import cache_root

__all__ = ["DEFAULT_RECIPE", "Recipe", "Sample", "passkey_sample", "train_gates", "build_gates", "duo_folder", "GATES_FILE"]

GATES_FILE = "gates.json"  # in duo_folder(model)
ATTENTION = "paretoray_duo_train"

NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
        "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
        "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
INTRO = "Below is a long book. <book> "
OUTRO = " </book>\n\n"
NEEDLE = "Keep these words in mind, they are the {ordinal} passkey to the vault: "
QUESTION = "In the book above, what is the {ordinal} passkey to the vault?\nPasskey: "
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Recipe:
    """Training settings (see the module doc for the reference's values)."""

    steps: int = 100
    min_length: int = 256  # tokens per sample, drawn uniformly in [min_length, max_length]
    max_length: int = 384
    sink_size: int = 32  # the streaming band while training
    recent_size: int = 128
    passkeys: int = 3  # per sample, at most len(ORDINALS)
    passkey_words: int = 6
    lr: float = 0.02
    reg_weight: float = 0.05  # lambda of the L1 term
    initial_value: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.passkeys <= len(ORDINALS):
            raise ValueError(f"passkeys must be in [1, {len(ORDINALS)}], got {self.passkeys}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if self.steps < 1 or self.recent_size < 1 or self.sink_size < 0 or self.passkey_words < 1:
            raise ValueError("steps, recent_size and passkey_words must be >= 1, sink_size >= 0")


DEFAULT_RECIPE = Recipe()  # what the first-use build trains with


# ---- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    ids: torch.Tensor  # [1, N]
    answer: torch.Tensor  # [N] bool: the question-and-answer positions the loss reads


def haystack(tokenizer: PreTrainedTokenizerBase, tokens: int, rng: random.Random) -> list[int]:
    """`tokens` tokens of shipped prose, from a random sentence on (wrapping around)."""
    sentences = essay_sentences()
    at, text, ids = rng.randrange(len(sentences)), "", []
    while len(ids) < tokens:
        text += "".join(sentences[(at + i) % len(sentences)] for i in range(64))
        at += 64
        ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[:tokens]


def passkey_sample(tokenizer: PreTrainedTokenizerBase, length: int, recipe: Recipe, rng: random.Random) -> Sample:
    """A `length`-token prompt: passkeys hidden in a haystack, then each asked for and answered."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    keys = [encode(" ".join(rng.choice(NATO) for _ in range(recipe.passkey_words))) for _ in range(recipe.passkeys)]
    gap = encode(SEPARATOR)
    needles = [gap + encode(NEEDLE.format(ordinal=ORDINALS[i])) + key + gap for i, key in enumerate(keys)]
    qa = [t for i, key in enumerate(keys) for t in encode(QUESTION.format(ordinal=ORDINALS[i])) + key + gap]
    intro, outro = tokenizer(INTRO).input_ids, encode(OUTRO)  # the intro with the tokenizer's BOS, as the reference
    room = length - len(intro) - len(outro) - len(qa) - sum(map(len, needles))
    if room < 1:
        raise ValueError(f"{length} tokens cannot hold {recipe.passkeys} passkeys of {recipe.passkey_words} words "
                         f"and their questions ({length - room} tokens): raise min_length or use fewer passkeys")
    hay = haystack(tokenizer, room, rng)
    context, last = [], 0
    for depth, needle in zip(sorted(rng.uniform(0.05, 0.95) for _ in keys), needles):
        at = int(room * depth)
        context += hay[last:at] + needle
        last = at
    ids = intro + context + hay[last:] + outro + qa
    answer = torch.zeros(len(ids), dtype=torch.bool)
    answer[len(ids) - len(qa):] = True
    return Sample(torch.tensor([ids]), answer)


# ---- the training forward -----------------------------------------------------------------------


@dataclass
class _Mixing:
    gates: torch.Tensor  # [layers, kv_heads], the leaf being trained
    sinks: int
    recent: int
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # length -> [N, N] streaming band

    def band(self, n: int, device: torch.device) -> torch.Tensor:
        if n not in self.masks:
            self.masks[n] = streaming_mask(n, self.recent, self.sinks, device)
        return self.masks[n]


_MIXING: ContextVar[_Mixing | None] = ContextVar("duo_mixing", default=None)


def mixed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Per KV head, gate * full causal attention + (1 - gate) * streaming attention.
    query [B, Hq, N, D]; key, value [B, Hkv, N, D] -> [B, N, Hq, D]."""
    mixing = _MIXING.get()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    full = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    streaming = sdpa(query, key, value, attn_mask=mixing.band(query.shape[-2], query.device), scale=scaling, enable_gqa=True)
    gate = mixing.gates[module.layer_idx].clamp(0, 1).repeat_interleave(query.shape[1] // key.shape[1])
    gate = gate.to(query.dtype)[None, :, None, None]  # [1, Hq, 1, 1]
    return (streaming + gate * (full - streaming)).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, mixed_attention)  # no mask function: the band is built here


@contextmanager
def mixing(model: PreTrainedModel, gates: torch.Tensor, sinks: int, recent: int) -> Iterator[None]:
    """The model's attention replaced by the gated mixture for the duration."""
    token = _MIXING.set(_Mixing(gates, sinks, recent))
    try:
        with attention_installed(model, ATTENTION):
            yield
    finally:
        _MIXING.reset(token)


def distillation_loss(model: PreTrainedModel, sample: Sample, gates: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Mean over answer positions of the mean squared difference of the final hidden states,
    full model against the gated mixture (differentiable in the gates only)."""
    base, ids = model.base_model, sample.ids.to(model.device)
    with torch.no_grad():
        target = base(input_ids=ids, use_cache=False).last_hidden_state[0, sample.answer]  # [A, hidden]
    with mixing(model, gates, recipe.sink_size, recipe.recent_size):
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state[0, sample.answer]
    return (hidden.float() - target.float()).pow(2).mean(-1).mean()


def train_gates(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: Recipe = DEFAULT_RECIPE) -> Gates:
    """The model's gates, trained with its weights frozen (and left as they were: requires_grad,
    attention implementation, train/eval mode)."""
    started = time.perf_counter()
    shape = (model.config.num_hidden_layers, kv_heads(model))
    gates = torch.full(shape, recipe.initial_value, dtype=torch.float32, device=model.device, requires_grad=True)
    optimizer = torch.optim.AdamW([gates], lr=recipe.lr, weight_decay=0.0)
    ramp = max(1, recipe.steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, max((step + 1) / ramp, 0.1), max((recipe.steps - step) / ramp, 0.1)))
    rng = random.Random(f"duo/{recipe.seed}")
    history = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # gradients reach the gates only
    try:
        with torch.inference_mode(False), torch.enable_grad():  # a caller's inference mode would forbid backward
            for _ in tqdm(range(recipe.steps), desc="training DuoAttention gates", unit="step"):
                with torch.no_grad():
                    gates.clamp_(0, 1)
                sample = passkey_sample(tokenizer, rng.randint(recipe.min_length, recipe.max_length), recipe, rng)
                distill = distillation_loss(model, sample, gates, recipe)
                l1 = gates.abs().mean()
                optimizer.zero_grad()
                (distill + recipe.reg_weight * l1).backward()
                optimizer.step()
                schedule.step()
                history.append([distill.detach().item(), l1.detach().item()])
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return Gates(gates.detach().clamp(0, 1).cpu().tolist(), model_identity(model), name=str(model.name_or_path),
                 recipe=asdict(recipe), history=history, seconds=time.perf_counter() - started)


# ---- first-use build ----------------------------------------------------------------------------


def duo_folder(model: PreTrainedModel | str | Path) -> Path:
    """Where a model's gates are cached: its folder's (or hub name's) last part, for people, plus
    its identity, so two models in folders of the same name get two caches."""
    ref = str(model) if isinstance(model, (str, Path)) else str(getattr(model, "name_or_path", "") or "")
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(ref).expanduser().name) or "model"
    return cache_root() / "duo" / f"{name}-{model_identity(model)[:16]}"


def _usable(path: Path, identity: str) -> bool:
    """A gates file that parses and was trained on this model."""
    try:
        return path.exists() and Gates.load(path).model == identity
    except (OSError, ValueError, TypeError):
        return False  # torn, tampered or of an earlier version: trained again


def build_gates(model: PreTrainedModel, recipe: Recipe | None = None) -> Path:
    """The model's gates file, trained by `recipe` (default `DEFAULT_RECIPE`) if this machine has
    none usable. One process trains under a file lock; others wait."""
    recipe = recipe or DEFAULT_RECIPE
    identity = model_identity(model)
    folder = duo_folder(model)
    path = folder / GATES_FILE
    if _usable(path, identity):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _usable(path, identity):
            print(f"duo: training {model.name_or_path}'s gates once ({recipe.steps} steps); cached in {folder}",
                  file=sys.stderr, flush=True)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model.name_or_path))
            train_gates(model, tokenizer, recipe).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m paretoray.recipes.duo --model MODEL`: train a model's gates ahead of its first trial."""
    defaults = DEFAULT_RECIPE
    parser = argparse.ArgumentParser(prog="python -m paretoray.recipes.duo", description=main.__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="registry name, folder or hub id")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, help="gates JSON (default: where the duo_attention technique looks)")
    args = vars(parser.parse_args(argv))
    from paretoray.actors.models import load_model

    model_ref, out = args.pop("model"), args.pop("out")
    model, tokenizer = load_model(model_ref, dtype="float32")
    gates = train_gates(model, tokenizer, Recipe(**args))
    out = out or duo_folder(model) / GATES_FILE
    gates.save(out)
    first, last = gates.history[0], gates.history[-1]
    print(f"gates of {model_ref} trained in {gates.seconds:.0f} s (distillation {first[0]:.4g} -> {last[0]:.4g}, "
          f"mean gate {first[1]:.3f} -> {last[1]:.3f}); saved in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
