"""SpecDec++'s head training on a tiny target/draft pair: labels, the weighted loss, saving."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForCausalLM

from paretoray.actors.acceptance import collect_pairs, train_acceptance_head, weighted_soft_ce
from paretoray.actors.techniques import build_technique


def test_weighted_soft_ce_weights_rejections_six_times():
    logits = torch.tensor([[0.0, 0.0]])  # p = 0.5 for both classes
    assert math.isclose(float(weighted_soft_ce(logits, torch.tensor([1.0]))), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(weighted_soft_ce(logits, torch.tensor([0.0]))), 6 * math.log(2), rel_tol=1e-6)
    assert math.isclose(float(weighted_soft_ce(logits, torch.tensor([0.25]))), (0.75 * 6 + 0.25) * math.log(2), rel_tol=1e-6)


def test_greedy_labels_are_argmax_agreement(tiny_model):
    target, tokenizer = tiny_model
    hidden, labels = collect_pairs(target, target, tokenizer, ["hello there"], new_tokens=6)
    assert hidden.shape == (6, target.config.hidden_size)
    assert labels.tolist() == [1.0] * 6  # a draft equal to the target is always accepted


def test_train_saves_a_head_specdec_pp_can_use(tiny_model, tmp_path):
    from tests.tiny import save_tiny_llama

    target, tokenizer = tiny_model
    folder = save_tiny_llama(tmp_path / "draft", num_layers=1, seed=2)
    draft = AutoModelForCausalLM.from_pretrained(folder).eval()
    report = train_acceptance_head(target, draft, tokenizer, folder, prompts_per_set=2, new_tokens=8, steps=20)
    assert report.pairs == 6 * 8 and 0 <= report.observed_acceptance <= 1
    assert json.loads((folder / "acceptance_head_report.json").read_text())["steps"] == 20
    assert all(0 <= row["predicted"] <= 1 for row in report.calibration)
    ids = torch.randint(4, target.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    expected = target.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 30:].tolist()
    run = build_technique("specdec_pp", {"threshold": 0.5, "max_gamma": 6}).generate(target, ids, 12, draft=draft)
    assert run.tokens == expected
