"""`eopd-pipe score-teacher`: one teacher forward pass over prompt+response, per response token:
top-k ids and log-probs (compressed), the exact full-vocabulary entropy, the sampled token's log-prob.

Recipe:
  1. the round's rollouts must be complete (or, in the persistent `run`, be written by another
     thread: shard i is scored as soon as rollout shard i is recorded, see `follow`); teacher and
     student must share one vocabulary (tokenizer); their embedding sizes may differ (Qwen2.5-7B+
     have 152,064 rows, the smaller ones 151,936): the teacher is then scored over the rows the
     student has, and what the left-out rows would have contributed is counted per shard (a
     student with MORE rows than the teacher is refused)
  2. teacher shard i <- rollout shard i (read with its checksum verified)
  3. sequences sorted by length and packed into batches of at most `token_budget` padded tokens
  4. backbone forward -> final hidden states at the positions that predict response tokens ->
     eopd.teacher_stats.chunked_token_stats (lm_head + log-softmax chunk by chunk, never a full
     fp32 [tokens, vocab] tensor)
  5. rollout columns + teacher columns -> Parquet shard (codec and identity in the file metadata),
     encoded and written by run_shards' writer thread while the teacher scores the next shard
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from eopd.teacher_stats import chunked_token_stats, outside_rows
from pipeline.codec import DEFAULT_CODEC, get_codec
from pipeline.config import Config, ScoreTeacherConfig
from pipeline.errors import UserError
from pipeline.models import (check_model_dir, check_same_vocabulary, length_sorted_batches, load_tokenizer,
                             response_hidden_states)
from pipeline.prompts import tokenizer_fingerprint
from pipeline.rundir import RunDir, freeze_config
from pipeline.shards import META_PREFIX, GrowingManifest, read_shard, require_complete, shard_name, verify_stage
from pipeline.work import Follow, ShardResult, StageSummary, WorkerSpec, run_shards

STAGE = "teacher"


def teacher_dtype(cfg: ScoreTeacherConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_teacher(path: Path, cfg: ScoreTeacherConfig):
    from transformers import AutoModelForCausalLM

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = {"dtype": teacher_dtype(cfg, device)}
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not cfg.device_map:
        model.to(device)
    return model.eval()


def embedding_rows(path: Path, what: str) -> int:
    """Rows of the model's input embedding and LM head (config `vocab_size`), read without loading weights."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise UserError(f"{what} config at {path} could not be read: {type(e).__name__}: {e}") from None
    return int(cfg.get_text_config().vocab_size)


