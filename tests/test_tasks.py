"""Task pieces on hand-made inputs: batching, NER entity F1 (conlleval), SQuAD EM/F1, span decoding,
and the QA model's logits over context positions only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_lens.config import RunConfig
from moe_lens.models import SpanQA, Tagger
from moe_lens.tasks.batching import bucket_batches, gather_padded
from moe_lens.data.squad_eval import normalize_answer
from moe_lens.tasks.metrics import entity_f1, squad_scores
from moe_lens.tasks.qa import decode

NAMES = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
ID = {t: i for i, t in enumerate(NAMES)}


def ids(tags: str) -> np.ndarray:
    return np.array([ID[t] for t in tags.split()])


def test_bucket_batches_cover_every_sequence_once_with_similar_lengths() -> None:
    lengths = np.random.default_rng(0).integers(1, 60, size=103)
    for shuffle in (False, True):
        batches = list(bucket_batches(lengths, 10, shuffle=shuffle, seed=1))
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(103))
        padded = sum(lengths[b].max() * len(b) for b in batches)
        assert padded / lengths.sum() < 1.2  # sorted by length: little padding (random batches: ~1.8)


def test_gather_padded() -> None:
    flat = np.arange(10, 20)
    out = gather_padded(flat, np.array([0, 5]), np.array([3, 2]), pad=-1)
    assert out.tolist() == [[10, 11, 12], [15, 16, -1]]


def test_entity_f1_by_hand_with_conlleval_chunking() -> None:
    gold = ids("B-PER I-PER O B-LOC O B-ORG I-ORG")
    # PER right; LOC predicted as I-LOC (conlleval: I- after O opens a chunk -> right);
    # ORG cut short (wrong) plus a spurious MISC
    pred = ids("B-PER I-PER O I-LOC B-MISC B-ORG O")
    start = np.zeros(7, dtype=bool)
    start[0] = True
    out = entity_f1(gold, pred, start, NAMES)
    # gold chunks 3, predicted 4, correct 2 -> P = 50, R = 66.7, F1 = 57.14
    assert out["precision"] == pytest.approx(50.0)
    assert out["recall"] == pytest.approx(200 / 3)
    assert out["f1"] == pytest.approx(2 * 50 * (200 / 3) / (50 + 200 / 3))
    assert out["f1_PER"] == 100.0 and out["f1_ORG"] == 0.0 and out["f1_LOC"] == 100.0


def test_entity_chunks_do_not_cross_sentence_boundaries() -> None:
    gold = ids("B-PER I-PER")
    start = np.array([True, True])  # two one-token sentences: I-PER opens its own chunk
    pred = ids("B-PER B-PER")
    assert entity_f1(gold, pred, start, NAMES)["f1"] == 100.0


def test_squad_normalisation_and_scores_by_hand() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    out = squad_scores(["the cat sat", "dog"], [["cat sat", "a cat"], ["a big dog", "cat"]])
    # ex 1 exact after normalisation; ex 2: F1 vs "big dog" = 2 * (1 * 0.5) / 1.5 = 2/3
    assert out["em"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_decode_picks_the_best_valid_span() -> None:
    start = torch.tensor([[0.0, 5.0, 0.0, 9.0]])
    end = torch.tensor([[0.0, 0.0, 6.0, 0.0]])
    i, j = decode(start, end)  # (3, 3) scores 9 + 0; (1, 2) scores 5 + 6 = 11; end must be >= start
    assert (int(i), int(j)) == (1, 2)
    i, j = decode(torch.tensor([[9.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, 9.0]]), max_answer=2)
    assert int(j) - int(i) < 2


def _qa_inputs(b: int = 3, tc: int = 11, tq: int = 5):
    g = torch.Generator().manual_seed(0)
    c_ids, q_ids = torch.randint(2, 50, (b, tc), generator=g), torch.randint(2, 50, (b, tq), generator=g)
    c_len, q_len = torch.tensor([11, 7, 4]), torch.tensor([5, 3, 2])
    return c_ids, torch.arange(b * tc).reshape(b, tc), c_len, q_ids, torch.arange(b * tq).reshape(b, tq), q_len


def test_qa_end_logits_cover_context_positions_only() -> None:
    """Regression: one published implementation read the end logits from question positions."""
    cfg = RunConfig.for_mode("noisy_topk", dataset="squad", d_embed=8, d_model=8, expert_hidden=8, num_experts=4)
    model = SpanQA(cfg, 50).eval()
    c_ids, c_idx, c_len, q_ids, q_idx, q_len = _qa_inputs()
    (start, end), _, traces, _ = model(c_ids, c_idx, c_len, q_ids, q_idx, q_len)
    assert start.shape == end.shape == (3, 11)  # context length, not question length (5)
    for row, n in enumerate(c_len.tolist()):
        assert torch.isfinite(end[row, :n]).all() and torch.isinf(end[row, n:]).all()
    assert traces[0].token_idx.shape[0] == int(c_len.sum() + q_len.sum())  # both segments routed, no padding
    # padding tokens change nothing
    c2 = c_ids.clone()
    c2[1, 7:] = 3
    (start2, end2), _, _, _ = model(c2, c_idx, c_len, q_ids, q_idx, q_len)
    torch.testing.assert_close(end2, end)
    # the end logit at a context position depends on the context token there
    emb = model.emb.weight
    grad = torch.autograd.grad(end[0, 6], emb)[0]
    assert grad[c_ids[0, 6]].abs().sum() > 0


def test_tagger_routes_only_real_tokens() -> None:
    cfg = RunConfig.for_mode("switch", dataset="conll2003", d_embed=8, d_model=8, expert_hidden=8, num_experts=4)
    model = Tagger(cfg, 40, 9).eval()
    ids_ = torch.randint(2, 40, (3, 6))
    lengths = torch.tensor([6, 2, 4])
    idx = torch.arange(18).reshape(3, 6)
    logits, aux, traces, _ = model(ids_, idx, lengths)
    assert logits.shape == (3, 6, 9)
    real = torch.arange(6) < lengths.unsqueeze(1)
    assert sorted(traces[0].token_idx.tolist()) == sorted(idx[real].tolist())
    assert traces[0].hidden.shape == (12, 16)
