"""Per-token teacher statistics from final hidden states, without a [tokens, vocab] fp32 tensor.

For one position with logits z (over the full vocabulary V) and target token y:

    logZ          = log sum_v exp(z_v)
    log p_v       = z_v - logZ                      (natural log)
    entropy H     = -sum_v p_v log p_v = logZ - sum_v p_v z_v      (nats, exact over all V)
    topk          = the k largest log p_v, sorted descending (NOT renormalised over the k)
    target        = log p_y

`chunked_token_stats` computes these from hidden [T, H] and the lm_head weight [V, H] a block of
`token_chunk` rows at a time (and optionally `vocab_chunk` columns at a time, with a streaming
log-sum-exp and a running top-k merge), always in fp32. `token_stats_naive` is the full
log_softmax reference on materialised logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class TokenStats(NamedTuple):
    topk_ids: Tensor  # [T, k] int64, most probable first
    topk_logprobs: Tensor  # [T, k] float32, log p (not renormalised), descending
    entropy: Tensor  # [T] float32, nats, full vocabulary
    target_logprob: Tensor  # [T] float32, log p(target_ids)


@torch.no_grad()
def token_stats_naive(logits: Tensor, target_ids: Tensor, k: int) -> TokenStats:
    """Reference: logp = log_softmax(logits) over the full vocabulary in fp32, then
    H = -sum exp(logp) * logp, topk(logp, k), logp[target]. Logits must be finite."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -logp.exp().mul_(logp).sum(-1)  # in place: logits, logp and p are the full-size tensors
    top = logp.topk(k, dim=-1)
    target = logp.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    return TokenStats(top.indices, top.values, entropy, target)


