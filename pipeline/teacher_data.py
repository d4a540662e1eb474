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
    """The responses of one teacher shard, token arrays flat in row order; row i's tokens are
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


def _flat(column: pa.ChunkedArray, dtype: torch.dtype) -> torch.Tensor:
    values = pa.concat_arrays([c.flatten() for c in column.chunks]) if column.num_chunks else pa.array([], pa.float32())
    return torch.from_numpy(values.to_numpy(zero_copy_only=False).copy()).to(dtype)


def shard_rows(stage_dir: Path, name: str, record: dict, expect_k: int | None) -> TeacherRows:
    """One teacher shard's rows, its checksum checked against `record`. Refuses a shard of another
    schema version, another k than `expect_k`, or an unknown codec version, naming the file and the fix."""
    path = stage_dir / name
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


TOKEN_FIELDS = ("response_ids", "behaviour_logprobs", "teacher_token_logprobs", "teacher_entropy", "teacher_topk_ids",
                "teacher_topk_logprobs")


class RoundRows:
    """A round's rows held as its shards' `TeacherRows`, never copied into one: row and token
    indices are the round's (shards in order), as if the shards were concatenated. Shards are
    appended as they are read, so streamed training adds each shard once."""

    def __init__(self, stage_dir: Path) -> None:
        self.stage_dir, self.parts = stage_dir, []
        self.prompt_ids: list[np.ndarray] = []
        self.offsets = np.zeros(1, dtype=np.int64)  # the round's token offsets per row
        self._token_starts = np.zeros(1, dtype=np.int64)  # first round token of each part (+ the end)

    def add(self, part: TeacherRows) -> None:
        if self.parts and part.k != self.k:
            raise UserError(f"{self.stage_dir}: shards disagree on k ({self.k} and {part.k}); delete the stage "
                            f"directory and rescore")
        self.parts.append(part)
        self.prompt_ids.extend(part.prompt_ids)
        self.offsets = np.concatenate([self.offsets, part.offsets[1:] + self.offsets[-1]])
        self._token_starts = np.append(self._token_starts, self.offsets[-1])

    @property
    def k(self) -> int:
        return self.parts[0].k

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids)

    def response_length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def response_tokens(self, i: int, limit: int | None = None) -> np.ndarray:
        """Row i's response token ids (its first `limit`, when given)."""
        p = int(np.searchsorted(self._token_starts, self.offsets[i], side="right")) - 1
        a = int(self.offsets[i] - self._token_starts[p])
        n = self.response_length(i) if limit is None else min(limit, self.response_length(i))
        return self.parts[p].response_ids[a : a + n].numpy()

    def token_batch(self, rows: list[int]) -> TokenBatch:
        """The response tokens of `rows`, concatenated in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        # token j of the batch is round token idx[j] (one arange, no per-row loop), found in its shard
        idx = np.arange(lengths.sum()) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        part = np.searchsorted(self._token_starts, idx, side="right") - 1
        fields = {}
        for f in TOKEN_FIELDS:
            first = getattr(self.parts[0], f)
            out = torch.empty((len(idx),) + tuple(first.shape[1:]), dtype=first.dtype)
            for p in np.unique(part):
                at = part == p
                out[torch.from_numpy(at)] = getattr(self.parts[p], f)[torch.from_numpy(idx[at] - self._token_starts[p])]
            fields[f] = out
        return TokenBatch(sampled_ids=fields["response_ids"], behaviour_logprobs=fields["behaviour_logprobs"],
                          teacher_token_logprobs=fields["teacher_token_logprobs"], teacher_topk_ids=fields["teacher_topk_ids"],
                          teacher_topk_logprobs=fields["teacher_topk_logprobs"], teacher_entropy=fields["teacher_entropy"])


def load_teacher_rows(stage_dir: Path, expect_k: int | None, fix: str) -> RoundRows:
    """Every row of a complete teacher stage, in shard order."""
    stream = TeacherStream(stage_dir, None, expect_k, fix)
    if not stream.rows_per_shard:
        raise UserError(f"{stage_dir}: no teacher shards; {fix}")
    return stream.through(len(stream.rows_per_shard) - 1)


class TeacherStream:
    """A round's teacher rows, read shard by shard as training reaches them: `through(i)` gives the
    rows of shards 0..i (row indices are the round's, in shard order; each shard read once). With
    `follow`, another thread of this process is still scoring the round and a shard not yet recorded
    is waited for; the rows are the same as those of the finished stage.

    `rows_per_shard`: each shard's response count. Following, it must be given (the rollout plan's
    prompts per shard x rollout.n, known before any shard exists, so that the step plan and the
    global LR schedule are fixed up front); otherwise None takes it from the complete stage's manifest."""

    def __init__(self, stage_dir: Path, rows_per_shard: list[int] | None, expect_k: int | None, fix: str,
                 follow=None) -> None:
        self.stage_dir, self.expect_k, self.follow = stage_dir, expect_k, follow
        self.manifest = None if follow is not None else require_complete(stage_dir, "teacher shards", fix)
        if rows_per_shard is None:
            if self.manifest is None:
                raise ValueError("TeacherStream: rows_per_shard is needed to follow a stage being written")
            rows_per_shard = [self.manifest["shards"][name]["rows"] for name in sorted(self.manifest["shards"])]
        self.rows_per_shard = rows_per_shard
        self._rows = RoundRows(stage_dir)

    def through(self, i: int) -> RoundRows:
        while len(self._rows.parts) <= i:
            j = len(self._rows.parts)
            name = shard_name(j)
            record = self.follow.record(j) if self.follow is not None else self.manifest["shards"][name]
            part = shard_rows(self.stage_dir, name, record, self.expect_k)
            if part.num_rows != self.rows_per_shard[j]:
                raise UserError(f"{self.stage_dir / name}: {part.num_rows} responses where the round's rollout plan "
                                f"has {self.rows_per_shard[j]}; its shards do not belong together: delete "
                                f"{self.stage_dir.parent} and run the round again")
            self._rows.add(part)
        return self._rows
