"""MoA's offline half: profile each head's sensitivity to sparse masks, then search a plan.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv:2406.14909; reference code thu-nics/MoA). Used by `paretoray moa profile|plan` and by the
first-use build the actors ask for (`build_plan`, kind "moa_plan"). The plan format the actors read
(`Plan`, `Rule`, `BLOCK`) is `paretoray.actors.moa_plan`. What follows the reference, and where it
differs:

Profiling (`profile_model`). Calibration: long documents with the model's own greedy response to
a question about them (the reference uses MultiNews articles with model-generated summaries; we
use the Python standard library's documentation, which ships with every interpreter, so nothing is
downloaded). Loss: mean cross-entropy over the response tokens only. For every attention matrix A
(one per layer and head) and its gradient G = dL/dA, the influence of masking each value is
|A * (G - sum_j A*G) / (eps + 1 - A)| (the first-order loss change when that value is dropped and
its row renormalised; eps as the reference's bf16 epsilon, 2^-7), averaged over samples, at each
profiled length. The reference sums it into 64x64 blocks, because its prefill kernel masks whole
blocks. Ours masks tokens (query i sees key j iff j < 64 or i - j < span), so the profile sums it by
query-key distance over the keys past the sink block: the loss of a span S at length N is then
exactly the influence of the values the served mask drops, sum over d >= S.

Candidates. A rule (alpha, beta) keeps, at length N with nb = ceil(N / 64) blocks, a span of
max(1, int(alpha // 64 + beta * nb)) blocks of recent tokens plus the 64-token sink block. alpha runs
over multiples of `alpha_step` from about -min(lengths) to the longest profiled length, beta over
linspace(0, 1, 9), as in the reference. A rule is dropped when it vanishes at the shortest length,
or its span exceeds the longest length served or the extension length (the reference's filter at
its longest profiled and extension lengths). Rules that keep the same tokens at every profiled,
served and extension length are one candidate.

Plan search (`search_plan`). One rule per head minimising the summed loss over the profiled
lengths, with the mean density over all heads at most `density` at every length served and at the
extension length (by default twice the longest served length, as the reference constrains 16K
beside its 2K-8K profile), at least 0.9 x `density` at every length served, and at most
`rules_per_layer` distinct rules per layer (the reference's 2): a mixed-integer program solved by
HiGHS through scipy.optimize.milp. The reference instead enumerates an epsilon-constraint Pareto
set over the lengths (Gurobi) and picks the plan with the lowest validation perplexity; a single
weighted objective is the cheaper stand-in.

GQA. The reference expands GQA models to one KV head per query head before profiling. Here a
plan is per KV head: the cache, which is what the plan saves, is per KV head, so the influences of
a group's query heads are summed and the group shares one rule.

Cache (`moa_folder`). Profiles and plans are kept under `$PARETORAY_CACHE/moa/NAME-IDENTITY/`,
IDENTITY being `paretoray.actors.models.model_identity` (a digest of the model's config and
weights), so models in folders of the same name never share a profile. The profile is plain
tensors and numbers, saved with torch.save and read with torch.load(weights_only=True): a file that
would need code run to load it is refused unread; it records the model's identity, and a profile
of another model is refused. Plans are JSON and record the identity too. The first-use build
profiles again when the cached profile is refused.
"""

from __future__ import annotations

import fcntl
import pydoc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from paretoray.actors.models import model_identity
from paretoray.actors.moa_plan import BLOCK, Plan, Rule
from paretoray.actors.prompts import as_chat
from paretoray.paths import cache_root

__all__ = ["BLOCK", "Plan", "Rule", "Profile", "ProfileError", "profile_model", "search_plan", "candidate_rules",
           "build_plan", "moa_folder"]

DEFAULT_LENGTHS = [1024, 2048]  # what a CPU profiles in minutes; the reference profiles 2K/4K/8K on GPUs
EPS = 2.0**-7  # the reference's eps: bf16's machine epsilon, where its profiles are computed
BETAS = tuple(float(b) for b in np.linspace(0, 1, 9))
DOC_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "re",
               "subprocess", "threading", "typing", "unittest", "datetime", "decimal", "email", "http.client")
