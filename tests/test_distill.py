"""The draft builder on a tiny random target: truncation, distillation, the saved draft."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from paretoray.recipes.draft import distill, frequent_vocabulary, train_draft, truncated_copy
from paretoray.actors.techniques.speculative import DRAFT_VOCAB, DraftHead
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
    report = train_draft(target, tokenizer, tmp_path / "draft", layers=1, steps=3, prompts=4, passages=2, new_tokens=8, batch_size=4)
    saved = json.loads((tmp_path / "draft" / "draft_report.json").read_text())
    assert saved["layers"] == 1 and saved["corpus_sequences"] == 6
    assert 0.0 <= report.acceptance_rate <= 1.0 and 0.0 <= report.greedy_agreement <= 1.0
    assert 0.0 <= report.acceptance_rate_unseen <= 1.0
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft")
    assert draft.config.num_hidden_layers == 1


def test_frequent_vocabulary_keeps_specials_then_corpus_counts_then_low_ids():
    sequences = [[7, 7, 7, 9, 9, 3], [9, 5]]
    kept = frequent_vocabulary(sequences, vocab_size=20, size=6, always=[2, 19])
    # 2 and 19 always; 9 (3x), 7 (3x), then 3 and 5 (1x each) fill the rest.
    assert kept.tolist() == [2, 3, 5, 7, 9, 19]
    assert frequent_vocabulary([[1]], vocab_size=20, size=4, always=[]).tolist() == [0, 1, 2, 3]  # unseen: lowest ids


def test_train_draft_with_a_sub_vocabulary_head(tiny_model, tmp_path):
    target, tokenizer = tiny_model
    report = train_draft(target, tokenizer, tmp_path / "draft", layers=1, steps=3, prompts=4, passages=2, new_tokens=8,
                         batch_size=4, head_vocab=100)
    assert report.head_vocab == 100 and 0.0 <= report.head_vocab_coverage <= 1.0
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft")
    head = DraftHead.of(draft)
    assert (tmp_path / "draft" / DRAFT_VOCAB).exists() and head.weight.shape[0] == 100
    assert set(tokenizer.all_special_ids) <= set(head.token_ids.tolist())
    # The saved weights are a complete model: its full output layer is still the target's.
    torch.testing.assert_close(draft.get_output_embeddings().weight, target.get_output_embeddings().weight)


def test_registry_draft_is_built_once_on_first_use(tiny_model_dir, tmp_path, monkeypatch):
    from paretoray.actors import artifacts, models
    from paretoray.recipes import builders
    from paretoray.recipes.build import RECIPE_FILE

    monkeypatch.setattr(artifacts, "_BUILDERS", {})
    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path / "cache"))
    # The actor side never builds by itself: without the recipes' builders it says how to build.
    monkeypatch.setitem(models.DRAFTS, "tiny-draft", models.DistilledDraft(
        target=str(tiny_model_dir), layers=1, steps=2, head_vocab=64, head_steps=5, description="test",
        prompts=3, passages=2, head_prompts=1))
    with pytest.raises(artifacts.ArtifactMissing, match="paretoray train-draft"):
        models.resolve("tiny-draft")
    artifacts.install(builders())
    folder = models.resolve("tiny-draft")
    built = sorted(p.name for p in (tmp_path / "cache" / "models" / "tiny-draft").iterdir())
    assert {"acceptance_head.safetensors", DRAFT_VOCAB, "draft_report.json", "model.safetensors"} <= set(built)
    stamp = (tmp_path / "cache" / "models" / "tiny-draft" / "model.safetensors").stat().st_mtime_ns
    assert models.resolve("tiny-draft") == folder  # the second use loads the cache, no retraining
    # A built draft needs no builder: a script outside the controller (a benchmark) loads it as is.
    monkeypatch.setattr(artifacts, "_BUILDERS", {})
    assert models.resolve("tiny-draft") == folder
    artifacts.install(builders())
    assert (tmp_path / "cache" / "models" / "tiny-draft" / "model.safetensors").stat().st_mtime_ns == stamp
    model, _ = models.load_model("tiny-draft", device="cpu")
    assert model.config.num_hidden_layers == 1
    # Another recipe under the same name (a new release's) rebuilds instead of serving the old draft.
    monkeypatch.setitem(models.DRAFTS, "tiny-draft", dataclasses.replace(models.DRAFTS["tiny-draft"], steps=3))
    assert models.resolve("tiny-draft") == folder
    assert (tmp_path / "cache" / "models" / "tiny-draft" / "model.safetensors").stat().st_mtime_ns != stamp
    assert json.loads((tmp_path / "cache" / "models" / "tiny-draft" / RECIPE_FILE).read_text())["steps"] == 3


def test_the_broad_corpus_is_seeded_varied_and_keeps_the_unseen_requests_out():
    from paretoray.recipes import corpus

    assert corpus.chat_prompts(24, seed=3) == corpus.chat_prompts(24, seed=3)
    assert corpus.passages(9, seed=3) == corpus.passages(9, seed=3) != corpus.passages(9, seed=4)
    prompts = corpus.chat_prompts(400, seed=0)
    assert len(set(prompts)) > 300
    assert any("```python" in p for p in prompts) and any(p in make_prompts("mixed", 400, 0) for p in prompts)
    assert not set(corpus.UNSEEN_CHAT) & set(prompts) and len(corpus.UNSEEN_CHAT) == 20
    assert len(corpus.prose()) > 200 and len(corpus.code()) > 1000


def test_a_corpus_smaller_than_a_batch_is_one_batch():
    from paretoray.recipes.draft import _batches

    sequences = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    teacher = [(torch.zeros(len(s), 2), torch.zeros(len(s), 2, dtype=torch.long)) for s in sequences]
    ids, mask, _, _ = next(_batches(sequences, teacher, batch_size=8, pad=0, generator=torch.Generator().manual_seed(0)))
    assert ids.shape == (3, 4) and mask.sum() == 9


def test_batches_group_similar_lengths_and_cover_the_corpus_once_per_pass():
    from paretoray.recipes.draft import _length_grouped

    generator = torch.Generator().manual_seed(0)
    sequences = [[1] * n for n in torch.randint(10, 200, (64,), generator=generator).tolist()]
    order = torch.randperm(64, generator=generator).tolist()
    batches = _length_grouped(order, sequences, 4, generator)
    assert sorted(i for batch in batches for i in batch) == list(range(64))
    padded = sum(4 * max(len(sequences[i]) for i in batch) for batch in batches)
    random_padded = sum(4 * max(len(sequences[i]) for i in order[s : s + 4]) for s in range(0, 64, 4))
    assert padded < 0.8 * random_padded
