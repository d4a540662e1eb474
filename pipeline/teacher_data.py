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
from pipeline.shards import SCHEMA_VERSION, iter_stage, schema_metadata

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


def load_teacher_rows(stage_dir: Path, expect_k: int | None, fix: str) -> TeacherRows:
    """Every row of a complete teacher stage. Refuses shards of another schema version, another
    k than `expect_k`, or an unknown codec version, naming the file and the fix."""
    parts = []
    for name, table in iter_stage(stage_dir, "teacher shards", fix):
        path = Path(stage_dir) / name
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
        parts.append((table, ids, lps, k))
    if not parts:
        raise UserError(f"{stage_dir}: no teacher shards; {fix}")
    ks = {p[3] for p in parts}
    if len(ks) > 1:
        raise UserError(f"{stage_dir}: shards disagree on k ({sorted(ks)}); delete the stage directory and rescore")
    tables = [p[0].select(COLUMNS) for p in parts]
    table = pa.concat_tables(tables)
    lengths = pc.list_value_length(table.column("response_token_ids")).to_numpy().astype(np.int64)
    prompt_ends = np.cumsum(pc.list_value_length(table.column("prompt_token_ids")).to_numpy())
    return TeacherRows(
        # split at every row's end: the piece after the last end is empty
        prompt_ids=np.split(_flat(table.column("prompt_token_ids"), torch.long).numpy(), prompt_ends)[:-1],
        response_ids=_flat(table.column("response_token_ids"), torch.long),
        behaviour_logprobs=_flat(table.column("response_logprobs"), torch.float32),
        teacher_token_logprobs=_flat(table.column("teacher_token_logprob"), torch.float32),
        teacher_entropy=_flat(table.column("teacher_entropy"), torch.float32),
        teacher_topk_ids=torch.cat([p[1] for p in parts]).long(),
        teacher_topk_logprobs=torch.cat([p[2] for p in parts]).float(),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        k=ks.pop(),
    )
