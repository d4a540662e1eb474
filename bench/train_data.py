"""Shard reading vs training consumption: can the teacher-shard reader keep training fed?

Reader side: real teacher shards (zstd Parquet, the default codec) at Qwen3's vocabulary
(151,936) and k = 16, read through `pipeline.teacher_data.load_teacher_rows` (sha256 check,
metadata checks, Parquet decode, top-k decode into tensors), then `TeacherRows.token_batch` for
every micro-batch: decoded tokens per second.
Training side: the chunked EOPD loss forward+backward (the LM-head part of a training step, the
part whose cost scales with the vocabulary) at the same vocabulary and H = 1,024, tokens per second.
A ratio > 1 means reading is faster than this slice of training alone, so a full training step
(which adds the transformer forward/backward) is never stalled by data.

    python bench/train_data.py [--rows 64] [--tokens-per-row 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

V, K, H = 151_936, 16, 1_024


def write_teacher_stage(stage: Path, rows: int, T: int, shards: int) -> int:
    from pipeline.codec import DEFAULT_CODEC, get_codec
    from pipeline.shards import Manifest, shard_name, write_shard

    codec = get_codec(DEFAULT_CODEC)
    rng = np.random.default_rng(0)
    manifest = Manifest(stage)
    manifest.init(shards, {"bench": True})
    per = rows // shards
    for s in range(shards):
        # Peaked, Zipf-like top-k: popular ids dominate, log-probs descend from near 0.
        ids = [np.minimum(rng.zipf(1.2, size=(T, K)), V - 1).astype(np.int64) for _ in range(per)]
        lps = [np.sort(-rng.exponential(2.0, size=(T, K)).astype(np.float32), axis=1)[:, ::-1].copy() for _ in range(per)]
        enc = codec.encode(ids, lps)
        table = pa.table({
            "prompt_token_ids": pa.array([rng.integers(0, V, 64).tolist() for _ in range(per)], pa.list_(pa.int32())),
            "response_token_ids": pa.array([rng.integers(0, V, T).tolist() for _ in range(per)], pa.list_(pa.int32())),
            "response_logprobs": pa.array([(-rng.exponential(1.0, T)).astype(np.float32) for _ in range(per)], pa.list_(pa.float32())),
            **{f.name: enc[f.name] for f in codec.arrow_fields(K)},
            "teacher_entropy": pa.array([rng.exponential(0.5, T).astype(np.float32) for _ in range(per)], pa.list_(pa.float32())),
            "teacher_token_logprob": pa.array([(-rng.exponential(1.0, T)).astype(np.float32) for _ in range(per)], pa.list_(pa.float32())),
        })
        info = write_shard(stage / shard_name(s), table, {"stage": "teacher", "k": str(K), **codec.metadata(K)})
        manifest.record(s, info)
    return rows * T


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens-per-row", type=int, default=1024)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    args = ap.parse_args()
    from eopd.losses import ObjectiveConfig, chunked_objective
    from pipeline.teacher_data import load_teacher_rows

    stage = Path(tempfile.mkdtemp(prefix="bench-train-data-")) / "teacher"
    n_tokens = write_teacher_stage(stage, args.rows, args.tokens_per_row, shards=4)

    t0 = time.perf_counter()
    rows = load_teacher_rows(stage, K, "bench")
    per_mb = max(1, args.micro_batch_tokens // args.tokens_per_row)
    batches = [rows.token_batch(list(range(a, min(a + per_mb, rows.num_rows)))) for a in range(0, rows.num_rows, per_mb)]
    read_s = time.perf_counter() - t0
    assert sum(len(b) for b in batches) == n_tokens

    torch.manual_seed(0)
    batch = batches[0]
    batch.sampled_ids.clamp_(max=V - 1)
    hidden = torch.randn(len(batch), H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.02).requires_grad_()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss, _ = chunked_objective(hidden, weight, batch, ObjectiveConfig(), float(len(batch)))
        loss.backward()
        times.append(time.perf_counter() - t0)
    train_tok_s = len(batch) / float(np.median(times))
    read_tok_s = n_tokens / read_s
    print(f"{n_tokens:,} teacher tokens in 4 shards (V={V:,}, k={K}); micro-batches of {len(batch):,} tokens")
    print(f"reader (checksums + Parquet + top-k decode + batching): {read_tok_s:>12,.0f} tokens/s")
    print(f"training, LM-head loss fwd+bwd only (fp32 CPU):         {train_tok_s:>12,.0f} tokens/s")
    print(f"reader / training ratio: {read_tok_s / train_tok_s:,.1f}x (> 1: data loading never stalls training)")


if __name__ == "__main__":
    main()
