"""Pass@k: the chance that at least one of k samples is correct, estimated without bias from
n >= k samples of which c are correct (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code"):

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form never builds the huge binomials (n = 1024 is fine) and stays accurate in
floating point. The paper reports Pass@8 from 8 samples per problem (n = k), where it is simply
"any sample correct".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(n: int, c: int, k: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise TypeError(f"pass@k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k samples per problem, got n={n}: draw n >= {k} samples "
                         f"(or report pass@{n})")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must be in 0..n, got c={c} with n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct answers among `n` samples (k <= n)."""
    _check(n, c, k)
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): the chance that k draws miss all c correct ones.
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_many(n: Sequence[int] | int, c: Sequence[int], k: int) -> np.ndarray:
    """Vectorised pass@k: one value per problem, `c[j]` correct among `n[j]` samples (or the same
    `n` for all). Same product form, in logs: with S(m) = sum_{k < i <= m} log(1 - k/i), the miss
    probability of problem j is exp(S(n_j) - S(n_j - c_j)); one cumulative sum serves them all."""
    c_arr = np.asarray(c)
    n_arr = np.broadcast_to(np.asarray(n), c_arr.shape)
    if c_arr.ndim != 1 or c_arr.size == 0:
        raise ValueError(f"pass@k needs a non-empty 1-d list of correct counts, got shape {c_arr.shape}")
    if not (np.issubdtype(c_arr.dtype, np.integer) and np.issubdtype(n_arr.dtype, np.integer)):
        raise TypeError(f"pass@k needs integer counts, got dtypes n: {n_arr.dtype}, c: {c_arr.dtype}")
    if k < 1 or (n_arr < k).any():
        bad = int(n_arr.min())
        raise ValueError(f"pass@{k} needs k >= 1 and at least k samples per problem, got n = {bad} for some problem")
    if ((c_arr < 0) | (c_arr > n_arr)).any():
        raise ValueError("the number of correct samples must be in 0..n for every problem")
    i = np.arange(1, int(n_arr.max()) + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(i > k, np.log1p(-k / i), 0.0)  # i <= k is never summed (those problems score 1)
    S = np.concatenate([[0.0], np.cumsum(terms)])  # S[m] = sum over i <= m
    wrong = n_arr - c_arr
    out = np.ones(c_arr.shape, dtype=np.float64)
    some_miss = wrong >= k
    out[some_miss] = 0.0 - np.expm1(S[n_arr[some_miss]] - S[wrong[some_miss]])  # 0.0 -: no "-0.0"
    return out


def mean_pass_at_k(n: Sequence[int] | int, c: Sequence[int], k: int) -> float:
    """Mean pass@k over problems (the benchmark number)."""
    return float(pass_at_k_many(n, c, k).mean())
