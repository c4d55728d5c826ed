"""SpecDec++'s head training on a tiny target/draft pair: the reference's data (which hidden state
goes with which label), its loss normalisation, what the saved head records, and strict use."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from paretoray.actors.models import model_identity
from paretoray.actors.techniques import build_technique
from paretoray.actors.techniques.specdec_pp import _HEADS, AcceptanceHead, model_fingerprint
from paretoray.recipes.acceptance_head import collect_pairs, pairs_for_sequence, train_acceptance_head, weighted_soft_ce


def test_weighted_soft_ce_is_normalised_by_the_weighted_label_mass():
    """The reference: sum(w (1 - y) CE0 + y CE1) / sum(w (1 - y) + y), w = 6."""
    logits = torch.tensor([[0.0, 0.0]])  # p = 0.5 for both classes: each CE is log 2
    for y in (1.0, 0.0, 0.25):
        assert math.isclose(float(weighted_soft_ce(logits, torch.tensor([y]))), math.log(2), rel_tol=1e-6)
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([0.9, 0.2])
    log_p = logits.log_softmax(-1)
    numerator = sum(6 * (1 - y) * -lp[0] + y * -lp[1] for y, lp in zip(labels, log_p))
    expected = numerator / sum(6 * (1 - y) + y for y in labels)
    assert math.isclose(float(weighted_soft_ce(logits, labels)), float(expected), rel_tol=1e-6)


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    from tests.tiny import save_tiny_llama

    target, tokenizer = tiny_model
    folder = save_tiny_llama(tmp_path_factory.mktemp("head") / "draft", num_layers=1, seed=2)
    return target, AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer, folder


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_label_goes_with_the_draft_state_after_its_candidate_is_fed(pair, temperature):
    """Pinned independently of the recipe: proposals d_j come from the draft on the target's own
    prefix (prompt + X[:j]); the label is the target's acceptance of d_j on that prefix; the state is
    the draft's after reading prompt + Z[:j+1] (Z: the proposals with the target's tokens mixed in)."""
    target, draft, _, _ = pair
    ids = torch.randint(4, 400, (12,), generator=torch.Generator().manual_seed(1))
    continuation = torch.randint(4, 400, (10,), generator=torch.Generator().manual_seed(2))
    hidden, labels = pairs_for_sequence(target, draft, ids, continuation, temperature, mixing_ratio=0.3,
                                        generator=torch.Generator().manual_seed(5))
    # The same draws, made again here: proposals (when sampling), then the mixing mask.
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        joint = torch.cat([ids, continuation])
        draft_logits = draft(joint[None]).logits[0, 11:-1].float()
        target_logits = target(joint[None]).logits[0, 11:-1].float()
    if temperature > 0:
        q_all = draft_logits.softmax(-1)
        proposals = torch.multinomial(q_all, 1, generator=generator)[:, 0]
        p = target_logits.softmax(-1).gather(-1, proposals[:, None])[:, 0]
        expected_labels = (p / q_all.gather(-1, proposals[:, None])[:, 0]).clamp(max=1)
    else:
        proposals = draft_logits.argmax(-1)
        expected_labels = (target_logits.argmax(-1) == proposals).float()
    mixed = torch.rand(10, generator=generator) < 0.3
    assert 0 < int(mixed.sum()) < 10  # both kinds of position occur
    z = torch.where(mixed, continuation, proposals)
    with torch.no_grad():
        states = draft.base_model(torch.cat([ids, z])[None]).last_hidden_state[0, 12:]
    kept = (~mixed).nonzero()[:, 0]
    torch.testing.assert_close(labels, expected_labels[kept], rtol=1e-5, atol=1e-6)
    for row, j in enumerate(kept.tolist()):
        torch.testing.assert_close(hidden[row], states[j], rtol=1e-4, atol=1e-5)
        # ...the state at d_j's own position, not the one before it that proposed d_j
        assert not torch.allclose(hidden[row], draft.base_model(torch.cat([ids, z[:j]])[None]).last_hidden_state[0, -1])


def test_greedy_labels_of_a_draft_equal_to_the_target_are_all_ones(tiny_model):
    target, tokenizer = tiny_model
    hidden, labels = collect_pairs(target, target, tokenizer, ["hello there"], new_tokens=6, mixing_ratio=0.0)
    assert hidden.shape[1] == target.config.hidden_size and 1 <= hidden.shape[0] <= 6
    assert labels.tolist() == [1.0] * hidden.shape[0]  # a draft equal to the target is always accepted


def test_a_trained_head_records_its_pair_and_temperature_and_specdec_pp_uses_it(pair, tmp_path):
    target, draft, tokenizer, folder = pair
    report = train_acceptance_head(target, draft, tokenizer, folder, prompts=4, new_tokens=8, steps=20)
    assert 0 < report.pairs <= 4 * 8 and 0 <= report.observed_acceptance <= 1 and report.temperature == 0.0
    assert json.loads((folder / "acceptance_head_report.json").read_text())["steps"] == 20
    recorded = json.loads((folder / "acceptance_head.json").read_text())["trained_for"]
    assert recorded["temperature"] == 0.0 and recorded["target"] == model_fingerprint(target)
    assert recorded["draft"] == model_fingerprint(draft)
    assert recorded["target_identity"] == model_identity(target) and recorded["draft_identity"] == model_identity(draft)
    _HEADS.pop(str(folder), None)
    ids = torch.randint(4, target.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    expected = target.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 30:].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pair and temperature it was trained for: no warning
        run = build_technique("specdec_pp", {"threshold": 0.5, "max_gamma": 6}).generate(target, ids, 12, draft=draft)
    assert run.tokens == expected
    # At another temperature it warns; with another target it is refused.
    with pytest.warns(UserWarning, match="trained at temperature 0"):
        build_technique("specdec_pp", {"temperature": 0.7}).generate(target, ids, 4, draft=draft, seed=1)
    with pytest.raises(ValueError, match="trained for another target"):
        build_technique("specdec_pp", {}).generate(draft, ids, 4, draft=draft)


def test_head_weights_load_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    AcceptanceHead(16, 3).save(tmp_path)
    tensors = load_file(str(tmp_path / "acceptance_head.safetensors"))
    tensors["model.9.extra"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "acceptance_head.safetensors"))
    with pytest.raises(RuntimeError):
        AcceptanceHead.load(tmp_path)
