"""MoA's offline half: profile each head's sensitivity to sparse masks, then search a plan.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv:2406.14909; reference code thu-nics/MoA). What follows the reference, and where it differs:

Profiling (`profile_model`). Calibration: long documents with the model's own greedy response to
a question about them (the reference uses MultiNews articles with model-generated summaries; we
use the Python standard library's documentation, which ships with every interpreter, so nothing is
downloaded). Loss: mean cross-entropy over the response tokens only. For every attention matrix A
(one per layer and head) and its gradient G = dL/dA, the influence of masking each value is
|A * (G - sum_j A*G) / (eps + 1 - A)| (the first-order loss change when that value is dropped and
its row renormalised; eps as the reference's bf16 epsilon, 2^-7), summed into 64x64 blocks and
averaged over samples, at each profiled length.

Candidates. A rule (alpha, beta) keeps, at length N with nb = N / 64 blocks, the last
n = int(alpha // 64 + beta * nb) key blocks of each query block (at least the diagonal) plus the
sink block 0. alpha runs over multiples of `alpha_step` from -min(lengths) to max(lengths), beta
over linspace(0, 1, 9); rules that exceed the longest length or vanish at the shortest are dropped.
A rule's loss at N is the summed influence of the causal blocks it drops; its density is the share
of the KV cache it keeps, min(n + 1, nb) / nb (the reference's "kv" density).

Plan search (`search_plan`). One rule per head minimising the summed loss over the profiled lengths,
with the mean density over all heads at most `density` (and at least 0.9 x `density`) at every
profiled length, and at most `rules_per_layer` distinct rules per layer (the reference's 2, which
keeps kernels simple): a mixed-integer program solved by HiGHS through scipy.optimize.milp. The
reference instead enumerates an epsilon-constraint Pareto set over the lengths (Gurobi) and picks
the plan with the lowest validation perplexity; a single weighted objective is the cheaper
stand-in.

GQA. The reference expands GQA models to one KV head per query head before profiling. Here a
plan is per KV head: the cache, which is what the plan saves, is per KV head, so the influences of
a group's query heads are summed and the group shares one rule.
"""

from __future__ import annotations

import json
import math
import pydoc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from paretoray.actors.prompts import as_chat

BLOCK = 64
DEFAULT_LENGTHS = [1024, 2048]  # what a CPU profiles in minutes; the reference profiles 2K/4K/8K on GPUs
EPS = 2.0**-7  # the reference's eps: bf16's machine epsilon, where its profiles are computed
BETAS = tuple(float(b) for b in np.linspace(0, 1, 9))
DOC_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "re",
               "subprocess", "threading", "typing", "unittest", "datetime", "decimal", "email", "http.client")
QUESTION = "Summarize the documentation above in a few sentences."