@torch.no_grad()
def chunked_token_stats(hidden: Tensor, lm_head_weight: Tensor, target_ids: Tensor, k: int,
                        token_chunk: int = 1024, vocab_chunk: int | None = None,
                        lm_head_bias: Tensor | None = None) -> TokenStats:
    """Teacher statistics for logits z = hidden @ W^T (+ b), exact over the full vocabulary.

    hidden [T, H] are the final (post-norm) hidden states; W [V, H]. Any dtype: each block is
    computed in fp32. The largest temporaries are two fp32 [token_chunk, vocab_chunk or V] blocks,
    allocated once per call and reused for every token block.

    Over the vocabulary blocks of one token block, with m the running max logit:
        s = sum_v exp(z_v - m),   a = sum_v exp(z_v - m) (z_v - m)
    and when m grows to m': s <- s e^(m-m') + s_blk, a <- e^(m-m') (a + s (m-m')) + a_blk. Then
        logZ = m + log s,   H = log s - a / s.
    Keeping z - m (<= 0) instead of z avoids cancelling two large numbers in logZ - E[z].
    Logits of -inf (masked vocabulary entries) are allowed: they contribute p = 0.
    With vocab_chunk=None and a non-fp32 weight, one fp32 copy of W [V, H] is made up front;
    pass vocab_chunk to bound that too (each block's slice is then cast on the fly).
    """
    T, V = hidden.shape[0], lm_head_weight.shape[0]
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and lm_head_weight {tuple(lm_head_weight.shape)} must be [T, H] and [V, H]")
    if target_ids.shape != (T,):
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must be [T] = [{T}]")
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, vocab size {V}], got {k}")
    if token_chunk < 1 or (vocab_chunk is not None and vocab_chunk < 1):
        raise ValueError("token_chunk and vocab_chunk must be positive")
    dev = hidden.device
    vocab_chunk = V if vocab_chunk is None else min(vocab_chunk, V)
    blocks = [(v0, min(v0 + vocab_chunk, V)) for v0 in range(0, V, vocab_chunk)]
    # One block: cast W once, not once per token block. Several: cast each slice when used.
    w_full = lm_head_weight.float() if len(blocks) == 1 else None
    b_full = lm_head_bias.float() if lm_head_bias is not None else None
    target_ids = target_ids.to(dev).long()

    out = TokenStats(torch.empty(T, k, dtype=torch.long, device=dev),
                     torch.empty(T, k, dtype=torch.float32, device=dev),
                     torch.empty(T, dtype=torch.float32, device=dev),
                     torch.empty(T, dtype=torch.float32, device=dev))
    neg = torch.finfo(torch.float32).min  # finite start for m: keeps s (m - m') free of 0 * inf
    # Two [token_chunk, block] fp32 buffers for the whole call: a fresh 600 MB tensor per chunk
    # (V = 151,936) costs page faults on a CPU, as much as a pass over it.
    width = max(v1 - v0 for v0, v1 in blocks)
    z_buf = torch.empty(min(token_chunk, T) * width, device=dev)  # flat: every view of it is contiguous
    e_buf = torch.empty_like(z_buf)
    # On a CPU the clamp pass is skipped unless a logit is -inf (a check that syncs: cheap here, not on a GPU).
    lean = dev.type == "cpu"
    for t0 in range(0, T, token_chunk):
        t1 = min(t0 + token_chunk, T)
        h, tgt, n = hidden[t0:t1].float(), target_ids[t0:t1], t1 - t0
        m = torch.full((n,), neg, device=dev)
        s = torch.zeros(n, device=dev)
        a = torch.zeros(n, device=dev)
        tgt_logit = torch.zeros(n, device=dev)
        best_val = torch.empty(n, 0, device=dev)
        best_id = torch.empty(n, 0, dtype=torch.long, device=dev)
        for v0, v1 in blocks:
            w = w_full if w_full is not None else lm_head_weight[v0:v1].float()
            z = torch.matmul(h, w.T, out=z_buf[: n * (v1 - v0)].view(n, v1 - v0))  # [n, v1 - v0] fp32
            if b_full is not None:
                z += b_full[v0:v1]
            # target logit, if the target falls in this block (gather + where: no host sync)
            inside = (tgt >= v0) & (tgt < v1)
            g = z.gather(1, (tgt - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            tgt_logit = torch.where(inside, g, tgt_logit)
            # running top-k: best of (previous best, this block's best)
            val, idx = z.topk(min(k, v1 - v0), dim=1)
            best_val, pos = torch.cat([best_val, val], 1).topk(min(k, best_val.shape[1] + val.shape[1]), dim=1)
            best_id = torch.cat([best_id, idx + v0], 1).gather(1, pos)
            # streaming log-sum-exp and entropy accumulators, relative to the running max
            m_new = torch.maximum(m, val[:, 0])  # topk is sorted: its first column is the block's max
            z -= m_new.unsqueeze(1)
            if not lean:
                z.clamp_(min=-1e4)  # -inf -> -1e4: exp() still 0, but 0 * z stays 0, not nan
            e = torch.exp(z, out=e_buf[: n * (v1 - v0)].view(n, v1 - v0))
            s_blk = e.sum(1)
            # sum e * z in place (torch's sum is pairwise: a BLAS dot over 151,936 terms lost 1e-4 relative)
            a_blk = e.mul_(z).sum(1)
            if lean and not torch.isfinite(a_blk).all():  # -inf logits (masked): 0 * -inf; redo clamped
                z.clamp_(min=-1e4)  # -inf -> -1e4: exp() still 0, but 0 * z stays 0, not nan
                a_blk = torch.exp(z, out=e).mul_(z).sum(1)
            scale = torch.exp(m - m_new)
            a = scale * (a + s * (m - m_new)) + a_blk
            s = scale * s + s_blk
            m = m_new
        log_z = m + s.log()
        out.topk_ids[t0:t1] = best_id
        out.topk_logprobs[t0:t1] = best_val - log_z.unsqueeze(1)
        out.entropy[t0:t1] = s.log() - a / s
        out.target_logprob[t0:t1] = tgt_logit - log_z
    return out


class OutsideRows(NamedTuple):
    topk_outside: Tensor  # [T] bool: a left-out row would have been among the top-k
    mass_outside: Tensor  # [T] float32: probability the full head puts on the left-out rows


@torch.no_grad()
def outside_rows(hidden: Tensor, lm_head_weight: Tensor, rows: int, stats: TokenStats,
                 lm_head_bias: Tensor | None = None) -> OutsideRows:
    """What scoring over the first `rows` rows of a head with more rows left out, per position.

    `stats` are chunked_token_stats over W[:rows]. With z the logits, logZ_r the log-sum-exp over
    the kept rows (z of the top-1 id minus its log-prob) and E = W[rows:] (small: e.g. the 128
    rows Qwen2.5-7B has beyond Qwen2.5-1.5B):
        topk_outside = max_e z_e - logZ_r > k-th kept log-prob
        mass_outside = sum_e exp(z_e - logZ),  logZ = logaddexp(logZ_r, logsumexp_e z_e)
    """
    T = hidden.shape[0]
    if rows >= lm_head_weight.shape[0]:
        return OutsideRows(torch.zeros(T, dtype=torch.bool, device=hidden.device),
                           torch.zeros(T, dtype=torch.float32, device=hidden.device))
    h = hidden.float()
    extra = h @ lm_head_weight[rows:].float().T  # [T, V - rows]
    top1 = (h * lm_head_weight[stats.topk_ids[:, 0]].float()).sum(-1)
    if lm_head_bias is not None:
        extra += lm_head_bias[rows:].float()
        top1 += lm_head_bias[stats.topk_ids[:, 0]].float()
    log_z_kept = top1 - stats.topk_logprobs[:, 0]
    lse_extra = torch.logsumexp(extra, -1)
    log_z = torch.logaddexp(log_z_kept, lse_extra)
    return OutsideRows(extra.max(-1).values - log_z_kept > stats.topk_logprobs[:, -1], (lse_extra - log_z).exp())


# --------------------------------------------------------------------------------------------
# How much mass a top-k can leave outside it, given the entropy (for the `topk` reverse-KL
# estimator's bias at a vocabulary other than the one measured: bench/estimator_bias.py)


def _h(u: np.ndarray) -> np.ndarray:
    """Binary entropy in nats, elementwise, 0 at u = 0 and u = 1."""
    u = np.clip(u, 1e-300, 1.0 - 1e-16)
    return -u * np.log(u) - (1.0 - u) * np.log1p(-u)


def max_tail_mass(entropy: float, k: int, vocab: int) -> float:
    """The most probability ANY distribution over `vocab` tokens with entropy `entropy` (nats) can
    put outside its k most probable tokens: the worst case for a cached top-k.

    For a tail mass t and a k-th largest probability e, the distribution with one top token of
    1 - u and m tokens of e = u / m (k - 1 of them inside the top-k, the rest forming the tail,
    t = u (m - k + 1) / m) majorises every distribution with that tail and that e, so it has no
    more entropy; raising u then raises both entropy and tail. The supremum therefore lies in that
    family, whose entropy is h(u) + u log m (h the binary entropy). Per m (k <= m <= vocab - 1,
    on a grid dense at small m) this solves h(u) + u log m = entropy for u <= m / (m + 1) (so the
    top token stays the largest) by bisection and returns the largest tail, up to the rounding of
    m to the grid. 0 when entropy <= 0; 1 - k / vocab at the uniform distribution's entropy."""
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocab]; got k={k}, vocab={vocab}")
    if entropy <= 0.0 or k == vocab:
        return 0.0
    if entropy >= math.log(vocab):
        return 1.0 - k / vocab
    m = np.unique(np.concatenate([np.round(np.geomspace(k, vocab - 1, 4000)), np.arange(k, min(vocab, k + 200))]))
    u_max = m / (m + 1.0)
    ok = _h(u_max) + u_max * np.log(m) >= entropy  # else m + 1 tokens cannot reach this entropy
    m, lo, hi = m[ok], np.zeros(ok.sum()), u_max[ok]
    for _ in range(60):  # bisection on u, every m at once: h(u) + u log m rises with u up to u_max
        mid = 0.5 * (lo + hi)
        below = _h(mid) + mid * np.log(m) < entropy
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return float((lo * (m - k + 1) / m).max()) if len(m) else 0.0


def zipf_topk_mass(entropy: float, k: int, vocab: int) -> tuple[float, float]:
    """Top-k mass of the Zipf distribution p_i = i^-s / sum_j j^-s (i = 1..vocab) whose entropy is
    `entropy` nats: (top-k mass, s). A model of a language model's heavy tail (rank-frequency
    curves of text are Zipfian), not a measurement; s is found by bisection (H falls as s rises)."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    log_r = np.log(ranks)

    def stats(s: float) -> tuple[float, float]:
        logits = -s * log_r
        logits -= logits.max()
        p = np.exp(logits)
        p /= p.sum()
        return float(-(p * np.log(np.maximum(p, 1e-300))).sum()), float(p[:k].sum())

    if not 0.0 < entropy < math.log(vocab):
        raise ValueError(f"entropy must be in (0, log vocab = {math.log(vocab):.3f}); got {entropy}")
    lo, hi = 0.0, 64.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if stats(mid)[0] > entropy:
            lo = mid
        else:
            hi = mid
    s = 0.5 * (lo + hi)
    return stats(s)[1], s
