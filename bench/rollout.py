"""Rollout throughput: `eopd-pipe rollout`'s shard path against a bare `vllm.LLM.generate`.

Both sides use ONE loaded vllm.LLM (model load excluded from both), the same prompts and the same
per-request SamplingParams (seeds included), so the ratio isolates what eopd-pipe adds: splitting
prompts into shards (smaller generate calls), building Arrow tables, zstd Parquet writes, fsync,
sha256, manifest updates and file locks. Runs alternate (bare, stage, bare, stage, ...) and the
median of the per-pair ratios is reported. Target: stage >= 0.9x bare.

    python bench/rollout.py [--model DIR] [--prompts 256] [--n 4] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="HF model dir (default: the toy teacher, built quick into a temp dir)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts-per-shard", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from pipeline.config import Config, validate
    from pipeline.models import make_llm, load_tokenizer
    from pipeline.prompts import tokenized_prompts
    from pipeline.toy import make_toy
    from pipeline.work import derive_seed, run_shards
    from stages.rollout import STAGE, plan_shards, sample_shard

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    toy = make_toy(work / "toy", quick=True, progress=False)
    model = args.model or str(toy.teacher)
    cfg: Config = validate({
        "seed": 0, "student": {"path": model}, "teacher": {"path": model},
        "prompts": {"path": str(toy.train_prompts), "limit": args.prompts},
        "rollout": {"n": args.n, "max_tokens": args.max_tokens, "prompts_per_shard": args.prompts_per_shard,
                    "vllm": {"enforce_eager": True, "dtype": "float32"}},
    }, "bench")
    prompts, _ = tokenized_prompts(work / "prompts", cfg.prompts, load_tokenizer(model))
    shards = plan_shards(prompts, cfg, 0)
    llm = make_llm(model, cfg.rollout.vllm, seed=derive_seed(cfg.seed, STAGE, 0))

    def bare() -> tuple[int, float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        r = cfg.rollout
        reqs, params = [], []
        for pid, toks in zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt_token_ids").to_pylist()):
            for s in range(r.n):
                reqs.append(TokensPrompt(prompt_token_ids=toks))
                params.append(SamplingParams(n=1, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                             max_tokens=r.max_tokens, logprobs=0, seed=derive_seed(cfg.seed, STAGE, 0, pid, s)))
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t0

    def stage(k: int) -> tuple[int, float]:
        stage_dir = work / f"stage-{k}"
        t0 = time.perf_counter()
        s = run_shards(stage_dir, len(shards), {"bench": k}, lambda: (lambda i: sample_shard(llm, prompts, shards[i], cfg, 0)),
                       {"stage": STAGE}, desc="stage")
        elapsed = time.perf_counter() - t0
        shutil.rmtree(stage_dir)
        return s.tokens, elapsed

    bare()  # warm-up (first-call allocations)
    ratios, rows = [], []
    for k in range(args.repeats):
        bt, bs = bare()
        st, ss = stage(k)
        assert bt == st, f"both sides must generate the same tokens ({bt} vs {st})"
        ratios.append((st / ss) / (bt / bs))
        rows.append((bt / bs, st / ss, ratios[-1]))
    print(f"model {model}; {args.prompts} prompts x n={args.n}, max_tokens {args.max_tokens}, "
          f"{len(shards)} shards of {args.prompts_per_shard} prompts; {bt} generated tokens per run")
    print(f"{'repeat':>6} {'bare tok/s':>11} {'eopd-pipe tok/s':>16} {'ratio':>6}")
    for i, (b, s, r) in enumerate(rows):
        print(f"{i:>6} {b:>11,.0f} {s:>16,.0f} {r:>6.3f}")
    print(f"median ratio eopd-pipe / bare vLLM: {statistics.median(ratios):.3f} (target >= 0.9)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
