"""Things a model reference or a technique needs that must be built first: a registry draft, a MoA plan,
DuoAttention's gates.

The actors never build them: they ask `provide(kind, **key)` for a path. Whoever owns the recipes
(`paretoray.recipes`) installs builders in the process first; the controller hands its builders to
every actor it starts, so an actor builds on first use (once per machine, under the recipe's own
lock) without the actor package importing any training code. With no builder installed, a request
fails with the command that builds the artifact ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Builder = Callable[..., Path]

_BUILDERS: dict[str, Builder] = {}

HOW_TO_BUILD = {
    "registry_draft": "paretoray train-draft (then paretoray train-acceptance-head)",
    "moa_plan": "paretoray moa profile, then paretoray moa plan",
    "duo_gates": "python -m paretoray.recipes.duo --model MODEL",
}


class ArtifactMissing(RuntimeError):
    """No builder is installed for an artifact this process was asked for."""


def install(builders: Mapping[str, Builder] | None) -> None:
    """Make `builders` (kind -> function returning the artifact's path) answer `provide` in this process."""
    _BUILDERS.update(builders or {})


def installed() -> dict[str, Builder]:
    return dict(_BUILDERS)


def provide(kind: str, **key: Any) -> Path:
    """The path of the artifact `kind` identified by `key`, built by the installed builder if needed."""
    try:
        builder = _BUILDERS[kind]
    except KeyError:
        how = HOW_TO_BUILD.get(kind, "its recipe in paretoray.recipes")
        raise ArtifactMissing(f"no builder for {kind} ({key}) in this process: build it ahead with {how}") from None
    return builder(**key)
