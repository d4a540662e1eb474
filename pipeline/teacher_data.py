"""Reading teacher shards for training: checksums and metadata checked, top-k decoded to tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from eopd.losses import TokenBatch
from pipeline.codec import codec_from_metadata
from pipeline.errors import UserError
from pipeline.shards import SCHEMA_VERSION, read_shard, require_complete, schema_metadata, shard_name

COLUMNS = ["prompt_token_ids", "response_token_ids", "response_logprobs", "teacher_entropy", "teacher_token_logprob"]


@dataclass
class TeacherRows:
    """All responses of one round, token arrays flat in row order; row i's tokens are
    offsets[i]:offsets[i+1] of every per-token tensor."""

    prompt_ids: list[np.ndarray]
    response_ids: torch.Tensor  # [N] long
    behaviour_logprobs: torch.Tensor  # [N]
    teacher_token_logprobs: torch.Tensor  # [N]
    teacher_entropy: torch.Tensor  # [N]
    teacher_topk_ids: torch.Tensor  # [N, k] long
    teacher_topk_logprobs: torch.Tensor  # [N, k]
    offsets: np.ndarray  # [rows + 1]
    k: int

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids)

    def response_length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def token_batch(self, rows: list[int]) -> TokenBatch:
        """The response tokens of `rows`, concatenated in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        # token j of the batch is row r's token (j - batch start of r): one arange, no per-row loop
        idx = torch.from_numpy(np.arange(lengths.sum()) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths))
        return TokenBatch(self.response_ids[idx], self.behaviour_logprobs[idx], self.teacher_token_logprobs[idx],
                          self.teacher_topk_ids[idx], self.teacher_topk_logprobs[idx], self.teacher_entropy[idx])


def _flat(column: pa.ChunkedArray, dtype: torch.dtype) -> torch.Tensor:
    values = pa.concat_arrays([c.flatten() for c in column.chunks]) if column.num_chunks else pa.array([], pa.float32())
    return torch.from_numpy(values.to_numpy(zero_copy_only=False).copy()).to(dtype)


def shard_rows(stage_dir: Path, name: str, record: dict, expect_k: int | None) -> TeacherRows:
    """One teacher shard's rows, its checksum checked against `record`. Refuses a shard of another
    schema version, another k than `expect_k`, or an unknown codec version, naming the file and the fix."""
    path = Path(stage_dir) / name
    table = read_shard(stage_dir, name, record)
    meta = schema_metadata(table.schema)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: schema version {meta.get('schema_version')!r}, this eopd-pipe reads {SCHEMA_VERSION!r}; "
                        f"rescore with `eopd-pipe score-teacher`")
    k = int(meta.get("k", -1))
    if expect_k is not None and k != expect_k:
        raise UserError(f"{path}: teacher top-k was stored with k={k}, the config asks for "
                        f"score_teacher.top_k={expect_k}; rescore (delete {stage_dir}) or set score_teacher.top_k={k}")
    try:
        codec = codec_from_metadata(meta)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    ids, lps = codec.decode(table)
    table = table.select(COLUMNS)
    lengths = pc.list_value_length(table.column("response_token_ids")).to_numpy().astype(np.int64)
    prompt_ends = np.cumsum(pc.list_value_length(table.column("prompt_token_ids")).to_numpy())
    return TeacherRows(
        # split at every row's end: the piece after the last end is empty
        prompt_ids=np.split(_flat(table.column("prompt_token_ids"), torch.long).numpy(), prompt_ends)[:-1],
        response_ids=_flat(table.column("response_token_ids"), torch.long),
        behaviour_logprobs=_flat(table.column("response_logprobs"), torch.float32),
        teacher_token_logprobs=_flat(table.column("teacher_token_logprob"), torch.float32),
        teacher_entropy=_flat(table.column("teacher_entropy"), torch.float32),
        teacher_topk_ids=ids.long(),
        teacher_topk_logprobs=lps.float(),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        k=k,
    )


def concat_rows(parts: list[TeacherRows], stage_dir: Path) -> TeacherRows:
    """Shards' rows in the given order, as one round's rows (values copied, not changed)."""
    if len({p.k for p in parts}) > 1:
        raise UserError(f"{stage_dir}: shards disagree on k ({sorted({p.k for p in parts})}); delete the stage directory "
                        f"and rescore")
    ends = np.cumsum([0] + [int(p.offsets[-1]) for p in parts])
    return TeacherRows(
        prompt_ids=[x for p in parts for x in p.prompt_ids],
        **{f: torch.cat([getattr(p, f) for p in parts]) for f in TOKEN_FIELDS},
        offsets=np.concatenate([[0]] + [p.offsets[1:] + e for p, e in zip(parts, ends)]).astype(np.int64),
        k=parts[0].k,
    )


TOKEN_FIELDS = ("response_ids", "behaviour_logprobs", "teacher_token_logprobs", "teacher_entropy", "teacher_topk_ids",
                "teacher_topk_logprobs")


def load_teacher_rows(stage_dir: Path, expect_k: int | None, fix: str) -> TeacherRows:
    """Every row of a complete teacher stage, in shard order."""
    data = require_complete(stage_dir, "teacher shards", fix)
    parts = [shard_rows(stage_dir, name, data["shards"][name], expect_k) for name in sorted(data["shards"])]
    if not parts:
        raise UserError(f"{stage_dir}: no teacher shards; {fix}")
    return concat_rows(parts, stage_dir)


class TeacherStream:
    """A round's teacher rows, read shard by shard as training reaches them: `through(i)` gives the
    rows of shards 0..i (row indices are the round's, in shard order). With `follow`, another thread
    of this process is still scoring the round and a shard not yet recorded is waited for; the rows
    are the same as those of the finished stage.

    `rows_per_shard`: each shard's response count, known before any shard exists (the rollout plan's
    prompts per shard x rollout.n), so the step plan and the global LR schedule are fixed up front."""

    def __init__(self, stage_dir: Path, rows_per_shard: list[int], expect_k: int | None, fix: str,
                 follow=None) -> None:
        self.stage_dir, self.rows_per_shard, self.expect_k, self.follow = Path(stage_dir), rows_per_shard, expect_k, follow
        self.manifest = None if follow is not None else require_complete(stage_dir, "teacher shards", fix)
        self._parts: list[TeacherRows] = []
        self._rows: TeacherRows | None = None  # the concatenation of self._parts

    def through(self, i: int) -> TeacherRows:
        grew = False
        while len(self._parts) <= i:
            j, name = len(self._parts), shard_name(len(self._parts))
            record = self.follow.record(j) if self.follow is not None else self.manifest["shards"][name]
            part = shard_rows(self.stage_dir, name, record, self.expect_k)
            if part.num_rows != self.rows_per_shard[j]:
                raise UserError(f"{self.stage_dir / name}: {part.num_rows} responses where the round's rollout plan "
                                f"has {self.rows_per_shard[j]}; its shards do not belong together: delete "
                                f"{self.stage_dir.parent} and run the round again")
            self._parts.append(part)
            grew = True
        if grew or self._rows is None:
            self._rows = concat_rows(self._parts, self.stage_dir)
        return self._rows
