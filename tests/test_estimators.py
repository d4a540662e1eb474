"""The two reverse-KL estimators against independent references.

`topk` (analytic over the teacher's top-k + one tail bucket) is pinned to a direct full-vocabulary
KL(q||p) computed here in numpy when k = V, to the chain-rule gap q_T KL(q(.|T) || p(.|T)) when
k < V (so it is a lower bound, exact when q and p agree in shape on the tail), for every objective
with a reverse-KL term; `sampled` to its score-function expectation. Also the worst-case and Zipf
top-k mass analyses of eopd/teacher_stats.py, and which estimator each shipped config names.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from eopd.losses import (ObjectiveConfig, TokenBatch, chunked_objective, reverse_kl_topk, token_objective,
                         topk_buckets)
from eopd.teacher_stats import max_tail_mass, zipf_topk_mass
from pipeline.config import CONFIGS_DIR, DEFAULT_CONFIG, load_config

D = torch.float64  # every tensor here: the references are exact to ~1e-12


def _np_kl(a: np.ndarray, b: np.ndarray) -> float:
    """KL(a || b) for probability vectors, straight from the definition."""
    m = a > 0
    return float(np.sum(a[m] * (np.log(a[m]) - np.log(b[m]))))


def _batch(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    teacher = F.log_softmax(teacher_logits, -1)
    student = F.log_softmax(student_logits, -1)
    y = torch.multinomial(student.exp(), 1, generator=g)[:, 0]
    top = teacher.topk(k, -1)
    return TokenBatch(sampled_ids=y, behaviour_logprobs=student.gather(1, y[:, None])[:, 0],
                      teacher_token_logprobs=teacher.gather(1, y[:, None])[:, 0], teacher_topk_ids=top.indices,
                      teacher_topk_logprobs=top.values, teacher_entropy=-(teacher.exp() * teacher).sum(-1))


def _logits(n: int, v: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, v, generator=g, dtype=D) * scale
    student = teacher + torch.randn(n, v, generator=g, dtype=D) * 0.7  # a student near the teacher, as on-policy
    return student, teacher


@pytest.mark.parametrize("objective", ["rkl", "eopd", "full"])
def test_topk_at_full_vocabulary_is_the_exact_kl_for_every_objective_with_an_rkl_term(objective):
    n, v = 12, 9
    student, teacher = _logits(n, v, seed=1)
    batch = _batch(student, teacher, k=v)
    cfg = ObjectiveConfig(objective=objective, rkl_estimator="topk", tau=0.8, lam=0.7)
    loss, stats = token_objective(student, batch, cfg)
    q, p = F.softmax(student, -1).numpy(), F.softmax(teacher, -1).numpy()
    h = -(p * np.log(p)).sum(-1)
    for t in range(n):
        rkl = _np_kl(q[t], p[t])  # full-vocabulary KL(q || p), the reference
        fkl = _np_kl(p[t], q[t])  # at k = V the paper's renormalised FKL is KL(p || q)
        weight = {"rkl": 0.0, "eopd": 0.7 * float(h[t] > 0.8), "full": 0.7}[objective]
        assert float(loss[t]) == pytest.approx(rkl + weight * fkl, rel=1e-10, abs=1e-12)
    assert stats["rkl_sum"] == pytest.approx(sum(_np_kl(q[t], p[t]) for t in range(n)), rel=1e-10)


def test_topk_is_a_lower_bound_with_the_chain_rule_gap():
    n, v = 40, 30
    student, teacher = _logits(n, v, seed=2, scale=1.5)
    q, p = F.softmax(student, -1).numpy(), F.softmax(teacher, -1).numpy()
    for k in (1, 2, 4, 8, 16, 29):
        top = F.log_softmax(teacher, -1).topk(k, -1)
        est = reverse_kl_topk(*topk_buckets(F.log_softmax(student, -1), top.indices, top.values)).numpy()
        for t in range(n):
            tail = np.setdiff1d(np.arange(v), top.indices[t].numpy())
            q_t, p_t = q[t, tail].sum(), p[t, tail].sum()
            full = _np_kl(q[t], p[t])
            gap = q_t * _np_kl(q[t, tail] / q_t, p[t, tail] / p_t)
            assert est[t] <= full + 1e-12
            assert full - est[t] == pytest.approx(gap, rel=1e-8, abs=1e-12)
    # the bound tightens as k grows (a finer partition), down to 0 at k = V
    means = []
    for k in (2, 4, 8, 16, v):
        top = F.log_softmax(teacher, -1).topk(k, -1)
        means.append(float(reverse_kl_topk(*topk_buckets(F.log_softmax(student, -1), top.indices, top.values)).mean()))
    assert means == sorted(means) and means[-1] == pytest.approx(np.mean([_np_kl(q[t], p[t]) for t in range(n)]), rel=1e-10)


def test_topk_is_exact_when_student_and_teacher_agree_in_shape_on_the_tail():
    n, v, k = 6, 20, 4
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(n, v, generator=g, dtype=D) * 2
    top = F.log_softmax(teacher, -1).topk(k, -1)
    student = teacher + 0.5  # tail: the teacher's logits shifted by one constant = the same conditional shape
    student.scatter_(1, top.indices, torch.randn(n, k, generator=g, dtype=D) * 3)  # the top-k: anything
    q, p = F.softmax(student, -1).numpy(), F.softmax(teacher, -1).numpy()
    est = reverse_kl_topk(*topk_buckets(F.log_softmax(student, -1), top.indices, top.values))
    for t in range(n):
        assert float(est[t]) == pytest.approx(_np_kl(q[t], p[t]), rel=1e-10)


def test_topk_gradient_at_full_vocabulary_through_the_chunked_head_is_the_exact_kl_gradient():
    n, h, v = 10, 6, 7
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(n, h, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=D, requires_grad=True)
    teacher = torch.randn(n, v, generator=g, dtype=D) * 2
    batch = _batch((hidden @ w.T).detach(), teacher, k=v)
    loss, _ = chunked_objective(hidden, w, batch, ObjectiveConfig(objective="rkl", rkl_estimator="topk"),
                                normalizer=n, chunk_size=3)
    loss.backward()
    # reference: autograd of the textbook KL(q || p) over the whole vocabulary
    h2, w2 = hidden.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    logq = F.log_softmax(h2 @ w2.T, -1)
    ref = (logq.exp() * (logq - F.log_softmax(teacher, -1))).sum() / n
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-9, atol=1e-12)


def test_sampled_gradient_is_unbiased_for_the_exact_kl_gradient_at_ratio_one():
    """E_{y ~ q}[ d sampled(y) / d logits ] = d KL(q || p) / d logits (at q_old = q), computed as an
    exact expectation over y, not by sampling."""
    v = 6
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(1, v, generator=g, dtype=D), torch.randn(1, v, generator=g, dtype=D)
    q = F.softmax(student, -1)[0]
    expected = torch.zeros(v, dtype=D)
    for y in range(v):
        z = student.clone().requires_grad_(True)
        logq = F.log_softmax(z, -1)
        batch = _batch(student, teacher, k=3)
        batch.sampled_ids = torch.tensor([y])
        batch.behaviour_logprobs = logq.detach()[:, y]
        batch.teacher_token_logprobs = F.log_softmax(teacher, -1)[:, y]
        loss, _ = token_objective(z, batch, ObjectiveConfig(objective="rkl", rkl_estimator="sampled"))
        (grad,) = torch.autograd.grad(loss.sum(), z)
        expected += q[y] * grad[0]
    z = student.clone().requires_grad_(True)
    logq = F.log_softmax(z, -1)
    (ref,) = torch.autograd.grad((logq.exp() * (logq - F.log_softmax(teacher, -1))).sum(), z)
    torch.testing.assert_close(expected, ref[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["fkl", "jsd"])
def test_objectives_without_an_rkl_term_ignore_the_estimator(objective):
    student, teacher = _logits(8, 10, seed=6)
    batch = _batch(student, teacher, k=4)
    a, _ = token_objective(student, batch, ObjectiveConfig(objective=objective, rkl_estimator="sampled"))
    b, _ = token_objective(student, batch, ObjectiveConfig(objective=objective, rkl_estimator="topk"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------- top-k mass at a given entropy


def test_max_tail_mass_bounds_random_distributions_and_is_attained():
    rng = np.random.default_rng(0)
    v, k = 400, 16
    for _ in range(400):
        logits = rng.standard_normal(v) * rng.uniform(0.2, 6.0)
        logits[: rng.integers(1, 40)] += rng.uniform(0, 8)  # a few favourites, as LM heads have
        p = np.exp(logits - logits.max())
        p /= p.sum()
        h = float(-(p * np.log(p)).sum())
        tail = 1.0 - np.sort(p)[::-1][:k].sum()
        assert tail <= max_tail_mass(h, k, v) + 1e-9
    # attained by its family: one top token of 1 - u and m tokens of u / m
    t = max_tail_mass(0.8, k, v)
    m = np.arange(k, v)[:, None]
    u = np.linspace(1e-9, 1.0, 4001)[None, :] * m / (m + 1)
    hu = -u * np.log(u) - (1 - u) * np.log1p(-u) + u * np.log(m)
    near = np.abs(hu - 0.8) < 2e-3
    tails = (u * (m - k + 1) / m)[near]
    assert tails.max() <= t + 2e-3 and tails.max() >= t - 2e-3  # the family's best is what it returns
    assert max_tail_mass(0.0, k, v) == 0.0 and max_tail_mass(math.log(v), k, v) == pytest.approx(1 - k / v)


def test_zipf_topk_mass_hits_the_entropy_asked():
    v = 5000
    mass, s = zipf_topk_mass(2.0, 16, v)
    p = np.arange(1, v + 1, dtype=float) ** -s
    p /= p.sum()
    assert float(-(p * np.log(p)).sum()) == pytest.approx(2.0, abs=1e-6)
    assert mass == pytest.approx(p[:16].sum(), rel=1e-9)
    assert zipf_topk_mass(0.8, 16, v)[0] > mass  # lower entropy, more mass in the top-16
# ------------------------------------------------------------------- which estimator the configs name


def test_demo_default_uses_the_analytic_estimator_and_the_paper_configs_the_sampled_one():
    assert load_config(DEFAULT_CONFIG).train.rkl_estimator == "topk"
    assert load_config(DEFAULT_CONFIG, ["train.rkl_estimator=sampled"]).train.rkl_estimator == "sampled"
    papers = sorted((CONFIGS_DIR / "paper").glob("*.yaml"))
    assert papers
    for path in papers:
        assert yaml.safe_load(path.read_text())["train"]["rkl_estimator"] == "sampled", path
        assert yaml.safe_load(path.read_text())["train"]["objective"] == "eopd", path
