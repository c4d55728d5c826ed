"""First-use builds: each builder makes its artifact once per machine (one process builds under a
file lock, the others wait for it), says so on stderr, and returns the artifact's path."""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from paretoray.actors.artifacts import Builder
from paretoray.actors.registry import RECIPE_FILE, recipe_stamp
from paretoray.paths import cache_root


@contextmanager
def machine_lock(folder: Path, name: str) -> Iterator[None]:
    """One process per machine builds `name` in `folder`; the others wait here for its result."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def registry_draft(name: str) -> Path:
    """The registry draft `name` (paretoray.actors.registry.DRAFTS) and its acceptance head, built on
    first use (minutes on a CPU) and cached; a draft cached by another recipe, or distilled from
    another target (its `model_identity` is recorded beside it), is rebuilt."""
    from paretoray.actors.models import TARGET_FILE, draft_is_current, model_identity
    from paretoray.actors.registry import DRAFTS

    entry = DRAFTS[name]
    target = cache_root() / "models" / name
    recipe = recipe_stamp(entry)

    def built() -> bool:
        return draft_is_current(target, entry)

    if built():
        return target
    with machine_lock(target.parent, name):
        if built():
            return target
        import torch
        from transformers import AutoModelForCausalLM

        from paretoray.actors.models import load_model
        from paretoray.recipes.acceptance_head import train_acceptance_head
        from paretoray.recipes.draft import train_draft

        print(f"building the draft {name!r} once ({entry.description}); it is cached in {target}", file=sys.stderr, flush=True)
        model, tokenizer = load_model(entry.target, dtype="float32")
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        train_draft(model, tokenizer, staging, layers=entry.layers, steps=entry.steps, prompts=entry.prompts,
                    passages=entry.passages, new_tokens=entry.new_tokens, head_vocab=entry.head_vocab, seed=entry.seed)
        draft = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).to(model.device).eval()
        train_acceptance_head(model, draft, tokenizer, staging, prompts=entry.head_prompts, steps=entry.head_steps,
                              temperature=entry.head_temperature, seed=entry.seed)
        (staging / TARGET_FILE).write_text(json.dumps({"target": entry.target, "identity": model_identity(model)}))
        (staging / RECIPE_FILE).write_text(recipe)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


BUILDERS: dict[str, Builder] = {"registry_draft": registry_draft}


def _moa_plan(model, density: float, lengths: list[int]):
    """MoA's plan for a density at the lengths a trial serves (profiling the model first if needed)."""
    from paretoray.recipes.moa import build_plan

    return build_plan(model, density, lengths)


BUILDERS["moa_plan"] = _moa_plan


def _duo_gates(model):
    """DuoAttention's gates for the model (trained first if this machine has none)."""
    from paretoray.recipes.duo import build_gates

    return build_gates(model)


BUILDERS["duo_gates"] = _duo_gates
