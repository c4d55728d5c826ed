"""What the techniques declare, readable without importing torch: names, parameters, capabilities.

`paretoray sweep validate` and `paretoray techniques` need only the techniques' declarations (each
one's parameters with their kinds and ranges, its phase, its capability flags, its module's first
doc line), but the technique modules import torch and transformers (seconds on a small machine).
So the declarations are kept as a plain JSON file in the cache folder (`$PARETORAY_CACHE/declarations/`),
keyed by a digest of the sources they come from (every module of `paretoray/actors/` and
`paretoray/kernels/`) and of the installed torch and transformers versions. A miss imports the
registry once (slow), writes the file atomically, and answers from what it imported; a hit imports
nothing heavy. Where the registry is already imported (the controller, the actors, tests that
register a technique of their own), it is read directly: the file is never preferred over the live
registry. `PARETORAY_NO_DECLARATIONS_CACHE=1` turns the file off.

`Param` lives here (not in `techniques.base`) so that a declaration read from the file is the same
class the techniques declare with: validating a sweep gives the same answer either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from paretoray.paths import cache_root

ParamKind = Literal["int", "float", "categorical"]
FORMAT = 2  # bumped when the file's layout changes
_PACKAGES = ("torch", "transformers")  # installed versions that are part of the key
_TECHNIQUES = "paretoray.actors.techniques"


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a technique: its kind, the range it is meaningful in, its default."""

    kind: ParamKind
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    log: bool = False  # a natural log-scale range: sweeps default to sampling it on a log scale
    doc: str = ""

    def check(self, value: Any) -> str | None:
        """Return why `value` is not allowed, or None when it is."""
        if self.kind == "categorical":
            try:
                allowed = value in (self.choices or ())
            except TypeError:  # an unhashable or uncomparable value is no choice
                allowed = False
            return None if allowed else f"expected one of {list(self.choices or ())}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if isinstance(value, int) and not -(2**63) < value < 2**63:
            return f"expected a number of magnitude below 2**63, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        if self.kind == "int" and not float(value).is_integer():
            return f"expected an integer, got {value!r}"
        if self.low is not None and value < self.low:
            return f"expected >= {self.low}, got {value!r}"
        if self.high is not None and value > self.high:
            return f"expected <= {self.high}, got {value!r}"
        return None

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {list(self.choices or ())}"
        scale = ", log" if self.log else ""
        return f"{self.kind} in [{self.low}, {self.high}]{scale}"

    def field(self) -> Any:
        """This parameter as a dataclass field: its default, and itself in the field's metadata (where
        `register` finds it). Shared parameters are module-level `Param`s declared with `.field()`."""
        return dataclasses.field(default=self.default, metadata={"param": self})

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "default": self.default, "low": self.low, "high": self.high,
                "choices": None if self.choices is None else list(self.choices), "log": self.log, "doc": self.doc}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Param:
        choices = data["choices"]
        return cls(data["kind"], data["default"], data["low"], data["high"], None if choices is None else tuple(choices),
                   data["log"], data["doc"])


@dataclass(frozen=True)
class TechniqueDeclaration:
    """A registered technique as sweeps see it: no code, only what it declares."""

    name: str
    phase: str
    summary: str  # the first line of its module's docstring
    params: dict[str, Param]
    capabilities: dict[str, Any]  # Technique.capabilities(): uses_model, needs_draft, lossless, reports, ...

    @property
    def needs_draft(self) -> bool:
        return bool(self.capabilities.get("needs_draft"))

    @property
    def uses_model(self) -> bool:
        return bool(self.capabilities.get("uses_model", True))

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "summary": self.summary, "params": {k: p.to_json() for k, p in self.params.items()},
                "capabilities": self.capabilities}

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> TechniqueDeclaration:
        return cls(name, data["phase"], data["summary"], {k: Param.from_json(p) for k, p in data["params"].items()},
                   dict(data["capabilities"]))


def _declare(cls: Any) -> TechniqueDeclaration:
    doc = (sys.modules[cls.__module__].__doc__ if cls.__module__ in sys.modules else None) or ""
    lines = doc.strip().splitlines()
    return TechniqueDeclaration(cls.name, cls.phase, lines[0] if lines else "", dict(cls.params), cls.capabilities())


