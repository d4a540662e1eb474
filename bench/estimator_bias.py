"""Bias of the `topk` reverse-KL estimator against the full-vocabulary reverse KL, on the toy.

    python bench/estimator_bias.py --assets toy-assets                       # base student, k = 2 4 8 16
    python bench/estimator_bias.py --assets toy-assets --student runs/x/round-0199/student --out bias.json

The student samples one response per training prompt (temperature 1, as the rollouts); at every
response token t both models' full next-token distributions are computed, q (student) and p
(teacher), and compared:

    full   KL(q_t || p_t) = sum_{x in V} q (log q - log p)                   (what TRL's beta = 1 uses)
    topk   RKL^topk_t     = sum over S_k + one tail bucket of q_b (log q_b - log p_b)
                            (eopd/losses.py: reverse_kl_topk; S_k = the teacher's top-k, as cached)
    gap    full - topk    = q_T KL(q(.|T) || p(.|T)) >= 0,  T = V \\ S_k

per group of tokens: the teacher's high-entropy tokens (H(p_t) > tau, the EOPD gate) and the rest.
Also per group: the teacher's and the student's mass outside S_k (p_T, q_T), and the cosine between
the two estimators' gradients with respect to the student's logits (1 = the same direction). A last
row per group takes the top-16 log-probs as the teacher shards store them (the `packed` codec's
1/32-nat grid), which is what training reads.

The toy has a 263-token vocabulary; Qwen3's has 151,936. What a top-16 holds there is not measured
here (no hub access); two analyses are printed instead (eopd/teacher_stats.py): the worst case over
every distribution of a given entropy (`max_tail_mass`) and a Zipf-tailed model (`zipf_topk_mass`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from eopd.losses import kl_divergence, reverse_kl_topk, topk_buckets
from eopd.teacher_stats import max_tail_mass, zipf_topk_mass

QWEN3_VOCAB = 151_936


@torch.no_grad()
def token_distributions(teacher, student, prompt_ids: list[list[int]], response_ids: list[list[int]],
                        batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-probs [N, V] (fp64) of teacher and student at every response token."""
    logp_all, logq_all = [], []
    for start in range(0, len(prompt_ids), batch_size):
        pairs = [(p, r) for p, r in zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size]) if r]
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.zeros(len(pairs), width, dtype=torch.long)
        for row, (p, r) in enumerate(pairs):
            ids[row, :len(p) + len(r)] = torch.tensor(p + r)
        # Right padding with causal attention: positions before the padding do not see it.
        for model, out in ((teacher, logp_all), (student, logq_all)):
            logits = model(input_ids=ids).logits.double()
            for row, (p, r) in enumerate(pairs):
                # position i predicts token i + 1: response token j is predicted at len(p) - 1 + j
                out.append(torch.log_softmax(logits[row, len(p) - 1:len(p) - 1 + len(r)], -1))
    return torch.cat(logp_all), torch.cat(logq_all)


