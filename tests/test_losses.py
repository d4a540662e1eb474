"""The EOPD objective: exactness at k = V, the gate, the PPO-style RKL, chunked == naive."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import eopd.losses as losses
from eopd.losses import (OBJECTIVES, ObjectiveConfig, TokenBatch, chunked_objective, entropy_gate, forward_kl_renorm,
                         forward_kl_tail, jsd, log1mexp, naive_objective, reverse_kl_sampled, reverse_kl_topk,
                         token_objective, topk_buckets)

F64 = torch.float64


def exact_kl(logp_a, logp_b):
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def make_batch(n, vocab, k, dtype=F64, seed=0, entropy=None):
    """Teacher = softmax of random logits; rollout tokens and behaviour log-probs near a random policy."""
    g = torch.Generator().manual_seed(seed)
    teacher = F.log_softmax(torch.randn(n, vocab, generator=g, dtype=dtype) * 2, -1)
    top = teacher.topk(k, dim=-1)
    y = torch.randint(vocab, (n,), generator=g)
    if entropy is None:
        entropy = torch.special.entr(teacher.exp()).sum(-1)
    return TokenBatch(sampled_ids=y, behaviour_logprobs=-torch.rand(n, generator=g, dtype=dtype) * 4,
                      teacher_token_logprobs=teacher.gather(1, y[:, None])[:, 0], teacher_topk_ids=top.indices,
                      teacher_topk_logprobs=top.values, teacher_entropy=entropy)


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), g


# ---------------------------------------------------------------------------------- k = V


def full_vocab_setup(n=5, vocab=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(n, vocab, generator=g, dtype=F64) * 1.5
    teacher = F.log_softmax(torch.randn(n, vocab, generator=g, dtype=F64) * 1.5, -1)
    # S = every token, in a random order per row (the order must not matter)
    ids = torch.stack([torch.randperm(vocab, generator=g) for _ in range(n)])
    return student_logits, teacher, ids, teacher.gather(1, ids)


def test_bucket_divergences_are_exact_when_k_equals_vocab():
    logits, teacher, ids, teacher_s = full_vocab_setup()

    def buckets(z):
        return topk_buckets(F.log_softmax(z, -1), ids, teacher_s)

    cases = {
        "fkl_tail": (lambda z: forward_kl_tail(*buckets(z)), lambda z: exact_kl(teacher, F.log_softmax(z, -1))),
        "fkl_renorm": (lambda z: forward_kl_renorm(F.log_softmax(z, -1).gather(1, ids), teacher_s),
                       lambda z: exact_kl(teacher, F.log_softmax(z, -1))),
        "rkl_topk": (lambda z: reverse_kl_topk(*buckets(z)), lambda z: exact_kl(F.log_softmax(z, -1), teacher)),
    }
    for name, (coarse, exact) in cases.items():
        v1, g1 = grad_of(coarse, logits)
        v2, g2 = grad_of(exact, logits)
        assert v2.min() > 1e-3, name  # a real divergence, not 0 == 0
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10, msg=name)


def test_jsd_is_exact_when_k_equals_vocab_and_matches_the_gkd_formula():
    logits, teacher, ids, teacher_s = full_vocab_setup()
    for beta in (0.1, 0.5, 0.9):
        def exact(z):
            q = F.log_softmax(z, -1)
            m = torch.log(beta * teacher.exp() + (1 - beta) * q.exp())
            return beta * exact_kl(teacher, m) + (1 - beta) * exact_kl(q, m)

        v1, g1 = grad_of(lambda z: jsd(*topk_buckets(F.log_softmax(z, -1), ids, teacher_s), beta), logits)
        v2, g2 = grad_of(exact, logits)
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-10)
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="beta"):
        jsd(teacher, teacher, 1.0)


def test_buckets_are_distributions_and_tail_fkl_bounds_the_full_kl():
    logits, teacher, _, _ = full_vocab_setup(n=6, vocab=50)
    top = teacher.topk(4, -1)
    student = F.log_softmax(logits, -1)
    q_b, p_b = topk_buckets(student, top.indices, top.values)
    assert q_b.shape == p_b.shape == (6, 5)
    torch.testing.assert_close(q_b.exp().sum(-1), torch.ones(6, dtype=F64))
    torch.testing.assert_close(p_b.exp().sum(-1), torch.ones(6, dtype=F64))
    full = exact_kl(teacher, student)
    tail = forward_kl_tail(q_b, p_b)
    for row in range(6):
        p = top.values[row].exp().tolist()
        q = student[row, top.indices[row]].exp().tolist()
        p, q = p + [1 - sum(p)], q + [1 - sum(q)]
        assert float(tail[row]) == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-10)
        assert float(reverse_kl_topk(q_b, p_b)[row]) == pytest.approx(sum(b * math.log(b / a) for a, b in zip(p, q)),
                                                                      rel=1e-10)
    assert (tail <= full + 1e-12).all() and (tail < full).any()
    assert (reverse_kl_topk(q_b, p_b) <= exact_kl(student, teacher) + 1e-12).all()


def test_renorm_fkl_with_k_below_vocab_follows_the_formula():
    g = torch.Generator().manual_seed(5)
    student = F.log_softmax(torch.randn(3, 12, generator=g, dtype=F64), -1)
    teacher = F.log_softmax(torch.randn(3, 12, generator=g, dtype=F64) * 2, -1)
    top = teacher.topk(4, -1)
    got = forward_kl_renorm(student.gather(1, top.indices), top.values)
    for row in range(3):
        p = [math.exp(v) for v in top.values[row].tolist()]
        q = [math.exp(v) for v in student[row, top.indices[row]].tolist()]
        want = sum(pi / sum(p) * math.log(pi / sum(p) / qi) for pi, qi in zip(p, q))  # q not renormalised
        assert float(got[row]) == pytest.approx(want, rel=1e-12)
    # the teacher's top-k mass does not matter, only its shape on S
    torch.testing.assert_close(forward_kl_renorm(student.gather(1, top.indices), top.values - 0.7), got)


def test_log1mexp_is_accurate_and_finite_at_zero():
    x = torch.tensor([-1e-20, -1e-8, -0.3, -math.log(2), -1.0, -30.0, -800.0], dtype=F64)
    want = torch.tensor([math.log(-math.expm1(v)) if v > -1 else math.log1p(-math.exp(v)) for v in x.tolist()], dtype=F64)
    torch.testing.assert_close(log1mexp(x), want, rtol=1e-12, atol=0)
    # a top-k set holding all the mass (or a bit more, from quantised log-probs): finite, no NaN gradient
    edge = torch.tensor([0.0, 1e-6], dtype=F64, requires_grad=True)
    out = log1mexp(edge)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(edge.grad, torch.zeros(2, dtype=F64))


# ---------------------------------------------------------------------------------- sampled RKL


def test_sampled_rkl_gradient_inside_and_outside_the_clip():
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0], dtype=F64)
    # log q(y) - log q_old(y): r = 1.1 (inside), 1.5 and 0.5 (outside)
    shift = torch.tensor([math.log(1.1), math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)], dtype=F64)
    adv = torch.tensor([0.7, 0.7, -0.7, 0.7, -0.7], dtype=F64)  # A = log p(y) - log q_old(y)
    student = (old + shift).requires_grad_(True)
    loss = reverse_kl_sampled(student, old, old + adv, clip_eps=0.2)
    loss.sum().backward()
    r = shift.exp()
    torch.testing.assert_close(loss.detach()[0], -r[0] * adv[0])
    # inside the clip: d loss / d log q(y) = -r A  (= -A at r = 1)
    torch.testing.assert_close(student.grad[0], -r[0] * adv[0])
    # clipped on the side A pushes towards: no gradient, value -(1 +- eps) A
    assert student.grad[1] == 0 and student.grad[2] == 0
    torch.testing.assert_close(loss.detach()[1], -1.2 * adv[1])
    torch.testing.assert_close(loss.detach()[2], -0.8 * adv[2])
    # outside on the other side: the unclipped term wins and still pulls back
    torch.testing.assert_close(student.grad[3:], -r[3:] * adv[3:])


def test_sampled_rkl_at_ratio_one_is_minus_advantage_times_score():
    batch = make_batch(8, 20, 4)
    logits = torch.randn(8, 20, dtype=F64)
    # behaviour = the current student: r = 1 everywhere
    logq = F.log_softmax(logits, -1)
    batch.behaviour_logprobs = logq.gather(1, batch.sampled_ids[:, None])[:, 0]
    cfg = ObjectiveConfig(objective="rkl")
    _, grad = grad_of(lambda z: token_objective(z, batch, cfg)[0], logits)
    adv = batch.teacher_token_logprobs - batch.behaviour_logprobs
    _, score = grad_of(lambda z: (F.log_softmax(z, -1).gather(1, batch.sampled_ids[:, None])[:, 0] * -adv), logits)
    torch.testing.assert_close(grad, score, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- the gate


def test_ungated_tokens_get_no_fkl_gradient():
    entropy = torch.tensor([0.1, 2.0, 0.79, 0.81, 3.0, 0.0], dtype=F64)
    batch = make_batch(6, 30, 5, entropy=entropy)
    logits = torch.randn(6, 30, dtype=F64)
    for estimator in ("sampled", "topk"):
        _, g_eopd = grad_of(lambda z: token_objective(z, batch, ObjectiveConfig(rkl_estimator=estimator))[0], logits)
        _, g_rkl = grad_of(lambda z: token_objective(z, batch, ObjectiveConfig("rkl", estimator))[0], logits)
        fkl_part = (g_eopd - g_rkl).abs().sum(-1)
        gated = entropy > 0.8
        assert torch.equal(fkl_part[~gated], torch.zeros(int((~gated).sum()), dtype=F64))
        assert (fkl_part[gated] > 1e-6).all()


def test_eopd_with_lambda_zero_is_rkl_and_full_is_eopd_with_every_token_gated():
    batch = make_batch(10, 40, 6)
    logits = torch.randn(10, 40, dtype=F64) * 2
    for estimator in ("sampled", "topk"):
        v1, g1 = grad_of(lambda z: token_objective(z, batch, ObjectiveConfig(rkl_estimator=estimator, lam=0.0))[0], logits)
        v2, g2 = grad_of(lambda z: token_objective(z, batch, ObjectiveConfig("rkl", estimator))[0], logits)
        torch.testing.assert_close(v1, v2, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    everyone = torch.ones(10, dtype=torch.bool)
    v1, g1 = grad_of(lambda z: token_objective(z, batch, ObjectiveConfig(lam=0.5), gate=everyone)[0], logits)
    v2, g2 = grad_of(lambda z: token_objective(z, batch, ObjectiveConfig("full", lam=0.5))[0], logits)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2)


def test_gate_threshold_and_quantile():
    h = torch.tensor([0.5, 0.8, 0.80001, 2.0])
    assert entropy_gate(h).tolist() == [False, False, True, True]  # strictly above tau = 0.8
    assert entropy_gate(h, tau=0.1).tolist() == [True] * 4
    # 1001 distinct values: the q-quantile is the value of rank 1000 q itself, which is not gated
    h = torch.randperm(1001).float() / 100
    for q in (0.2, 0.8, 0.95):
        gate = entropy_gate(h, quantile=q)
        assert int(gate.sum()) == round(1000 * (1 - q))
        assert h[gate].min() > h[~gate].max()  # the highest-entropy tokens


def test_token_objective_stats():
    entropy = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0], dtype=F64)
    batch = make_batch(5, 25, 4, entropy=entropy)
    logits = torch.randn(5, 25, dtype=F64)
    loss, stats = token_objective(logits, batch, ObjectiveConfig())
    assert set(stats) == set(losses.STAT_KEYS)
    logq = F.log_softmax(logits, -1)
    fkl = forward_kl_renorm(logq.gather(1, batch.teacher_topk_ids), batch.teacher_topk_logprobs)
    gate = entropy > 0.8
    assert stats["tokens"] == 5 and stats["gated_tokens"] == 3
    torch.testing.assert_close(stats["fkl_sum"], fkl.sum())
    torch.testing.assert_close(stats["fkl_gated_sum"], fkl[gate].sum())
    torch.testing.assert_close(stats["loss_sum"], loss.sum())
    torch.testing.assert_close(stats["loss_sum"], stats["rkl_sum"] + stats["fkl_gated_sum"])
    torch.testing.assert_close(stats["student_entropy_sum"], -(logq.exp() * logq).sum())
    torch.testing.assert_close(stats["student_entropy_gated_sum"], -(logq.exp() * logq).sum(-1)[gate].sum())
    torch.testing.assert_close(stats["teacher_entropy_sum"], entropy.sum())
    ratio = (logq.gather(1, batch.sampled_ids[:, None])[:, 0] - batch.behaviour_logprobs).exp()
    adv = batch.teacher_token_logprobs - batch.behaviour_logprobs
    want_clipped = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    assert stats["clipped_tokens"] == want_clipped.sum()


# ---------------------------------------------------------------------------------- chunked == naive


CONFIGS = [ObjectiveConfig(objective=o) for o in OBJECTIVES] + [
    ObjectiveConfig(rkl_estimator="topk", fkl_mode="tail"),
    ObjectiveConfig(objective="full", rkl_estimator="topk", lam=0.3),
    ObjectiveConfig(objective="fkl", fkl_mode="tail"),
    ObjectiveConfig(gate_quantile=0.7, clip_eps=0.1),
    ObjectiveConfig(objective="jsd", jsd_beta=0.2),
]


def head_inputs(n, vocab, hidden_size, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(n, hidden_size, generator=g, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=dtype) / hidden_size ** 0.5 * 3).requires_grad_(True)
    return hidden, weight, make_batch(n, vocab, k, dtype=dtype, seed=seed)


def loss_and_grads(fn, hidden, weight, batch, cfg, **kw):
    hidden.grad = weight.grad = None
    loss, stats = fn(hidden, weight, batch, cfg, 50.0, **kw)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone(), stats


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.objective}-{c.rkl_estimator}-{c.fkl_mode}-q{c.gate_quantile}")
def test_chunked_matches_naive(cfg, dtype, tol):
    # N = 37 and V = 103 are not multiples of the chunk (8), nor of each other
    hidden, weight, batch = head_inputs(37, 103, 16, 5, dtype)
    ref = loss_and_grads(naive_objective, hidden, weight, batch, cfg)
    got = loss_and_grads(chunked_objective, hidden, weight, batch, cfg, chunk_size=8)
    assert ref[1].abs().max() > 1e-4 and ref[2].abs().max() > 1e-4
    for a, b in zip(ref[:3], got[:3]):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    assert got[3].keys() == ref[3].keys() == set(losses.STAT_KEYS)
    for key in ref[3]:
        assert got[3][key] == pytest.approx(ref[3][key], rel=tol, abs=tol), key


def test_chunked_scales_by_grad_output_and_handles_partial_requires_grad():
    cfg = ObjectiveConfig()
    hidden, weight, batch = head_inputs(21, 50, 8, 4, F64)
    loss, _ = naive_objective(hidden, weight, batch, cfg, 21.0)
    ref = torch.autograd.grad(3.5 * loss, (hidden, weight))
    loss, _ = chunked_objective(hidden, weight, batch, cfg, 21.0, chunk_size=4)
    got = torch.autograd.grad(3.5 * loss, (hidden, weight))
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a)
    frozen_head = weight.detach()
    loss, _ = chunked_objective(hidden, frozen_head, batch, cfg, 21.0, chunk_size=4)
    (g,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(g, ref[0] / 3.5)
    with torch.no_grad():
        value, stats = chunked_objective(hidden, weight, batch, cfg, 21.0, chunk_size=4)
    assert not value.requires_grad
    torch.testing.assert_close(value, loss.detach())
    assert stats["tokens"] == 21


def test_chunked_never_sees_more_than_a_chunk(monkeypatch):
    seen = []
    original = losses._chunk_loss_and_grad

    def spy(logits, *args, **kw):
        seen.append(tuple(logits.shape))
        return original(logits, *args, **kw)

    monkeypatch.setattr(losses, "_chunk_loss_and_grad", spy)
    hidden, weight, batch = head_inputs(37, 103, 16, 5, torch.float32)
    loss, _ = chunked_objective(hidden, weight, batch, ObjectiveConfig(), 37.0, chunk_size=8)
    loss.backward()
    assert seen == [(8, 103)] * 4 + [(5, 103)]


def test_micro_batches_with_a_shared_gate_add_up_to_the_batch_loss():
    # a quantile gate over the optimiser batch, passed to each micro-batch; normalizer = all tokens
    cfg = ObjectiveConfig(gate_quantile=0.6)
    hidden, weight, batch = head_inputs(40, 60, 8, 4, F64)
    whole, _ = naive_objective(hidden, weight, batch, cfg, 40.0)
    ref = torch.autograd.grad(whole, (hidden, weight))
    gate = entropy_gate(batch.teacher_entropy, quantile=0.6)
    total = sum(chunked_objective(hidden[a:b], weight, batch.slice(a, b), cfg, 40.0, chunk_size=7, gate=gate[a:b])[0]
                for a, b in ((0, 13), (13, 40)))
    got = torch.autograd.grad(total, (hidden, weight))
    torch.testing.assert_close(total, whole)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a)


def test_bf16_inputs_run_and_match_the_naive_path():
    hidden, weight, batch = head_inputs(30, 70, 16, 4, torch.float32)
    hidden = hidden.detach().bfloat16().requires_grad_(True)
    weight = weight.detach().bfloat16().requires_grad_(True)
    cfg = ObjectiveConfig(objective="full")
    ref = loss_and_grads(naive_objective, hidden, weight, batch, cfg)
    got = loss_and_grads(chunked_objective, hidden, weight, batch, cfg, chunk_size=8)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ref[1:3], got[1:3]):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-4)  # bf16 rounding of the returned grads
        assert b.abs().max() > 1e-3


def test_tied_embeddings_get_both_gradients():
    vocab, width, n = 50, 12, 19
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(vocab, width, generator=g, dtype=F64).requires_grad_(True)
    mix = torch.randn(width, width, generator=g, dtype=F64)
    tokens = torch.randint(vocab, (n,), generator=g)
    batch = make_batch(n, vocab, 4)
    grads = []
    for fn, kw in ((naive_objective, {}), (chunked_objective, {"chunk_size": 5})):
        hidden = torch.tanh(embedding[tokens] @ mix)  # the same W is the input embedding and the head
        loss, _ = fn(hidden, embedding, batch, ObjectiveConfig(), float(n), **kw)
        grads.append(torch.autograd.grad(loss, embedding)[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_bad_head_inputs_are_refused():
    hidden, weight, batch = head_inputs(10, 20, 4, 3, F64)
    with pytest.raises(ValueError, match="normalizer"):
        chunked_objective(hidden, weight, batch, ObjectiveConfig(), 0.0)
    with pytest.raises(ValueError, match="rows"):
        chunked_objective(hidden[:9], weight, batch, ObjectiveConfig(), 10.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_objective(hidden, weight, batch, ObjectiveConfig(), 10.0, chunk_size=0)
    with pytest.raises(ValueError, match="teacher_entropy"):
        TokenBatch(batch.sampled_ids, batch.behaviour_logprobs, batch.teacher_token_logprobs, batch.teacher_topk_ids,
                   batch.teacher_topk_logprobs, batch.teacher_entropy[:5])


# ---------------------------------------------------------------------------------- config


def test_config_defaults_are_the_papers_eopd():
    cfg = ObjectiveConfig()
    assert (cfg.objective, cfg.rkl_estimator, cfg.fkl_mode, cfg.tau, cfg.gate_quantile, cfg.lam, cfg.clip_eps) == \
        ("eopd", "sampled", "renorm", 0.8, None, 1.0, 0.2)


@pytest.mark.parametrize("field,value", [
    ("objective", "kl"), ("rkl_estimator", "exact"), ("fkl_mode", "renormalised"), ("tau", -0.1),
    ("tau", float("nan")), ("tau", "0.8"), ("tau", True), ("lam", -1.0), ("lam", float("inf")), ("clip_eps", 0.0),
    ("clip_eps", 1.0), ("jsd_beta", 0.0), ("jsd_beta", 1.0), ("gate_quantile", 1.0), ("gate_quantile", 0.0),
    ("gate_quantile", 1.5),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ObjectiveConfig\.{field}\b"):
        ObjectiveConfig(**{field: value})
