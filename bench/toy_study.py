"""The EOPD paper's toy study (arXiv 2603.07079, Sec. 3.2) driven through eopd/losses.py.

    nice -n 10 python bench/toy_study.py            # 100 seeds, 500 steps, main table + step-size sweep (~1 min)
    nice -n 10 python bench/toy_study.py --quick    # 20 seeds, 200 steps, no sweep (seconds)

Method. One next-token position, vocabulary V = 80. Teacher logits z ~ N(0, 1) with five random
entries overwritten by {1.7, 1.9, 2.1, 2.3, 2.5}; teacher p = softmax(z / T), T = 0.3 ("peaked")
or T = 1.0 ("flat"), plus T = 0.1 ("sharp", ours: the only one where the tau = 0.8 gate is often
closed); the same z serve every temperature (a paired comparison). The student is a
free logit vector s in R^V. Each step it samples y from its own top-10 (the student's softmax
renormalised on its 10 largest logits), scores it with the advantage A = log p(y) - log q_old(y)
(q_old = the student's full softmax before the step, so the PPO ratio starts at 1) and takes one
plain SGD step s -= eta * grad on the per-token loss of eopd/losses.py:

  rule "pg"    (our trainer's update): the loss is token_objective(s, TokenBatch, ObjectiveConfig),
               the very function train calls, for objective rkl / eopd / full. The sampled-RKL
               gradient is then the softmax policy gradient -A (e_y - q).
  rule "paper" (the paper's s_y += eta * r): reverse_kl_sampled() is fed log q(y) with the softmax
               normaliser detached (s_y - stopgrad(logsumexp s)), so its gradient -A reaches s_y only
               and one SGD step is exactly s_y += eta * A. eopd / full add lam * g * forward_kl_renorm()
               over the teacher's top-16 with its full gradient, g = entropy_gate(H(p), tau).
               (token_objective takes logits and applies log_softmax itself, so this rule cannot go
               through it; it composes the same per-token functions the way token_objective does.)

eopd: g = 1[H(p) > tau], tau = 0.8 nats, H(p) the exact full-vocabulary teacher entropy; full: g = 1.
With one SGD step per fresh sample the PPO clip (eps 0.2) never binds (r = 1 at the step).

Metrics per seed: top-1 changes (steps where argmax s differs from the step before, over the whole
run; "late" = in the second half only), and at the end the exact KL(q || p), KL(p || q), student
entropy H(q), and whether argmax q = argmax p. Reported: mean and std over seeds.

Choices (the paper leaves them open): eta = 2.0 for the main table, the step size at which the
paper's rule shows the paper's peaked/flat contrast under RKL (the sweep prints eta = 0.25 ... 3: at
eta <= 1 the contrast is gone); 500 steps; one sample per step; student init s ~ N(0, 1), the same
draw for every objective and temperature; top-10 sampling as above; 100 seeds (teacher z and student
init drawn from seed 0 and 1, the sampling stream from seed 2; float64 throughout).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eopd.losses import (ObjectiveConfig, TokenBatch, entropy_gate, forward_kl_renorm, kl_divergence,  # noqa: E402
                         reverse_kl_sampled, token_objective)
from eopd.metrics import entropy_from_logprobs  # noqa: E402

VOCAB = 80
SET_LOGITS = (1.7, 1.9, 2.1, 2.3, 2.5)
# "sharp" (T = 0.1) is not in the paper: at T = 0.3 the gate is open for ~all seeds (H(p) ~ 1.9 nats), so eopd
# equals full there; at T = 0.1 it is open for about a third of them, which shows what the gate does.
TEMPERATURES = {"peaked": 0.3, "flat": 1.0, "sharp": 0.1}
RULES = ("paper", "pg")
OBJECTIVES = ("rkl", "eopd", "full")
METRICS = ("top1_changes", "late_changes", "final_rkl", "final_fkl", "student_entropy", "top1_match")


@dataclass(frozen=True)
class StudyConfig:
    seeds: int = 100
    steps: int = 500
    lr: float = 2.0
    samples: int = 1          # tokens sampled per step (the loss is their mean)
    sample_topk: int = 10     # the student samples from its own top-k
    fkl_topk: int = 16        # the teacher's top-k set S of the FKL term
    tau: float = 0.8
    init_std: float = 1.0


def make_teacher_logits(seeds: int, seed: int = 0) -> Tensor:
    """[seeds, V] teacher logits: N(0, 1) with SET_LOGITS written at five random positions per row."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(seeds, VOCAB, generator=g, dtype=torch.float64)
    pos = torch.stack([torch.randperm(VOCAB, generator=g)[:len(SET_LOGITS)] for _ in range(seeds)])
    z.scatter_(1, pos, torch.tensor(SET_LOGITS, dtype=z.dtype).expand(seeds, -1))
    return z