@dataclass(frozen=True)
class Rule:
    alpha: int  # tokens
    beta: float

    def blocks(self, n_tokens: int) -> int:
        """Key blocks kept per query block (the diagonal included) at length n_tokens."""
        nb = math.ceil(n_tokens / BLOCK)
        return max(1, int(self.alpha // BLOCK + self.beta * nb))

    def density(self, n_tokens: int) -> float:
        nb = math.ceil(n_tokens / BLOCK)
        return min(self.blocks(n_tokens) + 1, nb) / nb

    def span(self, n_tokens: int) -> int:
        """The rule as a token span for the cache: its kept blocks' tokens (sinks not included)."""
        return self.blocks(n_tokens) * BLOCK


def candidate_rules(lengths: list[int], alpha_step: int = 512) -> list[Rule]:
    low, high = min(lengths), max(lengths)
    rules = []
    for alpha in range(-low, high + 1, alpha_step):
        for beta in BETAS:
            if alpha + beta * high <= high and alpha + beta * low > 0:
                rules.append(Rule(alpha, beta))
    return rules


def dropped_blocks(rule: Rule, n_tokens: int) -> torch.Tensor:
    """[nb, nb] bool: causal blocks the rule drops (neither in its band nor the sink column)."""
    nb = math.ceil(n_tokens / BLOCK)
    q = torch.arange(nb)[:, None]
    k = torch.arange(nb)[None, :]
    kept = (k == 0) | ((q - k) < rule.blocks(n_tokens))
    return (k <= q) & ~kept


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


def block_influence(attention: torch.Tensor, grad: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
    """[B, H, N, N] attention and its gradient -> [H, nb, nb] summed |influence| per 64x64 block
    (nb = ceil(N / 64), or `n_blocks` when samples a few tokens short of a length must align)."""
    influence = value_influence(attention, grad)
    a = attention
    n = a.shape[-1]
    nb = n_blocks or math.ceil(n / BLOCK)
    padded = torch.nn.functional.pad(influence, (0, nb * BLOCK - n, 0, nb * BLOCK - n))
    return padded.view(*a.shape[:2], nb, BLOCK, nb, BLOCK).sum(dim=(0, 3, 5))


def profile_length(model: PreTrainedModel, samples: list[tuple[torch.Tensor, int]], length: int) -> torch.Tensor:
    """Mean block influence [layers, kv_heads, nb, nb] over the samples of one length."""
    n_blocks = math.ceil(length / BLOCK)
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
                    per_layer[layer] = block_influence(attention.detach(), grad, n_blocks)
                return on_grad

            # Parameters are frozen: the graph starts at the embeddings, so only activations get gradients.
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
            for layer, attention in enumerate(out.attentions):
                attention.register_hook(keep(layer, attention))
            labels = ids[0, start:]
            loss = torch.nn.functional.cross_entropy(out.logits[0, start - 1 : -1].float(), labels)
            loss.backward()
            stacked = torch.stack([per_layer[i] for i in range(len(out.attentions))])  # [L, Hq, nb, nb]
            per_kv = stacked.view(stacked.shape[0], -1, groups, *stacked.shape[-2:]).sum(2)
            total = per_kv if total is None else total + per_kv
            del out, loss
    finally:
        config._attn_implementation = previous
    return total / len(samples)


@dataclass
class Profile:
    model: str
    lengths: list[int]
    influence: dict[int, torch.Tensor]  # length -> [layers, kv_heads, nb, nb]
    samples_per_length: int
    seconds: float

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model, "lengths": self.lengths, "influence": self.influence,
                    "samples_per_length": self.samples_per_length, "seconds": self.seconds}, path)

    @classmethod
    def load(cls, path: Path) -> Profile:
        return cls(**torch.load(path, weights_only=False))


def profile_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lengths: list[int],
                  samples_per_length: int = 2, response_tokens: int = 64) -> Profile:
    started = time.perf_counter()
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # gradients flow to the attention matrices only
    influence = {}
    try:
        for length in lengths:
            samples = calibration_samples(model, tokenizer, length, samples_per_length, response_tokens)
            with torch.enable_grad():
                influence[length] = profile_length(model, samples, length)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return Profile(str(model.name_or_path), list(lengths), influence, samples_per_length, time.perf_counter() - started)


# ---- plan search --------------------------------------------------------------------------------


@dataclass
class Plan:
    """One elastic rule per (layer, KV head) and the sink size; saved as JSON."""

    alphas: list[list[int]]
    betas: list[list[float]]
    sinks: int = BLOCK
    density: float = 0.5
    lengths: list[int] = field(default_factory=list)
    predicted_loss: dict[str, float] = field(default_factory=dict)  # per length: summed influence dropped
    achieved_density: dict[str, float] = field(default_factory=dict)

    def rules(self, layer: int) -> list[Rule]:
        return [Rule(a, b) for a, b in zip(self.alphas[layer], self.betas[layer])]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Plan:
        return cls(**json.loads(Path(path).read_text()))