def scored_rows(student_rows: int, teacher_rows: int, tokenizer_entries: int, student_path: Path,
                teacher_path: Path) -> int:
    """How many LM-head rows the teacher is scored over: the rows both models have.

    One tokenizer, different embedding sizes (e.g. a Qwen2.5-7B teacher, 152,064 rows, and a
    Qwen2.5-1.5B student, 151,936): rows past the tokenizer's entries name no token, so
    restricting the teacher to the student's rows changes its distribution only by the mass it
    puts there (counted per shard). A student with more rows than the teacher is refused: it
    could sample a row the teacher cannot score."""
    if student_rows > teacher_rows:
        raise UserError(f"the student ({student_path}) has {student_rows:,} embedding rows, the teacher ({teacher_path}) "
                        f"only {teacher_rows:,}: the student can sample a row the teacher cannot score. Use a teacher "
                        f"with at least the student's rows (same tokenizer), e.g. the larger model of the family")
    if teacher_rows < tokenizer_entries or student_rows < tokenizer_entries:
        raise UserError(f"the tokenizer has {tokenizer_entries:,} entries but the student has {student_rows:,} and the "
                        f"teacher {teacher_rows:,} embedding rows; every token needs a row in both")
    return student_rows


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
               id_map: dict[int, int], rows: int | None = None,
               counts: dict[str, float] | None = None) -> tuple[list[tuple[np.ndarray, ...]], float]:
    """Per row: (topk_ids [T,k], topk_logprobs [T,k], entropy [T], token_logprob [T]) as numpy;
    and the seconds spent in the teacher (forward + statistics).

    `rows`: score over the LM head's first `rows` rows only (the rows the student has). `counts`
    (if given) accumulates the positions where a left-out row would have been in the top-k, the
    left-out mass (sum and max) and the positions whose top-k holds a row past `tokenizer_entries`
    (set by the caller: rows no token names)."""
    head = model.get_output_embeddings()
    device = head.weight.device
    rows = head.weight.shape[0] if rows is None else rows
    weight = head.weight[:rows]  # a view: no copy of the head
    bias = getattr(head, "bias", None)
    entries = int(counts.get("tokenizer_entries", rows)) if counts is not None else rows
    inv_map = {t: s for s, t in id_map.items()}
    seqs = [p + [id_map.get(t, t) for t in r] for p, r in zip(prompts, responses)]
    results: list = [None] * len(seqs)
    engine_seconds = 0.0
    for batch in length_sorted_batches([len(s) for s in seqs], cfg.token_budget):
        t0 = time.perf_counter()
        hidden = response_hidden_states(model, [seqs[i] for i in batch], [len(prompts[i]) for i in batch], device)
        targets = torch.tensor([t for i in batch for t in seqs[i][len(prompts[i]):]], dtype=torch.long, device=device)
        stats = chunked_token_stats(hidden, weight, targets, cfg.top_k,
                                    token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk,
                                    lm_head_bias=None if bias is None else bias[:rows])
        if counts is not None:
            out = outside_rows(hidden, head.weight, rows, stats, bias)
            counts["positions"] += stats.topk_ids.shape[0]
            counts["topk_outside_student_rows"] += int(out.topk_outside.sum())
            counts["mass_outside_sum"] += float(out.mass_outside.double().sum())
            if out.mass_outside.numel():
                counts["mass_outside_max"] = max(counts["mass_outside_max"], float(out.mass_outside.max()))
            counts["topk_untokenized_rows"] += int((stats.topk_ids >= entries).any(1).sum())
            counts["sampled_untokenized_rows"] += int((targets >= entries).sum())
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
                      allow_config_change: bool = False, teacher=None, follow: Follow | None = None,
                      stop: threading.Event | None = None) -> StageSummary:
    """`teacher`: a model already loaded by `load_teacher` (the persistent `run` keeps one across rounds).
    `follow`: the rollouts are still being written by another thread; teacher shard i waits for
    rollout shard i. The rows, and once complete the manifest, are those of a run after the rollouts.
    `stop`: set by another thread (the persistent `run`, when it trains beside this stage), it ends
    the stage before its next shard."""
    sc = cfg.score_teacher
    rollout_dir = run.stage_dir(round_index, "rollouts")
    if follow is None:
        rollouts = require_complete(rollout_dir, f"round {round_index} rollouts",
                                    f"run `eopd-pipe rollout {run.root} --round {round_index}` first")
    else:
        rollouts = follow.data()
    verify_stage(rollout_dir, rollouts, worker.owns if worker is not None else None)  # following: those recorded so far
    teacher_path = check_model_dir(cfg.teacher.path, "teacher")
    student_path = check_model_dir(cfg.student.path, "student")
    student_tok, teacher_tok = load_tokenizer(student_path, "student"), load_tokenizer(teacher_path, "teacher")
    check_same_vocabulary(student_tok, teacher_tok, student_path, teacher_path)
    student_rows, teacher_rows = embedding_rows(student_path, "student"), embedding_rows(teacher_path, "teacher")
    rows = scored_rows(student_rows, teacher_rows, len(teacher_tok), student_path, teacher_path)
    id_map = token_id_map(student_tok, teacher_tok, sc.eos_map)
    codec = get_codec(sc.codec or DEFAULT_CODEC)
    freeze_config(run, cfg, allow_config_change)
    names = [shard_name(i) for i in range(rollouts["num_shards"])]
    known = {n: rollouts["shards"][n]["sha256"] for n in names if n in rollouts["shards"]}
    manifest = GrowingManifest(run.stage_dir(round_index, STAGE), "rollout_shards")

    def open_worker():
        model = teacher if teacher is not None else load_teacher(teacher_path, sc)

        def compute(i: int) -> ShardResult:
            record = rollouts["shards"].get(names[i])
            if record is None:  # following: wait for it, then name it in the plan before scoring it
                record = follow.record(i)
                manifest.extend({names[i]: record["sha256"]})
            table = read_shard(rollout_dir, names[i], record)
            responses = table.column("response_token_ids").to_pylist()
            counts = new_counts(len(teacher_tok))
            scored, engine_seconds = score_rows(model, table.column("prompt_token_ids").to_pylist(), responses, sc,
                                                id_map, rows, counts)
            add_counts(totals, counts)
            # The top-k encoding runs in the shard writer thread, beside the next shard's forward.
            return ShardResult(lambda: with_counts(teacher_table(table, scored, codec, sc.top_k), counts),
                               sum(len(r) for r in responses), engine_seconds)
        return compute

    totals = new_counts(len(teacher_tok))

    meta = {"stage": STAGE, "round": str(round_index), "k": str(sc.top_k), "teacher": str(teacher_path),
            "tokenizer_fingerprint": tokenizer_fingerprint(teacher_tok), "teacher_rows": str(teacher_rows),
            "scored_rows": str(rows), "tokenizer_entries": str(len(teacher_tok)), **codec.metadata(sc.top_k)}
    plan = {"rollout_shards": known, "k": sc.top_k, "codec": codec.name}
    if rows < teacher_rows:
        tqdm.write(f"score-teacher: the teacher has {teacher_rows:,} embedding rows, the student {student_rows:,}: scoring "
                   f"over the first {rows:,} (the tokenizer has {len(teacher_tok):,} entries); per shard the footer "
                   f"counts what the {teacher_rows - rows:,} left-out rows would have changed")
    summary = run_shards(run.stage_dir(round_index, STAGE), len(names), plan, open_worker, meta, worker,
                         desc=f"score-teacher round {round_index}", growing="rollout_shards", stop=stop)
    if totals["positions"]:
        tqdm.write(count_line(totals, teacher_rows - rows))
    return summary


