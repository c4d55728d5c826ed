"""Offline tiny tokenizer and Llama checkpoint for tests (no Hugging Face hub access)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from paretoray.actors.tasks import multikey_niah as _mk
from paretoray.actors.tasks import passkey as _pk
from paretoray.actors.tasks.haystack import FILLER

_TOKENIZER: PreTrainedTokenizerFast | None = None


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = [_pk.INTRO, _mk.INTRO, FILLER * 3, _pk.QUESTION, "0123456789"]
    for word in _mk.WORDS:
        number = rng.randint(1_000_000, 9_999_999)
        lines.append(_mk.NEEDLE.format(word=word, number=number))
        lines.append(_mk.QUESTION.format(word=word))
        lines.append(_pk.NEEDLE.format(key=rng.randint(10000, 99999)))
    return lines


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (~400 tokens) that, like SmolLM2's, splits every digit into its own token."""
    global _TOKENIZER
    if _TOKENIZER is None:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(), trainer=trainer)
        # Prepend BOS like Llama tokenizers do, so add_special_tokens=True matters.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
        )
    return _TOKENIZER


def save_tiny_llama(
    path: Path,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    max_position_embeddings: int = 4096,
) -> Path:
    """Save a randomly initialised float32 Llama plus the tiny tokenizer, loadable with Auto* classes."""
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Keep the caller's global RNG untouched while making the weights reproducible.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def noop_spec(model_dir: Path, name: str, *, trials: int, count: int, sleep_s: float, num_gpus: float = 0,
              spread: bool = False, retries: int = 1) -> dict:
    """A sweep of the `noop` technique (trials of known length, no model work) on the tiny model."""
    return {
        "name": name,
        "model": {"id": str(model_dir), "dtype": "float32"},
        "workload": {"task": "passkey", "context_lengths": [128], "samples_per_length": 1, "max_new_tokens": 2},
        "techniques": {"noop": {"sleep_s": sleep_s, "knob": {"low": 0.0, "high": 1.0}}},
        "objectives": {"latency_ms_per_token": "minimize", "accuracy": "maximize"},
        "sampler": {"name": "random", "seed": 0},
        "trials": trials,
        "actors": {"count": count, "num_cpus": 1, "num_gpus": num_gpus, "spread": spread, "max_trial_retries": retries},
    }