def _live() -> dict[str, TechniqueDeclaration]:
    from paretoray.actors.techniques import available_techniques

    return {name: _declare(cls) for name, cls in available_techniques().items()}


def _sources() -> list[Path]:
    package = Path(__file__).resolve().parents[1]  # paretoray/
    files = [*(package / "actors").rglob("*.py"), *(package / "kernels").rglob("*.py"), package / "paths.py"]
    return sorted(f for f in files if f.is_file())


@lru_cache(maxsize=1)
def cache_key() -> str:
    """Digest of what the declarations are derived from: the sources, the packages, the Python."""
    digest = hashlib.sha256(f"format {FORMAT}; python {sys.version_info[:2]}".encode())
    package = Path(__file__).resolve().parents[1]
    for path in _sources():
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in _PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{name}=={version}\0".encode())
    return digest.hexdigest()


def cache_file() -> Path:
    return cache_root() / "declarations" / f"techniques-{cache_key()[:32]}.json"


def _encode(declarations: dict[str, TechniqueDeclaration]) -> str:
    return json.dumps({"format": FORMAT, "key": cache_key(),
                       "techniques": {name: d.to_json() for name, d in declarations.items()}}, indent=1)  # in order


def _decode(text: str) -> dict[str, TechniqueDeclaration] | None:
    """The declarations in a cache file, or None when it is not one of this key (stale, torn, foreign)."""
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT or data.get("key") != cache_key():
            return None
        return {name: TechniqueDeclaration.from_json(name, body) for name, body in data["techniques"].items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _write(path: Path, declarations: dict[str, TechniqueDeclaration]) -> None:
    """Written aside and renamed (several processes may miss at once); only when it reads back equal,
    so a declaration JSON cannot carry (a tuple default, say) is never answered from the file."""
    try:
        text = _encode(declarations)
        if _ordered(_decode(text)) != _ordered(declarations):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".techniques-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(staging, path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
        for old in path.parent.glob("techniques-*.json"):  # other keys: older sources, other checkouts
            if old != path and old.stat().st_mtime < path.stat().st_mtime - 30 * 86400:
                old.unlink(missing_ok=True)
    except (OSError, TypeError, ValueError):
        pass  # a read-only cache folder: answer from the live registry every time


def _ordered(declarations: dict[str, TechniqueDeclaration] | None) -> Any:
    """Declarations compared with their order (a technique's parameters are listed in field order)."""
    if declarations is None:
        return None
    return [(name, d, list(d.params)) for name, d in declarations.items()]


_FROM_FILE: dict[str, dict[str, TechniqueDeclaration]] = {}


def technique_declarations(names: Any = ()) -> dict[str, TechniqueDeclaration]:
    """Every registered technique's declaration, sorted by name (as `available_techniques`), plus
    the compositions among `names` (`outer+inner`) that are valid (an invalid one is left out:
    `composition_declaration` says why)."""
    if _TECHNIQUES in sys.modules or os.environ.get("PARETORAY_NO_DECLARATIONS_CACHE", "") not in ("", "0"):
        registry = _live()
    else:
        registry = cached_declarations()
    composed = {}
    for name in names:
        if "+" in name and name not in registry:
            try:
                composed[name] = composition_declaration(name, registry)
            except CompositionError:
                pass
    return {**registry, **composed} if composed else registry


# ---- compositions: a technique built from techniques ------------------------------------------


class CompositionError(ValueError):
    """A composition that names an unknown member or pairs members that do not fit; says why."""


SEPARATOR = "."  # a member's parameter in the composition: `member.param`


def composition_declaration(name: str, registry: dict[str, TechniqueDeclaration]) -> TechniqueDeclaration:
    """`outer+inner[+...]`: the first member takes the rest as its member (kv_quant+snapkv: SnapKV
    chooses what is kept, kv_quant stores it quantized; self_spec+snapkv: the model drafts over a
    SnapKV cache of itself). Each member but the last must `accept` what the next `provides`, and
    the next must declare what the outer's `member_requires`. The composition's parameters are its
    members' (`member.param`); its capabilities follow from theirs."""
    parts = name.split("+")
    unknown = [part for part in parts if part not in registry]
    if unknown or len(parts) < 2:
        raise CompositionError(f"{name}: unknown member(s) {unknown}; available: {', '.join(registry)}" if unknown
                               else f"{name}: a composition names two or more techniques joined by '+'")
    if len(set(parts)) != len(parts):
        raise CompositionError(f"{name}: a technique appears twice")
    members = [registry[part] for part in parts]
    inner = members[-1]
    for outer in reversed(members[:-1]):
        caps, inner_caps = outer.capabilities, inner.capabilities
        accepts = caps.get("accepts", "")
        if not accepts:
            if len(parts) == 2 and registry[parts[1]].capabilities.get("accepts"):
                raise CompositionError(f"{name}: {outer.name} takes no member; the outer technique comes first: "
                                       f"{parts[1]}+{parts[0]}")
            takers = [d.name for d in registry.values() if d.capabilities.get("accepts")]
            raise CompositionError(f"{name}: {outer.name} takes no member; write the technique that takes one first "
                                   f"(outer+inner; techniques that take a member: {', '.join(takers) or 'none'})")
        if accepts not in inner_caps.get("provides", []):
            raise CompositionError(f"{name}: {outer.name} takes a {accepts} technique as its member; {inner.name} is not one")
        for flag, (value, why) in caps.get("member_requires", {}).items():
            if inner_caps.get(flag) != value:
                raise CompositionError(f"{name}: {outer.name} cannot take {inner.name}: {why}")
        inner = _combined(outer, inner)
    return TechniqueDeclaration(name, inner.phase, inner.summary, inner.params, inner.capabilities)


def _combined(outer: TechniqueDeclaration, inner: TechniqueDeclaration) -> TechniqueDeclaration:
    o, i = outer.capabilities, inner.capabilities
    params = {f"{outer.name}{SEPARATOR}{k}": p for k, p in outer.params.items()}
    params.update(inner.params if "+" in inner.name else {f"{inner.name}{SEPARATOR}{k}": p for k, p in inner.params.items()})
    lossless = bool(o.get("lossless")) and (not o.get("member_shapes_output", True) or bool(i.get("lossless")))
    capabilities = {
        **o,
        "uses_model": bool(o.get("uses_model", True)) and bool(i.get("uses_model", True)),
        "needs_draft": bool(o.get("needs_draft")) or bool(i.get("needs_draft")),
        "lossless": lossless,
        "is_reference": False,
        "measures_fidelity": not lossless,
        "reports": list(dict.fromkeys([*o.get("reports", []), *i.get("reports", [])])),
        "trial_timeout_s": max(float(o.get("trial_timeout_s", 3600.0)), float(i.get("trial_timeout_s", 3600.0))),
        "static_decode": bool(o.get("static_decode")) and bool(i.get("static_decode")),
        "decode_evicts": bool(o.get("decode_evicts")) or bool(i.get("decode_evicts")),
        "context_only": bool(o.get("context_only", True)) and bool(i.get("context_only", True)),
        "context_only_note": o.get("context_only_note") or i.get("context_only_note", ""),
        "members": [outer.name, *(inner.capabilities.get("members") or [inner.name])],
    }
    if "batched" in o or "batched" in i:
        capabilities["batched"] = bool(o.get("batched", True)) and bool(i.get("batched", True))
        capabilities["batch_note"] = "" if capabilities["batched"] else (o.get("batch_note") or i.get("batch_note", ""))
    summary = f"{outer.name} over {inner.name}: {outer.summary}"
    return TechniqueDeclaration(f"{outer.name}+{inner.name}", outer.phase, summary, params, capabilities)


def cached_declarations() -> dict[str, TechniqueDeclaration]:
    """The declarations from the cache file; on a miss (none, stale, unreadable) from the registry,
    imported once, and written for the next process."""
    key = cache_key()
    if key not in _FROM_FILE:
        path = cache_file()
        found = None
        try:
            if path.stat().st_size < 4 << 20:
                found = _decode(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            pass
        if found is None:
            found = _live()
            _write(path, found)
            return found
        _FROM_FILE[key] = found
    return _FROM_FILE[key]
