"""Chunked teacher statistics against a float64 full-softmax reference and the fp32 naive path."""

from __future__ import annotations

import math

import pytest
import torch

from eopd.teacher_stats import TokenStats, chunked_token_stats, token_stats_naive


def make_inputs(T=37, H=16, V=1000, scale=3.0, seed=0, dtype=torch.float32):
    """Continuous random inputs (no ties); row norms from 0.3x to 3x give entropies from ~0 to ~log V."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g) * torch.logspace(math.log10(0.3), math.log10(3), T)[:, None]
    weight = torch.randn(V, H, generator=g) * scale / math.sqrt(H)
    target = torch.randint(0, V, (T,), generator=g)
    return hidden.to(dtype), weight.to(dtype), target


def reference(hidden, weight, target, k, bias=None) -> TokenStats:
    """float64 full log_softmax of the fp32 logits: the ground truth for the statistics given the
    logits (logits computed in float64 would differ by fp32 matmul rounding, ~1e-4 at |z| ~ 1000)."""
    z = hidden.float() @ weight.float().T
    if bias is not None:
        z = z + bias.float()
    z = z.double()
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    top = logp.topk(k, -1)
    return TokenStats(top.indices, top.values, entropy, logp.gather(1, target[:, None])[:, 0])


def assert_close_stats(got: TokenStats, ref: TokenStats, atol: float) -> None:
    assert got.topk_ids.dtype == torch.int64 and got.topk_logprobs.dtype == torch.float32
    assert got.entropy.dtype == torch.float32 and got.target_logprob.dtype == torch.float32
    assert torch.equal(got.topk_ids, ref.topk_ids)
    torch.testing.assert_close(got.topk_logprobs.double(), ref.topk_logprobs.double(), atol=atol, rtol=0)
    torch.testing.assert_close(got.entropy.double(), ref.entropy.double(), atol=atol, rtol=0)
    torch.testing.assert_close(got.target_logprob.double(), ref.target_logprob.double(), atol=atol, rtol=0)


@pytest.mark.parametrize("token_chunk,vocab_chunk", [(8, 384), (37, None), (1, 1000), (5, 7), (64, 999), (16, 1)])
def test_chunked_matches_reference(token_chunk, vocab_chunk):
    hidden, weight, target = make_inputs()
    got = chunked_token_stats(hidden, weight, target, k=20, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    ref = reference(hidden, weight, target, 20)
    assert (ref.entropy > 1).any() and (ref.entropy < 0.1).any()  # both regimes are exercised
    assert_close_stats(got, ref, atol=1e-5)
    # descending, and log-probs, not renormalised over the top-k
    assert (got.topk_logprobs[:, :-1] >= got.topk_logprobs[:, 1:]).all()
    mass = got.topk_logprobs.exp().sum(1)
    assert (mass <= 1 + 1e-5).all() and (mass < 0.9).any()


def test_chunked_equals_naive_fp32():
    hidden, weight, target = make_inputs()
    naive = token_stats_naive(hidden @ weight.T, target, k=20)
    for tc, vc in [(8, 384), (37, None), (3, 1000)]:
        got = chunked_token_stats(hidden, weight, target, k=20, token_chunk=tc, vocab_chunk=vc)
        assert torch.equal(got.topk_ids, naive.topk_ids)
        for a, b in zip(got[1:], naive[1:]):
            torch.testing.assert_close(a, b, atol=4e-6, rtol=1e-6)  # fp32 rounding of logZ, |z| up to ~40


def test_naive_matches_reference():
    hidden, weight, target = make_inputs()
    assert_close_stats(token_stats_naive(hidden @ weight.T, target, k=20), reference(hidden, weight, target, 20), 1e-5)


@pytest.mark.parametrize("scale,lo,hi", [(60.0, 0.0, 0.05), (0.01, math.log(1000) - 0.01, math.log(1000))])
def test_extreme_entropies(scale, lo, hi):
    """Near-deterministic (large logits: logZ - E[z] would cancel) and near-uniform rows."""
    hidden, weight, target = make_inputs(scale=scale)
    ref = reference(hidden, weight, target, 5)
    assert ((ref.entropy >= lo) & (ref.entropy <= hi)).float().mean() > 0.5
    got = chunked_token_stats(hidden, weight, target, k=5, token_chunk=8, vocab_chunk=300)
    torch.testing.assert_close(got.entropy.double(), ref.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.topk_logprobs.double(), ref.topk_logprobs, atol=1e-5 * max(1, scale), rtol=0)


def test_bf16_inputs_computed_in_fp32():
    hidden, weight, target = make_inputs(dtype=torch.bfloat16)
    got = chunked_token_stats(hidden, weight, target, k=20, token_chunk=8, vocab_chunk=384)
    # exact for the bf16 values upcast: the logits are not rounded to bf16
    assert_close_stats(got, reference(hidden, weight, target, 20), atol=1e-5)
    unchunked = chunked_token_stats(hidden, weight, target, k=20, token_chunk=37)
    assert torch.equal(unchunked.topk_ids, got.topk_ids)


def test_bias_and_masked_vocab():
    hidden, weight, target = make_inputs(V=500)
    bias = torch.randn(500, generator=torch.Generator().manual_seed(1))
    bias[::3] = float("-inf")  # masked entries: probability 0
    target = target - target % 3 + 1  # targets among the unmasked
    got = chunked_token_stats(hidden, weight, target, k=10, token_chunk=8, vocab_chunk=128, lm_head_bias=bias)
    assert_close_stats(got, reference(hidden, weight, target, 10, bias=bias), atol=1e-5)
    assert (got.topk_ids % 3 != 0).all() and torch.isfinite(got.entropy).all()


def test_k_edges_and_errors():
    hidden, weight, target = make_inputs(V=50)
    full = chunked_token_stats(hidden, weight, target, k=50, token_chunk=8, vocab_chunk=16)
    torch.testing.assert_close(full.topk_logprobs.exp().sum(1), torch.ones(37), atol=1e-5, rtol=0)
    one = chunked_token_stats(hidden, weight, target, k=1, token_chunk=8, vocab_chunk=16)
    assert torch.equal(one.topk_ids[:, 0], (hidden @ weight.T).argmax(1))
    with pytest.raises(ValueError, match="k must be"):
        chunked_token_stats(hidden, weight, target, k=51)
    with pytest.raises(ValueError, match="target_ids"):
        chunked_token_stats(hidden, weight, target[:-1], k=5)
    empty = chunked_token_stats(hidden[:0], weight, target[:0], k=5)
    assert empty.topk_ids.shape == (0, 5) and empty.entropy.shape == (0,)


def test_no_autograd_graph():
    hidden, weight, target = make_inputs()
    hidden.requires_grad_(True)
    got = chunked_token_stats(hidden, weight, target, k=3, token_chunk=8)
    assert not any(t.requires_grad for t in got)
