"""The EOPD objective: per-token reverse/forward KL pieces, the entropy gate, and a memory-lean
chunked loss over the student's LM head.

Notation, per response token t: p = teacher, q = student (q_theta), q_old = the behaviour policy
that sampled the rollout, y = the sampled token, S = the teacher's top-k set (k ids with their
teacher log-probs, NOT renormalised), H(p) = the exact full-vocabulary teacher entropy (an input).

The default objective is the paper's EOPD (arXiv 2603.07079):

    L_t = RKL_t + lam * g_t * FKL_t,   g_t = 1[H(p_t) > tau],   tau = 0.8 nats,   lam = 1,

    RKL_t = max(-r A, -clip(r, 1-eps, 1+eps) A),  A = log p(y) - log q_old(y),  r = q(y) / q_old(y)
    FKL_t = sum_{x in S} p~(x) (log p~(x) - log q(x)),  p~ = p / sum_S p,  q not renormalised

and the batch loss is sum_t L_t / (all response tokens of the optimiser batch).

Two estimators of the reverse-KL term RKL_t, for every objective that has one (rkl, eopd, full;
fkl and jsd have none and ignore the choice):
  "sampled" (the paper's): the PPO-clipped surrogate above, on the one sampled token y_t. Its
      gradient at r = 1 is unbiased for the gradient of the full-vocabulary KL(q||p) (in expectation
      over y_t ~ q_old), with the variance of one sample.
  "topk": the analytic KL over the k+1 buckets (S and one tail T = V minus S) from the cached top-k,
      sum_b q_b (log q_b - log p_b). Deterministic given the position; a lower bound of KL(q||p)
      whose gap is exactly q_T KL(q(.|T) || p(.|T)) (`reverse_kl_topk`), zero when k = V, when the
      student puts no mass on T, or when both distributions agree in shape on T.

All functions are pure: tensors in, tensors out, natural logs throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from eopd.metrics import entropy_from_logprobs

OBJECTIVES = ("eopd", "rkl", "fkl", "full", "jsd")
RKL_ESTIMATORS = ("sampled", "topk")
FKL_MODES = ("renorm", "tail")

# Tokens per chunk of the chunked LM-head loss, measured by bench/train_loss.py (bench/RESULTS.md):
# at V = 151,936, N = 4,096 on CPU, 512 kept the peak at 0.22x the naive path's when autograd held
# about five [chunk, V] fp32 buffers at once (256 was slower); _chunk_loss_and_grad now holds two.
DEFAULT_CHUNK_SIZE = 512


# --------------------------------------------------------------------------------------------
# Configuration and the per-token batch


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which loss to minimise. The defaults are the paper's EOPD.

    objective: "eopd"  RKL_t + lam * g_t * FKL_t             (the paper's method)
               "rkl"   RKL_t                                 (plain on-policy distillation; eopd, lam = 0)
               "fkl"   FKL_t on every token
               "full"  RKL_t + lam * FKL_t on every token   (the paper's "Full FKL" ablation; eopd, g = 1)
               "jsd"   JSD_beta(p, q) over the k+1 buckets  (GKD's generalised JSD)
    rkl_estimator: the RKL term of rkl, eopd and full (fkl and jsd have none and ignore it):
        "sampled" (PPO-style on y_t, the paper's; `reverse_kl_sampled`) or "topk" (the analytic
        sum_b q_b (log q_b - log p_b) over S + one tail bucket, a lower bound of the full-vocabulary
        KL(q||p), exact when S holds all the student's mass; `reverse_kl_topk`).
    fkl_mode: "renorm" (teacher renormalised on S, the paper's) or "tail" (KL over S + one tail bucket).
    tau: gate threshold in nats; gate_quantile, when set, replaces tau by that quantile of the
        batch's teacher entropies (gate = H > quantile).
    lam: weight of the FKL term (eopd and full). clip_eps: PPO clip of the sampled RKL.
    jsd_beta: mixture weight of the teacher in JSD_beta, strictly inside (0, 1).
    """

    objective: str = "eopd"
    rkl_estimator: str = "sampled"
    fkl_mode: str = "renorm"
    tau: float = 0.8
    gate_quantile: Optional[float] = None
    lam: float = 1.0
    clip_eps: float = 0.2
    jsd_beta: float = 0.5

    def __post_init__(self) -> None:
        for name, allowed in (("objective", OBJECTIVES), ("rkl_estimator", RKL_ESTIMATORS), ("fkl_mode", FKL_MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"ObjectiveConfig.{name} must be one of {', '.join(allowed)}; got {value!r}")
        _check_number("tau", self.tau, low=0.0)
        _check_number("lam", self.lam, low=0.0)
        _check_number("clip_eps", self.clip_eps, low=0.0, high=1.0, open_low=True, open_high=True)
        _check_number("jsd_beta", self.jsd_beta, low=0.0, high=1.0, open_low=True, open_high=True,
                      hint="at 0 and 1 JSD_beta is identically zero; use objective fkl (tail) or rkl (topk)")
        if self.gate_quantile is not None:
            _check_number("gate_quantile", self.gate_quantile, low=0.0, high=1.0, open_low=True, open_high=True,
                          hint="use objective full (gate everything) or rkl (gate nothing)")


def _check_number(name: str, value: object, low: float, high: float = math.inf, open_low: bool = False,
                  open_high: bool = False, hint: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"ObjectiveConfig.{name} must be a finite number in {interval}; got {value!r}"
                         + (f" ({hint})" if hint else ""))


@dataclass
class TokenBatch:
    """Flat per-token tensors over the N response tokens of a batch (all on one device).

    sampled_ids [N] long: y_t.  behaviour_logprobs [N]: log q_old(y_t).
    teacher_token_logprobs [N]: log p(y_t).  teacher_topk_ids [N, k] long: S.
    teacher_topk_logprobs [N, k]: log p(x), x in S (not renormalised).  teacher_entropy [N]: H(p_t).
    """

    sampled_ids: Tensor
    behaviour_logprobs: Tensor
    teacher_token_logprobs: Tensor
    teacher_topk_ids: Tensor
    teacher_topk_logprobs: Tensor
    teacher_entropy: Tensor

    def __post_init__(self) -> None:
        n = self.sampled_ids.shape[0]
        for f in fields(self):
            t = getattr(self, f.name)
            want = 2 if f.name.startswith("teacher_topk") else 1
            if t.dim() != want or t.shape[0] != n:
                raise ValueError(f"TokenBatch.{f.name} must have shape [{n}{', k' if want == 2 else ''}]; got {tuple(t.shape)}")
        if self.teacher_topk_ids.shape != self.teacher_topk_logprobs.shape:
            raise ValueError("TokenBatch.teacher_topk_ids and teacher_topk_logprobs must have the same shape [N, k]")

    def __len__(self) -> int:
        return self.sampled_ids.shape[0]

    def slice(self, a: int, b: int) -> "TokenBatch":
        """Tokens a..b-1 (views, no copies)."""
        return TokenBatch(**{f.name: getattr(self, f.name)[a:b] for f in fields(self)})

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


# --------------------------------------------------------------------------------------------
# Per-token pieces


def reverse_kl_sampled(student_logprob_y: Tensor, behaviour_logprob_y: Tensor, teacher_logprob_y: Tensor,
                       clip_eps: float = 0.2) -> Tensor:
    """PPO-style on-policy reverse-KL estimator on the sampled token, per token:

        A = log p(y) - log q_old(y)            (a constant: no gradient)
        r = exp(log q(y) - log q_old(y))
        loss = max(-r A, -clip(r, 1 - eps, 1 + eps) A)

    At r = 1 the gradient is -A * d log q(y), whose expectation under q_old is the gradient of
    KL(q || p); the clip stops the update once q has moved eps away from q_old in A's direction.
    """
    advantage = (teacher_logprob_y - behaviour_logprob_y).detach()
    ratio = torch.exp(student_logprob_y - behaviour_logprob_y.detach())
    return torch.maximum(-ratio * advantage, -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantage)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and far below it (Maechler 2012):
    log(-expm1(x)) for x > -log 2, log1p(-exp(x)) otherwise. Values where 1 - exp(x) <= tiny
    (x >= 0 up to rounding, e.g. a top-k set holding all the mass) give log(tiny), finite, with no
    gradient, instead of -inf/NaN."""
    tiny = torch.finfo(x.dtype).tiny
    near = torch.log(torch.clamp(-torch.expm1(x), min=tiny))
    far = torch.log1p(-torch.exp(torch.clamp(x, max=-math.log(2.0))))
    return torch.where(x > -math.log(2.0), near, far)


def topk_buckets(student_logprobs: Tensor, teacher_topk_ids: Tensor, teacher_topk_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Coarsen student and teacher to k+1 buckets: the k tokens of S and one tail.

        log q_b = [log q(x) for x in S] + [log(1 - sum_S q)]
        log p_b = [log p(x) for x in S] + [log(1 - sum_S p)]

    student_logprobs [n, V] full-vocabulary log-probs; returns (log q_b, log p_b), each [n, k+1].
    Any f-divergence between the bucket distributions is a lower bound of the full one (data
    processing inequality) and exact when k = V.
    """
    student_s = student_logprobs.gather(-1, teacher_topk_ids)
    return _with_tail(student_s), _with_tail(teacher_topk_logprobs.to(student_logprobs.dtype))


def _with_tail(logprobs_s: Tensor) -> Tensor:
    return torch.cat([logprobs_s, log1mexp(torch.logsumexp(logprobs_s, dim=-1, keepdim=True))], dim=-1)


def kl_divergence(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a || b) = sum_x a(x) (log a(x) - log b(x)) over the last dim, from log-probs."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def reverse_kl_topk(student_buckets: Tensor, teacher_buckets: Tensor) -> Tensor:
    """The analytic reverse KL from the cached teacher top-k, per token: over the k+1 buckets of
    `topk_buckets` (the k tokens of S, the teacher's top-k, and the tail T = V minus S),

        RKL^topk = sum_{x in S} q(x) (log q(x) - log p(x)) + q_T (log q_T - log p_T),
        q_T = 1 - sum_S q,  p_T = 1 - sum_S p.

    Bias: by the chain rule of KL, the full-vocabulary reverse KL splits as
        KL(q||p) = RKL^topk + q_T KL(q(.|T) || p(.|T)),
    with q(.|T) = q / q_T and p(.|T) = p / p_T the distributions inside the tail. So RKL^topk is a
    lower bound of KL(q||p) (>= 0 gap), exact when k = V (no tail), when q_T = 0, or when q and p
    have the same shape inside T; the gap grows with the student's tail mass q_T and with how
    differently the two spread it. Its gradient moves mass between S and T as the full KL's does,
    but does not reshape the student inside T. The teacher's top-k are the largest p, so p_T is
    the smallest tail a k-set can have: on the toy (V = 263) a top-16 leaves almost nothing
    (bench/estimator_bias.py, bench/RESULTS.md). All of this holds for exact teacher log-probs:
    from rounded ones (the shards' `packed` codec, 1/32 nat) p_T = 1 - sum_S p is rounding noise
    once the true tail is below ~1% (clamped near 0 by log1mexp), and the estimate can exceed the
    full KL (measured 2.5x on the toy's base student: bench/RESULTS.md).

    student_buckets, teacher_buckets [n, k+1] log-probs from `topk_buckets`; returns [n]."""
    return kl_divergence(student_buckets, teacher_buckets)


def forward_kl_renorm(student_topk_logprobs: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """The paper's FKL on S: sum_{x in S} p~(x) (log p~(x) - log q(x)), p~ = p / sum_S p.

    student_topk_logprobs [n, k] are the student's FULL-vocabulary log-probs gathered at S (not
    renormalised), so the term also pulls mass onto S; exact KL(p||q) when k = V."""
    teacher = teacher_topk_logprobs.to(student_topk_logprobs.dtype)
    p_tilde = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    return kl_divergence(p_tilde, student_topk_logprobs)


def forward_kl_tail(student_buckets: Tensor, teacher_buckets: Tensor) -> Tensor:
    """FKL over the k+1 buckets: sum_b p_b (log p_b - log q_b); a lower bound of KL(p||q),
    exact when k = V."""
    return kl_divergence(teacher_buckets, student_buckets)


def jsd(student_buckets: Tensor, teacher_buckets: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence over the k+1 buckets, GKD's convention (as in TRL):

        M = beta * p + (1 - beta) * q,   JSD_beta = beta * KL(p || M) + (1 - beta) * KL(q || M)

    beta = 0.5 is the symmetric JSD. Only 0 < beta < 1 is accepted: at both ends JSD_beta is
    identically zero (M equals the only distribution left); JSD_beta / beta tends to KL(p||q) as
    beta -> 0 and JSD_beta / (1 - beta) to KL(q||p) as beta -> 1, available as the fkl (tail) and
    rkl (topk) objectives."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be strictly between 0 and 1; got {beta!r} (use forward_kl_tail / reverse_kl_topk)")
    mixture = torch.logaddexp(teacher_buckets + math.log(beta), student_buckets + math.log1p(-beta))
    return beta * kl_divergence(teacher_buckets, mixture) + (1.0 - beta) * kl_divergence(student_buckets, mixture)


def entropy_gate(teacher_entropy: Tensor, tau: float = 0.8, quantile: Optional[float] = None) -> Tensor:
    """g_t = 1[H(p_t) > tau], or 1[H(p_t) > Q_quantile(H of this batch)] when quantile is given.
    Returns a bool tensor shaped like teacher_entropy."""
    if quantile is None:
        return teacher_entropy > tau
    if teacher_entropy.numel() == 0:
        return torch.zeros_like(teacher_entropy, dtype=torch.bool)
    h = teacher_entropy.float()
    return h > torch.quantile(h, quantile)


# --------------------------------------------------------------------------------------------
# Composition


STAT_KEYS = ("loss_sum", "rkl_sum", "fkl_sum", "fkl_gated_sum", "gated_tokens", "student_entropy_sum",
             "student_entropy_gated_sum", "teacher_entropy_sum", "clipped_tokens", "tokens")


def token_objective(student_logits: Tensor, batch: TokenBatch, cfg: ObjectiveConfig,
                    gate: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss L_t [n] of cfg.objective from the student logits [n, V] (any float dtype;
    computed in at least fp32), and detached 0-dim stats summed over the n tokens (STAT_KEYS):

        loss_sum = sum L_t;  rkl_sum = sum RKL_t;  fkl_sum = sum FKL_t (all tokens, whatever the
        objective); fkl_gated_sum = sum g_t FKL_t;  gated_tokens = sum g_t;
        student_entropy_sum = sum H(q_t) (full vocab);  student_entropy_gated_sum = sum g_t H(q_t);
        teacher_entropy_sum = sum H(p_t);
        clipped_tokens = #tokens whose PPO clip is active;  tokens = n.

    gate [n] bool overrides the gate computed from this chunk (pass the whole batch's gate when
    chunking: a quantile gate must see the whole batch)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logq = F.log_softmax(student_logits.to(dtype), dim=-1)
    # One gather for y and S: its backward then scatters into a single [n, V] buffer.
    picked = logq.gather(-1, torch.cat([batch.sampled_ids[:, None], batch.teacher_topk_ids], dim=1))
    with torch.no_grad():
        student_entropy = entropy_from_logprobs(logq)
    return picked_objective(picked, student_entropy, batch, cfg, gate)


def picked_objective(picked: Tensor, student_entropy: Tensor, batch: TokenBatch, cfg: ObjectiveConfig,
                     gate: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """token_objective from what every objective needs of the student: picked [n, 1 + k] =
    (log q(y_t), log q(x) for x in S_t), and H(q_t) [n] for the stats only. L_t depends on the
    logits only through `picked`, which is what lets the chunked loss write d L / d logits itself."""
    dtype = picked.dtype
    logq_y, logq_s = picked[:, 0], picked[:, 1:]
    teacher_s = batch.teacher_topk_logprobs.to(dtype)
    student_b, teacher_b = _with_tail(logq_s), _with_tail(teacher_s)
    behaviour_y = batch.behaviour_logprobs.to(dtype)
    teacher_y = batch.teacher_token_logprobs.to(dtype)

    if cfg.rkl_estimator == "sampled":
        rkl = reverse_kl_sampled(logq_y, behaviour_y, teacher_y, cfg.clip_eps)
    else:
        rkl = reverse_kl_topk(student_b, teacher_b)
    fkl = forward_kl_renorm(logq_s, teacher_s) if cfg.fkl_mode == "renorm" else forward_kl_tail(student_b, teacher_b)
    if gate is None:
        gate = entropy_gate(batch.teacher_entropy, cfg.tau, cfg.gate_quantile)
    # where, not multiply: an ungated token contributes nothing, even if its FKL is not finite.
    fkl_gated = torch.where(gate, fkl, torch.zeros((), dtype=dtype, device=fkl.device))

    if cfg.objective == "eopd":
        loss = rkl + cfg.lam * fkl_gated
    elif cfg.objective == "rkl":
        loss = rkl
    elif cfg.objective == "fkl":
        loss = fkl
    elif cfg.objective == "full":
        loss = rkl + cfg.lam * fkl
    else:
        loss = jsd(student_b, teacher_b, cfg.jsd_beta)

    with torch.no_grad():
        advantage = teacher_y - behaviour_y
        ratio = torch.exp(logq_y - behaviour_y)
        clipped = -ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * advantage > -ratio * advantage
        student_entropy = student_entropy.to(dtype)
        stats = {
            "loss_sum": loss.sum(), "rkl_sum": rkl.sum(), "fkl_sum": fkl.sum(), "fkl_gated_sum": fkl_gated.sum(),
            "gated_tokens": gate.sum().to(dtype), "student_entropy_sum": student_entropy.sum(),
            "student_entropy_gated_sum": student_entropy[gate].sum(),
            "teacher_entropy_sum": batch.teacher_entropy.to(dtype).sum(), "clipped_tokens": clipped.sum().to(dtype),
            "tokens": torch.tensor(float(len(batch)), dtype=dtype, device=loss.device),
        }
    return loss, {key: v.detach() for key, v in stats.items()}


def _check_head_inputs(hidden: Tensor, weight: Tensor, batch: TokenBatch, normalizer: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and lm_head_weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[0] != len(batch):
        raise ValueError(f"hidden has {hidden.shape[0]} rows but the TokenBatch has {len(batch)} tokens")
    if not (normalizer > 0 and math.isfinite(normalizer)):
        raise ValueError(f"normalizer must be a positive number of tokens; got {normalizer!r}")


def naive_objective(hidden: Tensor, lm_head_weight: Tensor, batch: TokenBatch, cfg: ObjectiveConfig,
                    normalizer: float, gate: Optional[Tensor] = None) -> tuple[Tensor, dict[str, float]]:
    """Reference: full [N, V] logits = hidden @ W^T (in at least fp32), autograd through all.

        loss = sum_t L_t / normalizer

    Same semantics as chunked_objective; memory grows with N * V (several [N, V] buffers)."""
    _check_head_inputs(hidden, lm_head_weight, batch, normalizer)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    if gate is None:
        gate = entropy_gate(batch.teacher_entropy, cfg.tau, cfg.gate_quantile)
    logits = hidden.to(dtype) @ lm_head_weight.to(dtype).T
    per_token, stats = token_objective(logits, batch, cfg, gate)
    return per_token.sum() / normalizer, {k: float(v) for k, v in stats.items()}


class _ChunkedHeadObjective(torch.autograd.Function):
    """loss = sum_t L_t(h_t W^T) / normalizer with the gradients computed during forward, one
    chunk of tokens at a time, so no [N, V] tensor ever exists. backward only scales the stored
    d loss / d hidden [N, H] and d loss / d W [V, H] by grad_output."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, batch: TokenBatch, cfg: ObjectiveConfig, normalizer: float,
                chunk_size: int, gate: Tensor, stats_out: dict) -> Tensor:
        loss, grad_h, grad_w, stats = _chunked_pass(hidden, weight, batch, cfg, normalizer, chunk_size, gate,
                                                    need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1])
        stats_out.update(stats)
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        if grad_output.item() != 1.0:  # the usual case (loss.backward()) needs no [V, H] multiply
            grad_h = None if grad_h is None else grad_h * grad_output.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_output.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


@torch.no_grad()
def _chunk_loss_and_grad(z: Tensor, batch: TokenBatch, cfg: ObjectiveConfig, gate: Tensor, normalizer: float,
                         need_grad: bool) -> tuple[Tensor, Optional[Tensor], dict[str, Tensor]]:
    """One chunk's sum_t L_t / normalizer, d it / d logits, and stats, from its logits z [c, V]
    (overwritten), with two [c, V] buffers and no autograd over them:

        q = softmax(z),  log q = z - logsumexp(z),  picked = log q at (y_t, S_t),  H(q_t) = -sum q log q
        d/dz_i = sum_j g_j (1[i = id_j] - q_i) = scatter(g)_i - q_i sum_j g_j,  g = d loss / d picked

    (autograd of token_objective would hold about five: logits, log q, their gradients, the scatter's.)"""
    m = z.amax(-1, keepdim=True)
    q = torch.sub(z, m).exp_()
    total = q.sum(-1, keepdim=True)
    q.div_(total)
    logq = z.sub_(m.add_(total.log_()))  # in place: z is now log q
    ids = torch.cat([batch.sampled_ids[:, None], batch.teacher_topk_ids], dim=1)
    entropy = -torch.bmm(q.unsqueeze(1), logq.unsqueeze(2)).view(-1)  # a row-wise dot: no [c, V] product
    picked = logq.gather(-1, ids)
    del logq, z
    if not need_grad:
        per_token, stats = picked_objective(picked, entropy, batch, cfg, gate)
        return per_token.sum() / normalizer, None, stats
    with torch.enable_grad():
        picked.requires_grad_(True)
        per_token, stats = picked_objective(picked, entropy, batch, cfg, gate)
        part = per_token.sum() / normalizer
        (g,) = torch.autograd.grad(part, picked)
    grad_logits = q.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids, g)
    return part.detach(), grad_logits, stats


def _chunked_pass(hidden: Tensor, weight: Tensor, batch: TokenBatch, cfg: ObjectiveConfig, normalizer: float,
                  chunk_size: int, gate: Tensor, need_h: bool, need_w: bool
                  ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], dict[str, Tensor]]:
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    w = weight.detach().to(dtype)  # a [V, H] copy only for bf16/fp16 weights
    n = hidden.shape[0]
    grad_h = torch.empty(n, hidden.shape[1], dtype=dtype, device=hidden.device) if need_h else None
    grad_w = torch.zeros_like(w) if need_w else None
    loss = torch.zeros((), dtype=dtype, device=hidden.device)
    stats = {key: torch.zeros((), dtype=dtype, device=hidden.device) for key in STAT_KEYS}
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        h = hidden[a:b].detach().to(dtype)
        part, grad_logits, chunk_stats = _chunk_loss_and_grad(h @ w.T, batch.slice(a, b), cfg, gate[a:b], normalizer,
                                                              need_grad=need_h or need_w)
        if need_h:
            torch.mm(grad_logits, w, out=grad_h[a:b])
        if need_w:
            grad_w.addmm_(grad_logits.T, h)
        del grad_logits
        loss += part
        for key, value in chunk_stats.items():
            stats[key] += value
    if grad_h is not None:
        grad_h = grad_h.to(hidden.dtype)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return loss, grad_h, grad_w, stats


def chunked_objective(hidden: Tensor, lm_head_weight: Tensor, batch: TokenBatch, cfg: ObjectiveConfig,
                      normalizer: float, chunk_size: int = DEFAULT_CHUNK_SIZE, gate: Optional[Tensor] = None
                      ) -> tuple[Tensor, dict[str, float]]:
    """The objective through the LM head without ever holding [N, V] logits:

        loss = sum_t L_t / normalizer,   L_t = token_objective(h_t W^T)

    hidden [N, H] (the final hidden states at the N response positions), lm_head_weight [V, H]
    (may be the tied input embedding: it is just a tensor; no bias). normalizer = the response
    tokens of the whole optimiser batch (all micro-batches and ranks), so summing micro-batch
    losses gives the paper's mean over all response tokens (gated FKL divided by ALL tokens).

    Forward walks chunks of chunk_size tokens: logits_c = h_c W^T in fp32 (fp64 stays fp64), the
    per-token loss and d loss / d logits_c (written out, autograd only over the [c, 1 + k] gathered
    log-probs), then
    grad_h_c = grad_logits_c W and grad_W += grad_logits_c^T h_c. Only those gradients ([N, H],
    [V, H]) are kept; backward scales them by grad_output. Three matmuls like the naive path, no
    recomputation; peak extra memory ~ two [chunk_size, V] buffers (`_chunk_loss_and_grad`) + grad_W
    (+ an fp32 copy of W for bf16 weights). Gradients come back in the inputs' dtypes.

    The gate is computed on the whole batch before chunking unless given (pass the optimiser
    batch's gate when a quantile gate spans several micro-batches). Returns the scalar loss and
    stats (STAT_KEYS, summed over the N tokens, as floats)."""
    _check_head_inputs(hidden, lm_head_weight, batch, normalizer)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if gate is None:
        gate = entropy_gate(batch.teacher_entropy, cfg.tau, cfg.gate_quantile)
    stats: dict = {}
    if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
        loss = _ChunkedHeadObjective.apply(hidden, lm_head_weight, batch, cfg, float(normalizer), int(chunk_size),
                                           gate, stats)
    else:
        loss, _, _, stats = _chunked_pass(hidden, lm_head_weight, batch, cfg, float(normalizer), int(chunk_size),
                                          gate, need_h=False, need_w=False)
    return loss, {key: float(value) for key, value in stats.items()}