QUESTION = "Summarize the documentation above in a few sentences."
PROFILE_FORMAT = "distance"  # influence summed by query-key distance (earlier profiles: 64x64 blocks)
PROFILE_FILE = "profile.pt"  # in moa_folder(model): torch.save of plain tensors and numbers, read with weights_only=True


def extension_length(lengths: list[int]) -> int:
    """The longer length a plan is also held to its budget at: twice the longest length served
    (the reference's 16K beside 2K-8K)."""
    return 2 * max(lengths)


def _kept_span(rule: Rule, n: int) -> int:
    """Tokens of recent context the rule keeps at n, capped where it keeps the whole prompt."""
    return min(rule.span(n), max(n - BLOCK, 0))


def candidate_rules(profiled: list[int], served: list[int] | None = None, extend_length: int | None = None,
                    alpha_step: int = 512) -> list[Rule]:
    """The rules a plan chooses from (see the module doc), ordered by span at the extension length."""
    served = sorted(set(served or profiled))
    extend = extend_length or extension_length(served)
    low, longest = min(*profiled, *served), max(served)
    relevant = sorted(set(profiled) | set(served) | {extend})
    distinct: dict[tuple[int, ...], Rule] = {}
    for alpha in range(-(low // alpha_step) * alpha_step, max(profiled) + 1, alpha_step):
        for beta in BETAS:
            if alpha + beta * low <= 0 or alpha + beta * longest > longest or alpha + beta * extend > extend:
                continue
            rule = Rule(alpha, beta)
            distinct.setdefault(tuple(_kept_span(rule, n) for n in relevant), rule)
    return sorted(distinct.values(), key=lambda r: (r.span(extend), r.alpha))


# ---- calibration data ---------------------------------------------------------------------------


def documentation(module: str) -> str:
    """The plain-text pydoc page of a standard-library module: long natural text, always offline."""
    return pydoc.plain(pydoc.render_doc(module, renderer=pydoc.plaintext))


@torch.no_grad()  # not inference_mode: the samples are fed to a forward that is differentiated
def calibration_samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, length: int, count: int,
                        response_tokens: int = 64) -> list[tuple[torch.Tensor, int]]:
    """(ids [1, length], response start) per sample: a document cut so that document, question and
    the model's own greedy response fill `length` tokens."""
    samples = []
    for module in DOC_MODULES:
        if len(samples) == count:
            break
        text = documentation(module)
        doc_ids = tokenizer(text, add_special_tokens=False).input_ids
        frame = tokenizer(as_chat(tokenizer, "{doc}\n\n" + QUESTION), add_special_tokens=False).input_ids
        room = length - response_tokens - len(frame) - 8
        if len(doc_ids) < room:
            continue  # too short for this length
        prompt = as_chat(tokenizer, tokenizer.decode(doc_ids[:room]) + "\n\n" + QUESTION)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(ids, max_new_tokens=response_tokens, min_new_tokens=response_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        full = out[:, :length]
        samples.append((full, ids.shape[1]))
    if not samples:
        raise ValueError(f"no calibration document is long enough for {length} tokens")
    return samples


# ---- profiling ----------------------------------------------------------------------------------


def value_influence(attention: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """[..., N, N] attention and dL/dA -> |first-order loss change| of dropping each value (causal part)."""
    a, g = attention.float(), grad.float()
    influence = a * (g - (a * g).sum(-1, keepdim=True)) / (EPS + 1 - a)
    influence[..., 0, :] = (a * g)[..., 0, :]  # the first query has one key: the reference's special case
    return influence.abs().tril()


def by_distance(values: torch.Tensor) -> torch.Tensor:
    """[..., N, N] -> [..., N]: out[..., d] = sum_i values[..., i + d, i], the lower diagonals' sums."""
    n = values.shape[-1]
    flat = values.reshape(-1, n, n)
    padded = torch.nn.functional.pad(flat, (0, 0, 0, n)).contiguous()  # [M, 2N, N]: row i + d always exists
    # Element [m, d, i] of this view is padded[m, i + d, i] (offset (i + d) N + i).
    diagonals = padded.as_strided((flat.shape[0], n, n), (2 * n * n, n, n + 1))
    return diagonals.sum(-1).reshape(*values.shape[:-2], n)


def distance_influence(attention: torch.Tensor, grad: torch.Tensor, length: int | None = None,
                       sinks: int = BLOCK) -> torch.Tensor:
    """[B, H, N, N] attention and its gradient -> [H, length]: summed |influence| of the values at
    each query-key distance, keys in the sink block left out (every head keeps them). `length`
    (default N) pads samples a few tokens short of a profiled length."""
    influence = value_influence(attention, grad).sum(0)
    influence[..., :sinks] = 0
    out = by_distance(influence)
    n = length or out.shape[-1]
    return torch.nn.functional.pad(out, (0, n - out.shape[-1]))


def profile_length(model: PreTrainedModel, samples: list[tuple[torch.Tensor, int]], length: int) -> torch.Tensor:
    """Mean distance influence [layers, kv_heads, length] over the samples of one length."""
    config = model.config
    groups = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    total = None
    previous = config._attn_implementation
    config._attn_implementation = "eager"  # the attention probabilities must exist as tensors
    try:
        for ids, start in tqdm(samples, desc=f"profiling at {length} tokens", unit="sample"):
            per_layer: dict[int, torch.Tensor] = {}

            def keep(layer: int, attention: torch.Tensor):
                def on_grad(grad: torch.Tensor):
                    per_layer[layer] = distance_influence(attention.detach(), grad, length)
                return on_grad

            # Parameters are frozen: the graph starts at the embeddings, so only activations get gradients.
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
            for layer, attention in enumerate(out.attentions):
                attention.register_hook(keep(layer, attention))
            labels = ids[0, start:]
            loss = torch.nn.functional.cross_entropy(out.logits[0, start - 1 : -1].float(), labels)
            loss.backward()
            stacked = torch.stack([per_layer[i] for i in range(len(out.attentions))])  # [L, Hq, N]
            per_kv = stacked.view(stacked.shape[0], -1, groups, stacked.shape[-1]).sum(2)
            total = per_kv if total is None else total + per_kv
            del out, loss
    finally:
        config._attn_implementation = previous
    return total / len(samples)


class ProfileError(ValueError):
    """A profile file that cannot be used: unreadable without running code, of an earlier format,
    or of another model. The message says to profile again."""


@dataclass
class Profile:
    model: str
    lengths: list[int]
    influence: dict[int, torch.Tensor]  # length -> [layers, kv_heads, length]: influence by query-key distance
    samples_per_length: int
    seconds: float
    identity: str | None = None  # models.model_identity of the model profiled

    def save(self, path: Path) -> None:
        """Plain data only (str, numbers, lists, a dict of tensors): what torch.load(weights_only=True) reads."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": self.model, "lengths": [int(n) for n in self.lengths],
                "influence": {int(n): v.detach().cpu().contiguous() for n, v in self.influence.items()},
                "samples_per_length": int(self.samples_per_length), "seconds": float(self.seconds),
                "identity": self.identity, "format": PROFILE_FORMAT}
        staging = path.with_name(f".{path.name}.tmp")
        torch.save(data, staging)
        staging.replace(path)  # a reader never sees half a file

    @classmethod
    def load(cls, path: Path, identity: str | None = None) -> Profile:
        """Read with torch.load(weights_only=True): a file holding anything but plain data (a pickle
        that would run code, a tampered file) is refused unexecuted. With `identity` (the model's
        `model_identity`), a profile of another model, or of none recorded, is refused too."""
        redo = "profile again (`paretoray moa profile`, or delete it and the first use rebuilds it)"
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise
        except Exception as error:  # UnpicklingError for a forbidden global, RuntimeError for a torn file
            raise ProfileError(f"{path}: not a profile that loads safely (plain tensors and numbers only): "
                               f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; {redo}") from None
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{path}: a profile of an earlier format (in 64x64 blocks, or not a profile); {redo}: "
                               "plans now count influence by query-key distance")
        try:
            profile = cls(model=str(data["model"]), lengths=[int(n) for n in data["lengths"]],
                          influence={int(n): v for n, v in data["influence"].items()},
                          samples_per_length=int(data["samples_per_length"]), seconds=float(data["seconds"]),
                          identity=data.get("identity"))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ProfileError(f"{path}: a malformed profile ({type(error).__name__}: {error}); {redo}") from None
        if not all(isinstance(v, torch.Tensor) and v.shape[-1] == n for n, v in profile.influence.items()) or \
                set(profile.influence) != set(profile.lengths):
            raise ProfileError(f"{path}: a malformed profile (its influence does not match its lengths); {redo}")
        if identity is not None and profile.identity != identity:
            whose = "records no model (an earlier version)" if profile.identity is None else \
                f"is of another model ({profile.model}, identity {str(profile.identity)[:16]}, not {identity[:16]})"
            raise ProfileError(f"{path}: the profile {whose}; {redo}")
        return profile

    def dropped(self, n: int, span: int) -> torch.Tensor:
        """[layers, kv_heads]: influence a span of `span` recent tokens (sinks kept) drops at length n."""
        return self.influence[n][..., min(span, n):].sum(-1)


def profile_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lengths: list[int],
                  samples_per_length: int = 2, response_tokens: int = 64) -> Profile:
    started = time.perf_counter()
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # gradients flow to the attention matrices only
    influence = {}
    try:
        with torch.inference_mode(False):  # a caller's inference mode would forbid the backward pass
            for length in lengths:
                samples = calibration_samples(model, tokenizer, length, samples_per_length, response_tokens)
                with torch.enable_grad():
                    influence[length] = profile_length(model, samples, length)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return Profile(str(model.name_or_path), list(lengths), influence, samples_per_length, time.perf_counter() - started,
                   identity=model_identity(model))


# ---- plan search --------------------------------------------------------------------------------


def search_plan(profile: Profile, density: float, lengths: list[int] | None = None, extend_length: int | None = None,
                rules_per_layer: int = 2, alpha_step: int = 512, time_limit_s: float = 60.0) -> Plan:
    """One rule per head: min summed loss over the profiled lengths s.t. the mean density is within
    [0.9 D, D] at every length in `lengths` (default: the profiled ones) and <= D at the extension
    length (default: twice the longest of `lengths`)."""
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    served = sorted(set(lengths or profile.lengths))
    extend = extend_length or extension_length(served)
    if extend < max(served):
        raise ValueError(f"the extension length {extend} is shorter than the longest length served {max(served)}")
    constrained = sorted(set(served) | {extend})
    rules = candidate_rules(profile.lengths, served, extend, alpha_step)
    first = profile.influence[profile.lengths[0]]
    layers, heads = first.shape[:2]
    n_heads, n_rules = layers * heads, len(rules)
    # loss[h, r]: summed over the profiled lengths, the influence of what rule r drops for head h
    loss = np.zeros((n_heads, n_rules))
    for n in profile.lengths:
        for r, rule in enumerate(rules):
            loss[:, r] += profile.dropped(n, rule.span(n)).reshape(-1).double().numpy()
    dens = np.array([[rule.density(n) for rule in rules] for n in constrained])  # [lengths, rules]
    # Variables: x[h, r] (head h takes rule r), then y[l, r] (layer l uses rule r at all).
    n_x, n_y = n_heads * n_rules, layers * n_rules
    cost = np.concatenate([loss.ravel(), np.zeros(n_y)])
    x_index = np.arange(n_x).reshape(n_heads, n_rules)
    y_index = n_x + np.arange(n_y).reshape(layers, n_rules)
    heads_of = np.repeat(np.arange(n_heads), n_rules)
    # each head takes exactly one rule
    one_rule = sparse.csr_matrix((np.ones(n_x), (heads_of, x_index.ravel())), shape=(n_heads, n_x + n_y))
    # the mean density over heads: <= density at every constrained length, >= 0.9 density where served
    budget = sparse.csr_matrix(np.hstack([np.tile(dens, n_heads) / n_heads, np.zeros((len(constrained), n_y))]))
    low = np.array([0.9 * density if n in served else 0.0 for n in constrained])
    # x[h, r] <= y[layer(h), r], and sum_r y[l, r] <= rules_per_layer
    y_of = y_index[np.arange(n_heads) // heads].ravel()
    link = sparse.csr_matrix((np.concatenate([np.ones(n_x), -np.ones(n_x)]),
                              (np.concatenate([np.arange(n_x), np.arange(n_x)]), np.concatenate([x_index.ravel(), y_of]))),
                             shape=(n_x, n_x + n_y))
    per_layer = sparse.csr_matrix((np.ones(n_y), (np.repeat(np.arange(layers), n_rules), y_index.ravel())), shape=(layers, n_x + n_y))
    constraints = [
        LinearConstraint(one_rule, 1, 1),
        LinearConstraint(budget, low, density),
        LinearConstraint(link, -np.inf, 0),
        LinearConstraint(per_layer, 0, rules_per_layer),
    ]
    result = milp(cost, constraints=constraints, integrality=np.ones(n_x + n_y), bounds=Bounds(0, 1),
                  options={"time_limit": time_limit_s})
    if result.x is None:
        sparsest = max(dens[i].min() for i in range(len(constrained)))
        raise ValueError(f"no MoA plan reaches mean density {density:g} at lengths {constrained} "
                         f"(the sparsest rule keeps {sparsest:.3f}): {result.message}")
    chosen = result.x[:n_x].reshape(n_heads, n_rules).argmax(1)
    plan_rules = [rules[r] for r in chosen]
    return Plan(
        alphas=[[plan_rules[l * heads + h].alpha for h in range(heads)] for l in range(layers)],
        betas=[[plan_rules[l * heads + h].beta for h in range(heads)] for l in range(layers)],
        density=density, lengths=served, extend_length=extend, profiled_lengths=list(profile.lengths), model=profile.identity,
        predicted_loss={str(n): float(sum(loss_at(profile, n, plan_rules))) for n in profile.lengths},
        achieved_density={str(n): float(np.mean([rule.density(n) for rule in plan_rules])) for n in constrained},
    )


def loss_at(profile: Profile, n: int, plan_rules: list[Rule]) -> list[float]:
    """Per head (layer-major), the influence its rule drops at profiled length n."""
    influence = profile.influence[n].reshape(len(plan_rules), -1)
    return [float(influence[h, min(rule.span(n), n):].sum()) for h, rule in enumerate(plan_rules)]


# ---- first-use build ----------------------------------------------------------------------------


def moa_folder(model: PreTrainedModel | str | Path) -> Path:
    """Where a model's profile and plans are cached: its folder's (or hub name's) last part, for
    people, plus its identity (`models.model_identity`: a digest of its config and weights), so two
    models in folders of the same name get two caches and a copied or moved model keeps its own."""
    ref = str(model) if isinstance(model, (str, Path)) else str(getattr(model, "name_or_path", "") or "")
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(ref).expanduser().name) or "model"
    return cache_root() / "moa" / f"{name}-{model_identity(model)[:16]}"


def plan_file(folder: Path, density: float, lengths: list[int], extend_length: int | None = None) -> Path:
    served = sorted(set(lengths))
    extension = "" if extend_length in (None, extension_length(served)) else f"-ext{extend_length}"
    return folder / f"plan-density{density:.4f}-at{'-'.join(map(str, served))}{extension}.json"


def _usable_plan(path: Path, identity: str) -> bool:
    """A plan file that parses and was searched from this model's profile."""
    try:
        return path.exists() and Plan.load(path).model == identity
    except (OSError, ValueError, TypeError):
        return False  # torn, tampered or of an earlier version: searched again


def _usable_profile(path: Path, identity: str) -> Profile | None:
    if not path.exists():
        return None
    try:
        return Profile.load(path, identity)
    except ProfileError as error:
        print(f"moa: {error}", file=sys.stderr, flush=True)
        return None


def build_plan(model: PreTrainedModel, density: float, lengths: list[int]) -> Path:
    """The plan file for (model, density, served lengths): searched from the model's profile, which
    is made first if this machine has none (or has one that does not load safely or is of another
    model). One process builds under a file lock; others wait."""
    identity = model_identity(model)
    folder = moa_folder(model)
    path = plan_file(folder, density, lengths)
    if _usable_plan(path, identity):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _usable_plan(path, identity):
            profile_path = folder / PROFILE_FILE
            profile = _usable_profile(profile_path, identity)
            if profile is None:
                print(f"moa: profiling {model.name_or_path} once at {DEFAULT_LENGTHS} tokens; cached in {folder}",
                      file=sys.stderr, flush=True)
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(model.name_or_path))
                profile = profile_model(model, tokenizer, DEFAULT_LENGTHS)
                profile.save(profile_path)
            search_plan(profile, density, lengths).save(path)
    return path
