"""Rollout throughput: `eopd-pipe rollout`'s shard path against a bare `vllm.LLM.generate`.

Both sides use ONE loaded vllm.LLM (model load excluded from both), the same prompts and the same
per-request SamplingParams (seeds included), so the ratio isolates what eopd-pipe adds: splitting
prompts into shards (smaller generate calls), building Arrow tables, zstd Parquet writes, fsync,
sha256, manifest updates and file locks. Runs alternate (bare, stage with overlapped shards, stage
without) and the median of the per-repeat ratios is reported. Target: stage >= 0.9x bare.

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
    ap.add_argument("--overlap-only", action="store_true", help="skip the stage without overlapped shards")
    ap.add_argument("--kv-gib", type=float, default=2.0, help="rollout.vllm.cpu_kvcache_gib")
    args = ap.parse_args()

    from pipeline.config import Config, validate
    from pipeline.models import make_llm, load_tokenizer
    from pipeline.prompts import tokenized_prompts
    from pipeline.toy import make_toy
    from pipeline.work import derive_seed, run_shards
    from stages.rollout import STAGE, plan_shards, rollout_worker, shard_requests

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    toy = make_toy(work / "toy", quick=True, progress=False)
    model = args.model or str(toy.teacher)
    cfg: Config = validate({
        "seed": 0, "student": {"path": model}, "teacher": {"path": model},
        "prompts": {"path": str(toy.train_prompts), "limit": args.prompts},
        "rollout": {"n": args.n, "max_tokens": args.max_tokens, "prompts_per_shard": args.prompts_per_shard,
                    "vllm": {"enforce_eager": True, "dtype": "float32", "cpu_kvcache_gib": args.kv_gib,
                             "max_model_len": args.max_tokens + 64}},
    }, "bench")
    prompts, _ = tokenized_prompts(work / "prompts", cfg.prompts, load_tokenizer(model))
    shards = plan_shards(prompts, cfg, 0)
    llm = make_llm(model, cfg.rollout.vllm, seed=derive_seed(cfg.seed, STAGE, 0))

    def bare() -> tuple[int, float]:
        reqs, params = shard_requests(prompts, list(range(prompts.num_rows)), cfg, 0)
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t0

    def stage(k: int, overlap: bool) -> tuple[int, float, float]:
        stage_dir = work / f"stage-{k}-{overlap}"
        c = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"overlap_shards": overlap})})
        t0 = time.perf_counter()
        s = run_shards(stage_dir, len(shards), {"bench": k}, lambda: rollout_worker(llm, prompts, shards, c, 0),
                       {"stage": STAGE}, desc=f"stage overlap={overlap}")
        elapsed = time.perf_counter() - t0
        shutil.rmtree(stage_dir)
        return s.tokens, elapsed, s.engine_seconds

    bare()  # warm-up (first-call allocations)
    ratios: dict[bool, list[float]] = {True: [], False: []}
    rows = []
    for k in range(args.repeats):
        bt, bs = bare()
        row = [bt / bs, bs]
        for overlap in (True,) if args.overlap_only else (True, False):
            st, ss, es = stage(k, overlap)
            assert bt == st, f"both sides must generate the same tokens ({bt} vs {st})"
            ratios[overlap].append((st / ss) / (bt / bs))
            row += [st / ss, ss, es, ratios[overlap][-1]]
        rows.append(row)
    print(f"model {model}; {args.prompts} prompts x n={args.n}, max_tokens {args.max_tokens}, "
          f"{len(shards)} shards of {args.prompts_per_shard} prompts; {bt} generated tokens per run")
    print("overlap: the next shard's requests queued before the current one is finished (the default);"
          " no overlap: one engine run per shard. 'engine s': inside vLLM.")
    head = ["bare tok/s", "bare s"] + [f"{m} {x}" for m in ("overlap", "no-overlap")[:1 if args.overlap_only else 2] for x in ("tok/s", "s", "engine s", "ratio")]
    print("repeat " + " ".join(f"{h:>18}" for h in head))
    for i, row in enumerate(rows):
        print(f"{i:>6} " + " ".join(f"{v:>18,.2f}" for v in row))
    for overlap, name in ((True, "overlap (default)"), (False, "no overlap"))[:1 if args.overlap_only else 2]:
        print(f"median ratio eopd-pipe {name} / bare vLLM: {statistics.median(ratios[overlap]):.3f} (target >= 0.9)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
