"""`eopd-pipe score-teacher`: one teacher forward pass over prompt+response, per response token:
top-k ids and log-probs (compressed), the exact full-vocabulary entropy, the sampled token's log-prob.

Recipe:
  1. the round's rollouts must be complete; teacher and student must share one vocabulary
  2. teacher shard i <- rollout shard i (read with its checksum verified)
  3. sequences sorted by length and packed into batches of at most `token_budget` padded tokens
  4. backbone forward -> final hidden states at the positions that predict response tokens ->
     eopd.teacher_stats.chunked_token_stats (lm_head + log-softmax chunk by chunk, never a full
     fp32 [tokens, vocab] tensor)
  5. rollout columns + teacher columns -> Parquet shard (codec and identity in the file metadata),
     encoded and written by run_shards' writer thread while the teacher scores the next shard
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from eopd.teacher_stats import chunked_token_stats
from pipeline.codec import DEFAULT_CODEC, get_codec
from pipeline.config import Config, ScoreTeacherConfig
from pipeline.errors import UserError
from pipeline.models import (check_model_dir, check_same_vocabulary, length_sorted_batches, load_tokenizer,
                             response_hidden_states)
from pipeline.prompts import tokenizer_fingerprint
from pipeline.rundir import RunDir, freeze_config
from pipeline.shards import read_shard, require_complete, verify_stage
from pipeline.work import ShardResult, StageSummary, WorkerSpec, run_shards

STAGE = "teacher"


def teacher_dtype(cfg: ScoreTeacherConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_teacher(path: Path, cfg: ScoreTeacherConfig):
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": teacher_dtype(cfg, device)}
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not cfg.device_map:
        model.to(device)
    return model.eval()


def token_id_map(student_tok, teacher_tok, eos_map: dict[str, str]) -> dict[int, int]:
    """{student id: teacher id} from `eos_map`'s token strings (each must exist in the vocabulary)."""
    out = {}
    vocab = teacher_tok.get_vocab()
    for src, dst in eos_map.items():
        for tok in (src, dst):
            if tok not in vocab:
                raise UserError(f"score_teacher.eos_map: token {tok!r} is not in the vocabulary")
        out[vocab[src]] = vocab[dst]
    return out


@torch.no_grad()
def score_rows(model, prompts: list[list[int]], responses: list[list[int]], cfg: ScoreTeacherConfig,
               id_map: dict[int, int]) -> tuple[list[tuple[np.ndarray, ...]], float]:
    """Per row: (topk_ids [T,k], topk_logprobs [T,k], entropy [T], token_logprob [T]) as numpy;
    and the seconds spent in the teacher (forward + statistics)."""
    head = model.get_output_embeddings()
    device = head.weight.device
    inv_map = {t: s for s, t in id_map.items()}
    seqs = [p + [id_map.get(t, t) for t in r] for p, r in zip(prompts, responses)]
    results: list = [None] * len(seqs)
    engine_seconds = 0.0
    for batch in length_sorted_batches([len(s) for s in seqs], cfg.token_budget):
        t0 = time.perf_counter()
        hidden = response_hidden_states(model, [seqs[i] for i in batch], [len(prompts[i]) for i in batch], device)
        targets = torch.tensor([t for i in batch for t in seqs[i][len(prompts[i]):]], dtype=torch.long, device=device)
        stats = chunked_token_stats(hidden, head.weight, targets, cfg.top_k,
                                    token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk,
                                    lm_head_bias=getattr(head, "bias", None))
        topk_ids = stats.topk_ids.cpu().numpy()  # .cpu() waits for the GPU: the engine time ends here
        engine_seconds += time.perf_counter() - t0
        for s, t in inv_map.items():  # report top-k in the student's ids
            topk_ids[topk_ids == s] = t
        arrays = (topk_ids, stats.topk_logprobs.cpu().numpy(), stats.entropy.cpu().numpy(),
                  stats.target_logprob.cpu().numpy())
        start = 0
        for i in batch:
            T = len(responses[i])
            results[i] = tuple(a[start : start + T] for a in arrays)
            start += T
    return results, engine_seconds


def teacher_table(rollouts: pa.Table, scored: list[tuple[np.ndarray, ...]], codec, k: int) -> pa.Table:
    """Rollout columns + the teacher columns of DESIGN.md."""
    encoded = codec.encode([s[0] for s in scored], [s[1] for s in scored])
    table = rollouts
    for field in codec.arrow_fields(k):
        table = table.append_column(field, encoded[field.name])
    table = table.append_column("teacher_entropy", pa.array([s[2] for s in scored], pa.list_(pa.float32())))
    return table.append_column("teacher_token_logprob", pa.array([s[3] for s in scored], pa.list_(pa.float32())))


def run_score_teacher(run: RunDir, cfg: Config, round_index: int, worker: WorkerSpec | None = None,
                      allow_config_change: bool = False, teacher=None) -> StageSummary:
    """`teacher`: a model already loaded by `load_teacher` (the persistent `run` keeps one across rounds)."""
    sc = cfg.score_teacher
    rollout_dir = run.stage_dir(round_index, "rollouts")
    rollouts = require_complete(rollout_dir, f"round {round_index} rollouts",
                                f"run `eopd-pipe rollout {run.root} --round {round_index}` first")
    verify_stage(rollout_dir, rollouts)
    teacher_path = check_model_dir(cfg.teacher.path, "teacher")
    student_path = check_model_dir(cfg.student.path, "student")
    student_tok, teacher_tok = load_tokenizer(student_path, "student"), load_tokenizer(teacher_path, "teacher")
    check_same_vocabulary(student_tok, teacher_tok, student_path, teacher_path)
    id_map = token_id_map(student_tok, teacher_tok, sc.eos_map)
    codec = get_codec(sc.codec or DEFAULT_CODEC)
    freeze_config(run, cfg, allow_config_change)
    names = sorted(rollouts["shards"])

    def open_worker():
        model = teacher if teacher is not None else load_teacher(teacher_path, sc)

        def compute(i: int) -> ShardResult:
            table = read_shard(rollout_dir, names[i], rollouts["shards"][names[i]])
            responses = table.column("response_token_ids").to_pylist()
            scored, engine_seconds = score_rows(model, table.column("prompt_token_ids").to_pylist(), responses, sc, id_map)
            # The top-k encoding runs in the shard writer thread, beside the next shard's forward.
            return ShardResult(lambda: teacher_table(table, scored, codec, sc.top_k), sum(len(r) for r in responses), engine_seconds)
        return compute

    meta = {"stage": STAGE, "round": str(round_index), "k": str(sc.top_k), "teacher": str(teacher_path),
            "tokenizer_fingerprint": tokenizer_fingerprint(teacher_tok), **codec.metadata(sc.top_k)}
    plan = {"rollout_shards": {n: rollouts["shards"][n]["sha256"] for n in names}, "k": sc.top_k, "codec": codec.name}
    return run_shards(run.stage_dir(round_index, STAGE), len(names), plan, open_worker, meta, worker,
                      desc=f"score-teacher round {round_index}")
