"""Offline builds: a draft distilled from its target, SpecDec++'s acceptance head, MoA's profile and plan,
DuoAttention's gates.

Used by the CLI (`paretoray train-draft`, `train-acceptance-head`, `moa profile|plan`) and by
first-use builds: `builders()` maps each artifact kind the actors may ask for
(`paretoray.actors.artifacts.provide`) to the function that builds it, once per machine, under a
file lock. The controller hands these to every actor it starts; the actor package itself never
imports this package.
"""

from __future__ import annotations

from paretoray.actors.artifacts import Builder


def builders() -> dict[str, Builder]:
    """Artifact kind -> builder, for `paretoray.actors.artifacts.install`."""
    from paretoray.recipes import build

    return dict(build.BUILDERS)
