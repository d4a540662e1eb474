"""Unbiased pass@k against the closed form 1 - C(n-c, k) / C(n, k) in exact integer arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from eopd.passk import mean_pass_at_k, pass_at_k, pass_at_k_many


def closed_form(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


CASES = [(10, 3, 1), (10, 3, 2), (10, 3, 8), (8, 1, 8), (8, 7, 2), (16, 5, 4), (100, 1, 1), (100, 1, 10),
         (200, 13, 64), (1024, 3, 128), (5, 2, 4)]


@pytest.mark.parametrize("n,c,k", CASES)
def test_matches_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), rel=1e-12, abs=1e-15)


def test_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # k = 1 is the plain accuracy c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs hold the correct one
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # only {wrong, wrong} misses
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_edges():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0  # k = n: "any sample correct"
    assert pass_at_k(10, 8, 3) == 1.0  # fewer than k wrong samples: every draw of k holds a correct one
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


def test_no_overflow_or_cancellation():
    # C(4096, 512) overflows a float; the product form does not care.
    assert pass_at_k(4096, 1, 512) == pytest.approx(512 / 4096, rel=1e-12)
    assert 0 < pass_at_k(4096, 1, 1) == pytest.approx(1 / 4096, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (3, 4, 1), (3, -1, 1), (4, 1, 0)])
def test_refused(n, c, k):
    with pytest.raises(ValueError) as e:
        pass_at_k(n, c, k)
    if k > n:
        assert f"pass@{k} needs at least k samples" in str(e.value)
    with pytest.raises(ValueError):
        pass_at_k_many([n], [c], k)


def test_non_integers_refused():
    with pytest.raises(TypeError):
        pass_at_k(10, 2.5, 1)
    with pytest.raises(TypeError):
        pass_at_k_many([10, 10], [2.5, 1.0], 1)


def test_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    n = rng.integers(8, 300, size=500)
    c = rng.integers(0, n + 1)
    for k in (1, 2, 8):
        many = pass_at_k_many(n, c, k)
        expected = [closed_form(int(a), int(b), k) for a, b in zip(n, c)]
        np.testing.assert_allclose(many, expected, rtol=1e-10, atol=1e-14)
        assert mean_pass_at_k(n, c, k) == pytest.approx(float(np.mean(expected)), rel=1e-10)
    assert mean_pass_at_k(8, [0, 8, 1], 8) == pytest.approx(2 / 3)  # one n for every problem
    assert pass_at_k_many(8, [0], 8)[0] == 0.0 and pass_at_k_many(10, [10], 3)[0] == 1.0