def _grad_full(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """d KL(q||p) / d student logits = q (log q - log p - KL(q||p))."""
    q = logq.exp()
    kl = (q * (logq - logp)).sum(-1, keepdim=True)
    return q * (logq - logp - kl)


def as_stored(ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """The top-k log-probs after a round trip through the shards' default codec (`packed`: a
    1/32-nat grid), i.e. what the trainer reads."""
    import pyarrow as pa

    from pipeline.codec import get_codec

    codec = get_codec()
    table = pa.table(codec.encode([ids.numpy()], [logprobs.float().numpy()]))
    return codec.decode(table)[1].to(logprobs.dtype)


def estimator_rows(logp: torch.Tensor, logq: torch.Tensor, ks: list[int], tau: float,
                   stored: bool = False) -> list[dict]:
    """Per (group, k): mean full KL, mean topk KL, their ratio, p_T, q_T, gradient cosine.
    stored: the teacher's top-k log-probs as the shards hold them (codec round trip)."""
    entropy = -(logp.exp() * logp).sum(-1)
    full = kl_divergence(logq, logp)
    g_full = _grad_full(logq, logp)
    groups = {"all": torch.ones_like(entropy, dtype=torch.bool), f"H > {tau}": entropy > tau,
              f"H <= {tau}": entropy <= tau}
    rows = []
    for k in ks:
        top = logp.topk(k, dim=-1)
        values = as_stored(top.indices, top.values) if stored else top.values
        z = logq.clone().requires_grad_(True)  # logq are log-probs: log_softmax(z) == z, same gradient path
        q_b, p_b = topk_buckets(torch.log_softmax(z, -1), top.indices, values)
        topk = reverse_kl_topk(q_b, p_b)
        (g_topk,) = torch.autograd.grad(topk.sum(), z)
        topk = topk.detach()
        cos = torch.nn.functional.cosine_similarity(g_topk, g_full, dim=-1, eps=1e-30)
        p_tail = 1.0 - top.values.exp().sum(-1)
        q_tail = 1.0 - logq.gather(-1, top.indices).exp().sum(-1)
        for name, mask in groups.items():
            n = int(mask.sum())
            if n == 0:
                continue
            f, t = float(full[mask].mean()), float(topk[mask].mean())
            rows.append({"group": name, "k": k, "teacher_topk": "stored (packed codec)" if stored else "exact", "tokens": n, "teacher_entropy": float(entropy[mask].mean()),
                         "full_kl": f, "topk_kl": t, "ratio": t / f if f > 0 else float("nan"),
                         "gap": f - t, "max_gap": float((full - topk)[mask].max()),
                         "teacher_tail_mass": float(p_tail[mask].mean()), "max_teacher_tail_mass": float(p_tail[mask].max()),
                         "student_tail_mass": float(q_tail[mask].mean()), "grad_cosine": float(cos[mask].mean()),
                         "min_grad_cosine": float(cos[mask].min())})
    return rows


def toy_topk_mass_near(logp: torch.Tensor, k: int, centre: float, width: float) -> dict:
    """The teacher's top-k mass at the toy tokens whose entropy lies within centre +- width."""
    entropy = -(logp.exp() * logp).sum(-1)
    mask = (entropy - centre).abs() <= width
    if not mask.any():
        return {"entropy": centre, "tokens": 0}
    mass = logp[mask].topk(k, -1).values.exp().sum(-1)
    return {"entropy": centre, "tokens": int(mask.sum()), "mean_topk_mass": float(mass.mean()),
            "min_topk_mass": float(mass.min())}


def qwen3_analysis(k: int = 16, vocab: int = QWEN3_VOCAB, entropies: tuple[float, ...] = (0.8, 2.0)) -> list[dict]:
    out = []
    for h in entropies:
        zipf_mass, s = zipf_topk_mass(h, k, vocab)
        out.append({"entropy": h, "k": k, "vocab": vocab, "worst_case_topk_mass": 1.0 - max_tail_mass(h, k, vocab),
                    "zipf_topk_mass": zipf_mass, "zipf_exponent": s})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| student | tokens | k (teacher top-k) | mean H(p) | full KL(q‖p) | topk | topk / full | max gap | p_T mean (max) | q_T mean | grad cos mean (min) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['group']} ({r['tokens']}) | {r['k']}{'' if r['teacher_topk'] == 'exact' else ' (as stored)'} | {r['teacher_entropy']:.3f} | "
                     f"{r['full_kl']:.4f} | {r['topk_kl']:.4f} | {r['ratio']:.4f} | {r['max_gap']:.2e} | "
                     f"{r['teacher_tail_mass']:.2e} ({r['max_teacher_tail_mass']:.2e}) | {r['student_tail_mass']:.2e} | "
                     f"{r['grad_cosine']:.4f} ({r['min_grad_cosine']:.4f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, required=True, help="a make-toy directory")
    ap.add_argument("--student", type=Path, action="append", default=None,
                    help="student model dir (repeatable; default ASSETS/student, the base student)")
    ap.add_argument("--prompts", type=int, default=256, help="training prompts to sample from (first N)")
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--tau", type=float, default=0.8, help="the gate: high-entropy tokens are H(p) > tau")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    # Tiny models: threads beyond the cores only contend (the machine is shared).
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.toy import generate

    assets = args.assets.resolve()
    if not (assets / "teacher").is_dir():
        raise SystemExit(f"{assets} is not a make-toy directory (no teacher/); run `eopd-pipe make-toy {assets}`")
    tokenizer = AutoTokenizer.from_pretrained(assets / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher", dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in (assets / "train_prompts.jsonl").read_text().splitlines()[:args.prompts]]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows: list[dict] = []
    toy_mass: list[dict] = []
    for student_dir in args.student or [assets / "student"]:
        t0 = time.time()
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
        responses = generate(student, tokenizer, prompts, temperature=1.0, max_new_tokens=args.max_tokens, seed=args.seed)
        logp, logq = token_distributions(teacher, student, prompt_ids, responses)
        name = str(student_dir) if args.student else "base"
        for r in estimator_rows(logp, logq, args.k, args.tau):
            rows.append({"student": name, **r})
        for r in estimator_rows(logp, logq, [16], args.tau, stored=True):
            rows.append({"student": name, **r})
        toy_mass += [{"student": name, **toy_topk_mass_near(logp, 16, c, 0.1)} for c in (0.8, 2.0)]
        print(f"{name}: {logp.shape[0]} response tokens, vocabulary {logp.shape[1]}, {time.time() - t0:.0f} s", flush=True)
    print(markdown(rows))
    qwen = qwen3_analysis()
    print("\nthe toy teacher's top-16 mass at its tokens of entropy 0.8 +- 0.1 and 2.0 +- 0.1:")
    for m in toy_mass:
        print(" ", m)
    print(f"\nat Qwen3's vocabulary ({QWEN3_VOCAB:,} tokens), top-16 mass by entropy:")
    for q in qwen:
        print(f"  H = {q['entropy']} nats: worst case over all distributions {q['worst_case_topk_mass']:.4f}; "
              f"Zipf tail (s = {q['zipf_exponent']:.3f}) {q['zipf_topk_mass']:.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "toy_topk_mass": toy_mass, "qwen3": qwen,
                                        "tau": args.tau, "prompts": args.prompts, "seed": args.seed}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