def search_plan(profile: Profile, density: float, rules_per_layer: int = 2, alpha_step: int = 512,
                time_limit_s: float = 60.0) -> Plan:
    """Choose one rule per head: min summed loss s.t. mean density <= density at every length."""
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    lengths = profile.lengths
    rules = candidate_rules(lengths, alpha_step)
    first = profile.influence[lengths[0]]
    layers, heads = first.shape[:2]
    n_heads, n_rules = layers * heads, len(rules)
    # loss[h, r]: summed over lengths, influence of the blocks rule r drops for head h
    loss = np.zeros((n_heads, n_rules))
    dens = np.zeros((len(lengths), n_rules))
    for li, n in enumerate(lengths):
        influence = profile.influence[n].reshape(n_heads, *profile.influence[n].shape[-2:])
        for r, rule in enumerate(rules):
            loss[:, r] += (influence * dropped_blocks(rule, n)).sum(dim=(-1, -2)).numpy()
            dens[li, r] = rule.density(n)
    # Variables: x[h, r] (head h takes rule r), then y[l, r] (layer l uses rule r at all).
    n_x, n_y = n_heads * n_rules, layers * n_rules
    cost = np.concatenate([loss.ravel(), np.zeros(n_y)])
    x_index = np.arange(n_x).reshape(n_heads, n_rules)
    y_index = n_x + np.arange(n_y).reshape(layers, n_rules)
    heads_of = np.repeat(np.arange(n_heads), n_rules)
    # each head takes exactly one rule
    one_rule = sparse.csr_matrix((np.ones(n_x), (heads_of, x_index.ravel())), shape=(n_heads, n_x + n_y))
    # the mean density over heads at every profiled length stays in [0.9 * density, density]
    budget = sparse.csr_matrix(np.hstack([np.tile(dens, n_heads) / n_heads, np.zeros((len(lengths), n_y))]))
    # x[h, r] <= y[layer(h), r], and sum_r y[l, r] <= rules_per_layer
    y_of = y_index[np.arange(n_heads) // heads].ravel()
    link = sparse.csr_matrix((np.concatenate([np.ones(n_x), -np.ones(n_x)]),
                              (np.concatenate([np.arange(n_x), np.arange(n_x)]), np.concatenate([x_index.ravel(), y_of]))),
                             shape=(n_x, n_x + n_y))
    per_layer = sparse.csr_matrix((np.ones(n_y), (np.repeat(np.arange(layers), n_rules), y_index.ravel())), shape=(layers, n_x + n_y))
    constraints = [
        LinearConstraint(one_rule, 1, 1),
        LinearConstraint(budget, 0.9 * density, density),
        LinearConstraint(link, -np.inf, 0),
        LinearConstraint(per_layer, 0, rules_per_layer),
    ]
    result = milp(cost, constraints=constraints, integrality=np.ones(n_x + n_y), bounds=Bounds(0, 1),
                  options={"time_limit": time_limit_s})
    if result.x is None:
        densest = max(dens[li].min() for li in range(len(lengths)))
        raise ValueError(f"no MoA plan reaches mean density {density:g} at lengths {lengths} "
                         f"(the sparsest rule keeps {densest:.3f}): {result.message}")
    chosen = result.x[:n_x].reshape(n_heads, n_rules).argmax(1)
    plan_rules = [rules[r] for r in chosen]
    return Plan(
        alphas=[[plan_rules[l * heads + h].alpha for h in range(heads)] for l in range(layers)],
        betas=[[plan_rules[l * heads + h].beta for h in range(heads)] for l in range(layers)],
        density=density, lengths=list(lengths),
        predicted_loss={str(n): float(sum(loss_at(profile, n, rules, chosen, heads))) for n in lengths},
        achieved_density={str(n): float(np.mean([rule.density(n) for rule in plan_rules])) for n in lengths},
    )


def loss_at(profile: Profile, n: int, rules: list[Rule], chosen: np.ndarray, heads: int) -> list[float]:
    influence = profile.influence[n]
    return [float((influence[h // heads, h % heads] * dropped_blocks(rules[r], n)).sum()) for h, r in enumerate(chosen)]
