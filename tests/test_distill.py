"""The draft builder on a tiny random target: truncation, distillation, the saved draft."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from paretoray.actors.distill import distill, train_draft, truncated_copy
from paretoray.actors.prompts import PROMPT_SETS, make_prompts


def test_prompts_are_seeded_and_varied():
    for kind in PROMPT_SETS:
        first, again = make_prompts(kind, 12, seed=3), make_prompts(kind, 12, seed=3)
        assert first == again and len(set(first)) > 4
    assert make_prompts("code", 5, seed=1) != make_prompts("code", 5, seed=2)


def test_truncated_copy_keeps_the_target_weights(tiny_model):
    target, _ = tiny_model
    full = truncated_copy(target, target.config.num_hidden_layers)
    ids = torch.randint(4, target.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, target(ids).logits)
    shallow = truncated_copy(target, 1)
    assert shallow.config.num_hidden_layers == 1
    torch.testing.assert_close(shallow.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)


def test_distillation_lowers_the_kl(tiny_model):
    target, _ = tiny_model
    draft = truncated_copy(target, 1)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(4, target.config.vocab_size, (24,), generator=generator).tolist() for _ in range(16)]
    first = distill(target, draft, sequences, steps=1, pad=0, batch_size=4, lr=1e-3)
    last = distill(target, draft, sequences, steps=40, pad=0, batch_size=4, lr=1e-3)
    assert last < first


def test_train_draft_saves_a_loadable_draft_with_its_report(tiny_model, tmp_path):
    target, tokenizer = tiny_model
    report = train_draft(target, tokenizer, tmp_path / "draft", layers=1, steps=3, prompts_per_set=4, new_tokens=8, batch_size=4)
    saved = json.loads((tmp_path / "draft" / "draft_report.json").read_text())
    assert saved["layers"] == 1 and saved["corpus_sequences"] == 12
    assert 0.0 <= report.acceptance_rate <= 1.0 and 0.0 <= report.greedy_agreement <= 1.0
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft")
    assert draft.config.num_hidden_layers == 1
