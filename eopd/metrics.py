"""Training diagnostics the paper plots: entropies, the student's top-k change rate, and the
per-step summary of the summed loss stats. Pure functions on tensors / floats, natural logs."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H(softmax(z)) = -sum_x q(x) log q(x) over the last dim, computed in at least fp32.
    Entries at -inf (masked tokens) contribute 0."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return entropy_from_logprobs(F.log_softmax(logits.to(dtype), dim=-1))


def entropy_from_logprobs(logprobs: Tensor) -> Tensor:
    """H = -sum_x exp(l(x)) l(x) over the last dim (entr(0) = 0, so -inf entries are safe)."""
    return torch.special.entr(logprobs.exp()).sum(-1)


def topk_jaccard_distance(prev_ids: Tensor, cur_ids: Tensor) -> float:
    """The paper's top-k change rate: mean over tokens of 1 - |A ∩ B| / |A ∪ B|, with A, B the
    sets of ids in row t of prev_ids and cur_ids ([n, k] each, ids distinct within a row).
    0 when every top-k set is unchanged, 1 when every one is disjoint from before."""
    if prev_ids.shape != cur_ids.shape or prev_ids.dim() != 2 or prev_ids.shape[0] == 0:
        raise ValueError(f"expected two non-empty [n, k] id tensors of the same shape; got {tuple(prev_ids.shape)} "
                         f"and {tuple(cur_ids.shape)}")
    k = prev_ids.shape[1]
    inter = (prev_ids[:, :, None] == cur_ids[:, None, :]).any(-1).sum(-1).double()
    union = 2 * k - inter
    return float((1.0 - inter / union).mean())


@torch.no_grad()
def student_topk_ids(hidden: Tensor, lm_head_weight: Tensor, k: int = 10, chunk_size: int = 512) -> Tensor:
    """Top-k token ids [N, k] of the student's logits h W^T at each of N positions, computed in
    chunks of tokens so that no [N, V] tensor exists (for the top-10 change rate on a fixed probe
    batch between steps)."""
    w = lm_head_weight.detach()
    w = w.to(torch.promote_types(w.dtype, torch.float32))  # bf16 logits would tie and reorder
    out = [torch.topk(hidden[a:a + chunk_size].detach().to(w.dtype) @ w.T, k, dim=-1).indices
           for a in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long, device=hidden.device)


def merge_stats(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum the summed stats of several micro-batches / ranks (key by key)."""
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


def summarize_stats(stats: Mapping[str, float]) -> dict[str, float]:
    """Per-token means for logging from the sums of eopd.losses (STAT_KEYS), over T = tokens:

        loss = loss_sum / T  (the objective normalised per response token)
        rkl = rkl_sum / T,  fkl = fkl_sum / T  (FKL on all tokens, also when not in the loss)
        fkl_high_entropy = fkl_gated_sum / gated_tokens  (FKL on tokens with H(p) > tau; NaN if none)
        gate_fraction = gated_tokens / T,  clip_fraction = clipped_tokens / T
        student_entropy = student_entropy_sum / T,  teacher_entropy = teacher_entropy_sum / T
        student_entropy_high_entropy = student_entropy_gated_sum / gated_tokens  (H(q) where H(p) > tau)
    """
    tokens = stats["tokens"]
    if tokens <= 0:
        raise ValueError("stats cover no tokens")
    gated = stats["gated_tokens"]
    return {
        "loss": stats["loss_sum"] / tokens,
        "rkl": stats["rkl_sum"] / tokens,
        "fkl": stats["fkl_sum"] / tokens,
        "fkl_high_entropy": stats["fkl_gated_sum"] / gated if gated > 0 else math.nan,
        "gate_fraction": gated / tokens,
        "clip_fraction": stats["clipped_tokens"] / tokens,
        "student_entropy": stats["student_entropy_sum"] / tokens,
        "student_entropy_high_entropy": stats["student_entropy_gated_sum"] / gated if gated > 0 else math.nan,
        "teacher_entropy": stats["teacher_entropy_sum"] / tokens,
        "tokens": tokens,
    }