def new_counts(tokenizer_entries: int) -> dict[str, float]:
    return {"tokenizer_entries": tokenizer_entries, "positions": 0, "topk_outside_student_rows": 0,
            "mass_outside_sum": 0.0, "mass_outside_max": 0.0, "topk_untokenized_rows": 0, "sampled_untokenized_rows": 0}


def add_counts(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        if key == "mass_outside_max":
            total[key] = max(total[key], value)
        elif key != "tokenizer_entries":
            total[key] += value


def with_counts(table: pa.Table, counts: dict[str, float]) -> pa.Table:
    """The shard's own counts in its footer (write_shard keeps table metadata beside the stage's keys)."""
    meta = dict(table.schema.metadata or {})
    for key in ("positions", "topk_outside_student_rows", "topk_untokenized_rows", "sampled_untokenized_rows"):
        meta[f"{META_PREFIX}{key}".encode()] = str(int(counts[key])).encode()
    mean = counts["mass_outside_sum"] / max(counts["positions"], 1)
    meta[f"{META_PREFIX}mass_outside_student_rows_mean".encode()] = f"{mean:.6g}".encode()
    meta[f"{META_PREFIX}mass_outside_student_rows_max".encode()] = f"{counts['mass_outside_max']:.6g}".encode()
    return table.replace_schema_metadata(meta)


def count_line(c: dict[str, float], left_out: int) -> str:
    n = int(c["positions"])
    parts = [f"score-teacher: {n:,} positions scored now"]
    if left_out:
        parts.append(f"{int(c['topk_outside_student_rows']):,} with a left-out teacher row in the top-k (left out of "
                     f"it), left-out mass mean {c['mass_outside_sum'] / n:.3g} max {c['mass_outside_max']:.3g}")
    parts.append(f"{int(c['topk_untokenized_rows']):,} with a top-k row past the tokenizer's "
                 f"{int(c['tokenizer_entries']):,} entries; {int(c['sampled_untokenized_rows']):,} sampled tokens there")
    return "; ".join(parts)