def run_student(teacher_logp: Tensor, init: Tensor, objective: str, rule: str, cfg: StudyConfig,
                seed: int = 1) -> dict[str, Tensor]:
    """Train one student per row of teacher_logp [n, V] (rows independent) from logits init [n, V];
    returns the per-row metrics (METRICS), each a float64 tensor [n]."""
    n, m = teacher_logp.shape[0], cfg.samples
    g = torch.Generator().manual_seed(seed)
    teacher_entropy = entropy_from_logprobs(teacher_logp)
    top = teacher_logp.topk(cfg.fkl_topk, dim=-1)
    obj_cfg = ObjectiveConfig(objective=objective, tau=cfg.tau)
    gate = entropy_gate(teacher_entropy, cfg.tau) if objective == "eopd" else torch.ones(n, dtype=torch.bool)
    s = init.clone().requires_grad_(True)
    prev = s.detach().argmax(-1)
    changes = torch.zeros(n, dtype=torch.float64)
    late = torch.zeros(n, dtype=torch.float64)
    for step in range(cfg.steps):
        with torch.no_grad():
            behaviour = F.log_softmax(s, dim=-1)
            cand = behaviour.topk(cfg.sample_topk, dim=-1)
            pick = torch.multinomial(cand.values.softmax(-1), m, replacement=True, generator=g)
            y = cand.indices.gather(1, pick)  # [n, m]
        if rule == "pg":
            loss = pg_loss(s, y, behaviour, teacher_logp, teacher_entropy, top, obj_cfg)
        else:
            loss = paper_rule_loss(s, y, behaviour, teacher_logp, top, objective, gate)
        (grad,) = torch.autograd.grad(loss, s)
        with torch.no_grad():
            s -= cfg.lr * grad
            top1 = s.argmax(-1)
            changed = (top1 != prev).double()
            changes += changed
            if step >= cfg.steps // 2:
                late += changed
            prev = top1
    with torch.no_grad():
        logq = F.log_softmax(s, dim=-1)
        return {"top1_changes": changes, "late_changes": late, "final_rkl": kl_divergence(logq, teacher_logp),
                "final_fkl": kl_divergence(teacher_logp, logq), "student_entropy": entropy_from_logprobs(logq),
                "top1_match": (logq.argmax(-1) == teacher_logp.argmax(-1)).double()}


def pg_loss(s: Tensor, y: Tensor, behaviour: Tensor, teacher_logp: Tensor, teacher_entropy: Tensor, top,
            obj_cfg: ObjectiveConfig) -> Tensor:
    """Rule "pg": sum over rows of the mean over the row's samples of token_objective's L_t (rows = students).
    y [n, m] sampled ids, behaviour [n, V] = log q_old, top = the teacher's (values, indices) top-k."""
    m = y.shape[1]

    def rep(t: Tensor) -> Tensor:
        return t.repeat_interleave(m, dim=0)

    ids = y.reshape(-1, 1)
    batch = TokenBatch(sampled_ids=ids[:, 0], behaviour_logprobs=rep(behaviour).gather(1, ids)[:, 0],
                       teacher_token_logprobs=rep(teacher_logp).gather(1, ids)[:, 0],
                       teacher_topk_ids=rep(top.indices), teacher_topk_logprobs=rep(top.values),
                       teacher_entropy=rep(teacher_entropy))
    per_token, _ = token_objective(rep(s), batch, obj_cfg)
    return per_token.sum() / m


def paper_rule_loss(s: Tensor, y: Tensor, behaviour: Tensor, teacher_logp: Tensor, top, objective: str,
                    gate: Tensor) -> Tensor:
    """Rule "paper": sum over rows of the mean over samples of reverse_kl_sampled, plus g * FKL (eopd, full)."""
    # Normaliser detached: d loss / d s is -A on s_y and 0 elsewhere, i.e. SGD gives s_y += eta * A.
    logq_y = s.gather(1, y) - torch.logsumexp(s, dim=-1, keepdim=True).detach()
    loss = reverse_kl_sampled(logq_y, behaviour.gather(1, y), teacher_logp.gather(1, y)).mean(1)
    if objective != "rkl":
        fkl = forward_kl_renorm(F.log_softmax(s, dim=-1).gather(1, top.indices), top.values)
        loss = loss + torch.where(gate, fkl, torch.zeros((), dtype=fkl.dtype))
    return loss.sum()


