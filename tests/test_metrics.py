"""Logging metrics: entropies, the top-k change rate, stat summaries."""

from __future__ import annotations

import math

import pytest
import torch

from eopd.metrics import (entropy_from_logits, entropy_from_logprobs, merge_stats, student_topk_ids, summarize_stats,
                          topk_jaccard_distance)


def test_topk_jaccard_distance_known_values():
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert topk_jaccard_distance(a, a) == 0.0
    assert topk_jaccard_distance(a, a.flip(-1)) == 0.0  # sets, not rankings
    assert topk_jaccard_distance(a, a + 100) == 1.0
    b = torch.tensor([[2, 3, 10], [4, 11, 12], [7, 8, 9]])
    # row 0: |{2,3}| / |{1,2,3,10}| = 2/4; row 1: 1/5; row 2: unchanged
    assert topk_jaccard_distance(a, b) == pytest.approx(((1 - 2 / 4) + (1 - 1 / 5) + 0) / 3)


def test_topk_jaccard_distance_matches_python_sets():
    g = torch.Generator().manual_seed(0)
    prev = torch.stack([torch.randperm(30, generator=g)[:10] for _ in range(50)])
    cur = torch.stack([torch.randperm(30, generator=g)[:10] for _ in range(50)])
    want = sum(1 - len(set(p) & set(c)) / len(set(p) | set(c)) for p, c in zip(prev.tolist(), cur.tolist())) / 50
    assert topk_jaccard_distance(prev, cur) == pytest.approx(want, abs=1e-12)


def test_topk_jaccard_distance_refuses_mismatched_or_empty():
    with pytest.raises(ValueError):
        topk_jaccard_distance(torch.zeros(3, 10, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long))
    with pytest.raises(ValueError):
        topk_jaccard_distance(torch.zeros(0, 10, dtype=torch.long), torch.zeros(0, 10, dtype=torch.long))


def test_entropy_from_logits():
    assert float(entropy_from_logits(torch.zeros(7))) == pytest.approx(math.log(7))
    masked = torch.tensor([0.0, 0.0, float("-inf"), 0.0])
    assert float(entropy_from_logits(masked)) == pytest.approx(math.log(3))
    z = torch.randn(4, 33, dtype=torch.float64)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(entropy_from_logits(z), -(p * p.log()).sum(-1))
    torch.testing.assert_close(entropy_from_logprobs(torch.log_softmax(z, -1)), -(p * p.log()).sum(-1))
    assert entropy_from_logits(z.bfloat16()).dtype == torch.float32


def test_student_topk_ids_matches_full_logits():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(23, 8, generator=g), torch.randn(97, 8, generator=g)
    ids = student_topk_ids(hidden, weight, k=10, chunk_size=5)
    want = (hidden @ weight.T).topk(10, dim=-1).indices
    assert ids.shape == (23, 10)
    assert topk_jaccard_distance(ids, want) == 0.0


def test_summarize_and_merge_stats():
    part = {"loss_sum": 10.0, "rkl_sum": 4.0, "fkl_sum": 12.0, "fkl_gated_sum": 6.0, "gated_tokens": 2.0,
            "student_entropy_sum": 8.0, "student_entropy_gated_sum": 3.0, "teacher_entropy_sum": 5.0,
            "clipped_tokens": 1.0, "tokens": 4.0}
    total = merge_stats([part, part])
    assert total["tokens"] == 8.0 and total["fkl_gated_sum"] == 12.0
    s = summarize_stats(total)
    assert s == {"loss": 2.5, "rkl": 1.0, "fkl": 3.0, "fkl_high_entropy": 3.0, "gate_fraction": 0.5,
                 "clip_fraction": 0.25, "student_entropy": 2.0, "student_entropy_high_entropy": 1.5,
                 "teacher_entropy": 1.25, "tokens": 8.0}
    assert math.isnan(summarize_stats({**part, "gated_tokens": 0.0, "fkl_gated_sum": 0.0})["fkl_high_entropy"])
    with pytest.raises(ValueError):
        summarize_stats({**part, "tokens": 0.0})
