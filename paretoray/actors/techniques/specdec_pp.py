"""SpecDec++: adaptive candidate length from an acceptance-prediction head on the draft.

Huang et al., "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths"
(arXiv:2405.19715; reference code Kaffaljidhmah2/SpecDec_pp).

A small head on the draft's last hidden state predicts the probability that the target accepts
a proposed token; it reads the state *after* the draft has been fed that token (the reference's
training pairs the hidden state at a candidate's own position with its acceptance label). In the
round's j-th draft step the state at hand is the one after candidate j - 1, so the head scores
d_1..d_{j-1}; at j = 1 the state is the last committed token, already verified, and counts 1 (as
the reference's `hf_generation.py` does). Drafting stops as soon as the predicted probability
that at least one proposal of this round is rejected, 1 - prod(p_accept), exceeds `threshold`
(the paper shows the optimal policy is such a threshold), bounded to [min_gamma, max_gamma]
candidates per round (the reference's `--bound 2 20`).

The head, as in the reference: `num_layers` residual blocks x + SiLU(Linear(x)) and a Linear to two
classes, class 0 = rejected, class 1 = accepted. The reference builds its blocks as
`[ResBlock(h)] * num_layers`, one module repeated, so the blocks share their weights; we keep that.
It is trained by `paretoray train-acceptance-head` (`paretoray.recipes.acceptance_head`) and
stored beside the draft as `acceptance_head.safetensors` with `acceptance_head.json`, which also
records what it was trained for: the temperature and the draft/target pair, by their identities
(`paretoray.actors.models.model_identity`, a digest of config and weights; heads of earlier
versions record only `model_fingerprint`, their shapes and embedding scale, and are checked by it).
A head used at another temperature warns; a head trained for another pair is refused.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from paretoray.actors.models import model_identity
from paretoray.actors.techniques.base import param, register
from paretoray.actors.techniques.speculative import TEMPERATURE, DraftPolicy, Speculative

HEAD_WEIGHTS, HEAD_CONFIG = "acceptance_head.safetensors", "acceptance_head.json"


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class AcceptanceHead(nn.Module):
    """hidden [..., H] -> logits [..., 2] (0: rejected, 1: accepted)."""

    def __init__(self, hidden_size: int, num_layers: int = 3, trained_for: dict | None = None):
        super().__init__()
        self.config = {"hidden_size": hidden_size, "num_layers": num_layers}
        # {"temperature": T, "draft": fingerprint, "target": fingerprint, "draft_identity": model_identity,
        #  "target_identity": model_identity}; None: not recorded
        self.trained_for = trained_for
        block = ResidualBlock(hidden_size)  # one block applied num_layers times, as the reference does
        self.model = nn.Sequential(*([block] * num_layers), nn.Linear(hidden_size, 2))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model(hidden)

    def accept_probability(self, hidden: torch.Tensor) -> float:
        weight = self.model[-1].weight
        return float(self(hidden.to(weight.dtype)).float().softmax(-1)[..., 1])

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_model

        folder = Path(folder)
        save_model(self, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_CONFIG).write_text(json.dumps({**self.config, "trained_for": self.trained_for}, indent=1))

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> AcceptanceHead:
        from safetensors.torch import load_model

        folder = Path(folder)
        if not (folder / HEAD_WEIGHTS).exists():
            raise FileNotFoundError(
                f"no acceptance head in {folder}: train one with `paretoray train-acceptance-head` (it saves {HEAD_WEIGHTS} there)"
            )
        config = json.loads((folder / HEAD_CONFIG).read_text())
        head = cls(config["hidden_size"], config["num_layers"], config.get("trained_for"))
        # strict: a missing or extra tensor is an error (safetensors stores the shared block once and
        # ties it back on load)
        load_model(head, str(folder / HEAD_WEIGHTS), strict=True)
        return head.to(device).eval()

    def check_use(self, draft: PreTrainedModel, target: PreTrainedModel, temperature: float, where: str) -> None:
        """Refuse a head trained for another draft/target pair; warn when used at another temperature."""
        if self.trained_for is None:
            warnings.warn(f"{where}: the acceptance head does not record what it was trained for (an older head); "
                          "retrain it with `paretoray train-acceptance-head`", stacklevel=3)
            return
        for role, model in (("draft", draft), ("target", target)):
            recorded = self.trained_for.get(f"{role}_identity")
            if recorded is not None:  # the exact model (config and weights)
                seen = model_identity(model)
                why = None if recorded == seen else f"identity {recorded[:16]} there, {seen[:16]} here"
            else:  # a head of an earlier version: its shapes and embedding scale
                why = fingerprint_mismatch(self.trained_for[role], model)
            if why:
                raise ValueError(f"{where}: the acceptance head was trained for another {role} ({why}); "
                                 "retrain it for this pair with `paretoray train-acceptance-head`")
        trained = float(self.trained_for["temperature"])
        if not math.isclose(trained, temperature):
            warnings.warn(f"{where}: the acceptance head was trained at temperature {trained:g} and is used at "
                          f"{temperature:g}; its predicted acceptance is then miscalibrated", stacklevel=3)


_FINGERPRINT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")


def model_fingerprint(model: PreTrainedModel) -> dict:
    """What identifies a model well enough to tell a head's pair apart: its shape, plus the mean
    absolute value of its input embedding (robust to the dtype it is loaded in)."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    return {**{key: getattr(config, key, None) for key in _FINGERPRINT_FIELDS},
            "embedding_abs_mean": float(embedding.detach().float().abs().mean())}