def study(cfg: StudyConfig, rules: tuple[str, ...] = RULES, objectives: tuple[str, ...] = OBJECTIVES,
          seed: int = 0) -> dict[tuple[str, str, str], dict[str, Tensor]]:
    """All (rule, objective, teacher) cells: {(rule, objective, teacher name): per-seed metrics}.
    The students of all temperatures train side by side as rows of one batch (they never interact)."""
    z = make_teacher_logits(cfg.seeds, seed)
    init = torch.randn(cfg.seeds, VOCAB, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64) * cfg.init_std
    names = list(TEMPERATURES)
    teacher_logp = torch.cat([F.log_softmax(z / TEMPERATURES[name], dim=-1) for name in names])
    out = {}
    for rule in rules:
        for objective in objectives:
            res = run_student(teacher_logp, init.repeat(len(names), 1), objective, rule, cfg, seed=seed + 2)
            for i, name in enumerate(names):
                out[(rule, objective, name)] = {k: v[i * cfg.seeds:(i + 1) * cfg.seeds] for k, v in res.items()}
    return out


def teacher_summary(cfg: StudyConfig, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Per temperature: mean teacher entropy, its std, and the share of seeds the gate opens (H > tau)."""
    z = make_teacher_logits(cfg.seeds, seed)
    out = {}
    for name, temp in TEMPERATURES.items():
        h = entropy_from_logprobs(F.log_softmax(z / temp, dim=-1))
        out[name] = (float(h.mean()), float(h.std()), float((h > cfg.tau).double().mean()))
    return out


def _fmt(v: Tensor) -> str:
    return f"{float(v.mean()):.2f} ± {float(v.std()):.2f}"


def print_table(results: dict, rules: tuple[str, ...], objectives: tuple[str, ...]) -> None:
    head = ("| rule | teacher | objective | top-1 changes | late (2nd half) | final KL(q‖p) | final KL(p‖q) "
            "| student H(q) | top-1 = teacher's |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for rule in rules:
        for name in TEMPERATURES:
            for objective in objectives:
                r = results[(rule, objective, name)]
                print(f"| {rule} | {name} | {objective} | " + " | ".join(_fmt(r[k]) for k in METRICS[:-1])
                      + f" | {float(r['top1_match'].mean()):.0%} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 seeds, 200 steps, no sweep (a smoke run)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=StudyConfig.lr)
    ap.add_argument("--samples", type=int, default=StudyConfig.samples)
    ap.add_argument("--sweep", type=float, nargs="*", default=None,
                    help="step sizes of the sweep table (default 0.25 0.5 1 2 3; none with --quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and the machine is shared)
    cfg = StudyConfig(seeds=args.seeds or (20 if args.quick else 100),
                      steps=args.steps or (200 if args.quick else 500), lr=args.lr, samples=args.samples)
    sweep = args.sweep if args.sweep is not None else ([] if args.quick else [0.25, 0.5, 1.0, 2.0, 3.0])
    t0 = time.perf_counter()
    print(f"toy study: V={VOCAB}, teacher z ~ N(0,1) with {SET_LOGITS} set, T = {TEMPERATURES}; {cfg.seeds} seeds, "
          f"{cfg.steps} steps, eta = {cfg.lr}, {cfg.samples} sample(s)/step from the student's top-{cfg.sample_topk}, "
          f"student init N(0, {cfg.init_std}), FKL over the teacher's top-{cfg.fkl_topk}, tau = {cfg.tau} nats")
    for name, (h, hs, share) in teacher_summary(cfg).items():
        print(f"teacher {name}: H(p) = {h:.2f} ± {hs:.2f} nats, gate open (H > tau) for {share:.0%} of seeds")
    print("\nmean ± std over seeds; rule paper: s_y += eta*A via reverse_kl_sampled; "
          "rule pg: SGD on token_objective\n")
    results = study(cfg)
    print_table(results, RULES, OBJECTIVES)
    if sweep:
        runs = {lr: results if math.isclose(lr, cfg.lr) else study(StudyConfig(**{**cfg.__dict__, "lr": lr}))
                for lr in sweep}
        for metric, title, digits in (("top1_changes", "mean top-1 changes", 1),
                                      ("final_rkl", "mean final KL(q‖p)", 2)):
            print(f"\nstep-size sweep: {title} (peaked / flat), {cfg.seeds} seeds, {cfg.steps} steps\n")
            print("| eta | " + " | ".join(f"{r} {o}" for r in RULES for o in OBJECTIVES) + " |")
            print("|---|" + "---|" * (len(RULES) * len(OBJECTIVES)))
            for lr, res in runs.items():
                cells = [" / ".join(f"{float(res[(r, o, name)][metric].mean()):.{digits}f}"
                                    for name in ("peaked", "flat")) for r in RULES for o in OBJECTIVES]
                print(f"| {lr:g} | " + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
