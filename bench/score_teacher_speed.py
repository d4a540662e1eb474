"""score-teacher speed: the whole stage against a bare teacher forward over the same batches.

A Qwen3 teacher with Qwen3's vocabulary (151,936) scores a real rollout stage (zstd Parquet
shards, manifest). Stage = `run_score_teacher` wall time minus its model load: shard reading and
checksums, batching, backbone forward, chunked statistics, codec encoding, Parquet writes,
manifests. Bare = `model(input_ids, attention_mask).logits` over the identical batches
(`length_sorted_batches`, same token budget), nothing else. Alternating runs, median ratio.
Target: stage <= 1.15x bare.

    python bench/score_teacher_speed.py [--rows 48] [--prompt 32] [--response 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

V = 151_936


def make_teacher(path: Path, hidden: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=hidden // 64, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(V - 1)} | {"<|endoftext|>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


def make_rollouts(stage: Path, rows: int, P: int, T: int, shards: int) -> None:
    from pipeline.work import ShardResult, run_shards
    from stages.rollout import rollout_schema

    per = rows // shards

    def shard(i: int) -> ShardResult:
        rng = np.random.default_rng(i)
        schema = rollout_schema(pa.schema([]))
        cols = {
            "prompt_id": [f"p{i}-{j}" for j in range(per)], "sample_index": [0] * per,
            "prompt_token_ids": [rng.integers(0, V - 1, P).tolist() for _ in range(per)],
            "response_token_ids": [rng.integers(0, V - 1, int(rng.integers(T // 2, T + 1))).tolist() for _ in range(per)],
            "finish_reason": ["length"] * per, "policy_round": [0] * per,
        }
        cols["response_logprobs"] = [(-rng.exponential(1.0, len(r))).astype(np.float32) for r in cols["response_token_ids"]]
        return ShardResult(pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema), 0)

    run_shards(stage, shards, {"bench": True}, lambda: shard, {"stage": "rollouts"}, desc="rollouts")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=224)
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024, help="teacher hidden size (Qwen3-8B: 4096)")
    args = ap.parse_args()
    from pipeline.config import validate
    from pipeline.rundir import RunDir
    from pipeline.shards import iter_stage
    from pipeline.models import length_sorted_batches, pad_right
    from stages.score_teacher import load_teacher, run_score_teacher

    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    make_teacher(work / "teacher", args.hidden)
    make_rollouts(work / "run" / "round-0000" / "rollouts", args.rows, args.prompt, args.response, shards=4)
    cfg = validate({"student": {"path": str(work / "teacher")}, "teacher": {"path": str(work / "teacher")},
                    "prompts": {"path": "unused.jsonl"},
                    "score_teacher": {"top_k": 16, "token_budget": args.token_budget, "token_chunk": 1024}}, "bench")

    model = load_teacher(work / "teacher", cfg.score_teacher)
    seqs = [p + r for _, t in iter_stage(work / "run" / "round-0000" / "rollouts", "rollouts", "")
            for p, r in zip(t.column("prompt_token_ids").to_pylist(), t.column("response_token_ids").to_pylist())]
    n_tokens = sum(len(s) for s in seqs)

    @torch.no_grad()
    def bare() -> float:
        t0 = time.perf_counter()
        for batch in length_sorted_batches([len(s) for s in seqs], args.token_budget):
            ids, mask = pad_right([seqs[i] for i in batch])
            model(input_ids=ids, attention_mask=mask).logits
        return time.perf_counter() - t0

    def stage(k: int) -> float:
        run = RunDir(work / "run")
        shutil.rmtree(run.stage_dir(0, "teacher"), ignore_errors=True)
        (run.root / "config.yaml").unlink(missing_ok=True)
        s = run_score_teacher(run, cfg, 0)
        return s.wall_seconds - s.load_seconds

    bare()  # warm-up
    ratios, rows = [], []
    for k in range(args.repeats):
        b = bare()
        s = stage(k)
        ratios.append(s / b)
        rows.append((b, s, s / b))
    print(f"teacher: Qwen3, V={V:,}, hidden {args.hidden}, 2 layers; {len(seqs)} sequences, {n_tokens:,} tokens, "
          f"token budget {args.token_budget}")
    print(f"{'repeat':>6} {'bare forward s':>15} {'stage s':>8} {'ratio':>6}")
    for i, (b, s, r) in enumerate(rows):
        print(f"{i:>6} {b:>15.2f} {s:>8.2f} {r:>6.3f}")
    print(f"median stage / bare forward: {statistics.median(ratios):.3f} (target <= 1.15)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