def fingerprint_mismatch(recorded: dict, model: PreTrainedModel) -> str | None:
    """Why `model` is not the model `recorded` describes, or None."""
    seen = model_fingerprint(model)
    for key in _FINGERPRINT_FIELDS:
        if recorded.get(key) != seen[key]:
            return f"{key} {recorded.get(key)} there, {seen[key]} here"
    if not math.isclose(recorded["embedding_abs_mean"], seen["embedding_abs_mean"], rel_tol=1e-2):
        return f"its embeddings differ (mean |w| {recorded['embedding_abs_mean']:.6g} there, {seen['embedding_abs_mean']:.6g} here)"
    return None


@dataclass
class ThresholdPolicy(DraftPolicy):
    """Stop once 1 - prod(p_accept) > threshold (within [min_gamma, max_gamma] proposals).

    At proposal j the product covers candidates 1..j-1 (the state at hand is the one after
    candidate j - 1); at j = 1 the state is the verified last token and its factor is 1."""

    accept_probability: Callable[[torch.Tensor], float]
    threshold: float
    min_gamma: int
    max_gamma: int
    log_all_accepted: float = field(default=0.0)

    def begin_round(self) -> None:
        self.log_all_accepted = 0.0

    def stop(self, proposed: int, draft_hidden: torch.Tensor) -> bool:
        if proposed > 1:
            p = min(max(self.accept_probability(draft_hidden), 1e-12), 1.0)
            self.log_all_accepted += math.log(p)
        if proposed >= self.max_gamma:
            return True
        return proposed >= self.min_gamma and 1.0 - math.exp(self.log_all_accepted) > self.threshold


_HEADS: dict[str, AcceptanceHead] = {}  # one load per draft per process


@register
@dataclass(frozen=True)
class SpecDecPP(Speculative):
    threshold: float = param("float", 0.3, low=0.0, high=1.0, doc="stop drafting once P(some proposal rejected) exceeds this (reference: 0.3)")
    max_gamma: int = param("int", 20, low=1, high=64, doc="most candidates per round (reference bound: 20)")
    min_gamma: int = param("int", 2, low=1, high=64, doc="fewest candidates per round (reference bound: 2)")
    temperature: float = TEMPERATURE.field()

    name = "specdec_pp"
    examples = {"covers": {}, "short_rounds": {"threshold": 0.05, "max_gamma": 4}}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_gamma > self.max_gamma:
            raise ValueError(f"{self.name}: min_gamma ({self.min_gamma}) must not exceed max_gamma ({self.max_gamma})")

    def policy(self, draft: PreTrainedModel, target: PreTrainedModel) -> DraftPolicy:
        folder = str(draft.name_or_path)
        if folder not in _HEADS:
            _HEADS[folder] = AcceptanceHead.load(folder, device=draft.device)
        head = _HEADS[folder]
        head.check_use(draft, target, self.temperature, where=f"{self.name} with the draft {folder}")
        return ThresholdPolicy(head.accept_probability, self.threshold, self.min_gamma, self.max_gamma)
