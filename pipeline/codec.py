"""Storage codecs for the teacher's top-k (ids and log-probs) in Parquet shards.

One Parquet row is one response of T tokens; a codec turns the row's [T, k] top-k ids and
log-probs into the two columns `teacher_topk_ids` and `teacher_topk_logprobs`, and a table of
such rows back into flat [N, k] tensors (N = all response tokens, in row order). Compression
(zstd) is applied by the Parquet writer on top.

Codecs (bytes per token measured by bench/score_teacher.py; see bench/RESULTS.md):

  packed   (DEFAULT) two binary columns, one blob per row, laid out for zstd:
           ids: a 2-byte header (k, uint16 LE), then the ids as 3 byte planes (low, mid, high
           byte; vocabulary < 2^24), each plane in rank-major order (all rank-1 ids of the row,
           then all rank-2 ids, ...): the high and mid planes of a Zipf-skewed vocabulary are
           highly compressible, the low plane is near random.
           log-probs: codes c = round(-logp / step) (step a power of two, default 1/32), stored
           as gaps between consecutive ranks (c_1, c_2 - c_1, ..., >= 0 since sorted descending),
           as 2 byte planes (uint16), rank-major. Gaps in the tail of a top-k are small numbers.
  uint8    list<fixed_size_list<int32, k>> ids, list<fixed_size_list<uint8, k>> codes
           c = round(-logp / step), step default 1/8 (readable as numbers, coarser).
  float16  list<fixed_size_list<int32, k>> ids, list<fixed_size_list<float16, k>> log-probs.
  float32  list<fixed_size_list<int32, k>> ids, list<fixed_size_list<float32, k>> log-probs (exact).

Error bound: for a true log-prob x >= codec.floor, |decoded - x| <= codec.max_abs_error (exactly:
the grids are power-of-two steps, so decoded values are exact float32 multiples of the step).
Below the floor (probabilities < e^floor, including -inf), the decoded value is <= floor +
max_abs_error: `packed` and `uint8` clamp to the floor; `float16` keeps float16 rounding.

All codecs keep the shard readable by pyarrow, pandas and `datasets.load_dataset("parquet")`;
`packed` columns read as `bytes` there (decode with `codec_from_metadata(...).decode(table)`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

IDS_COLUMN = "teacher_topk_ids"
LOGPROBS_COLUMN = "teacher_topk_logprobs"
DEFAULT_CODEC = "packed"

# file-metadata keys written by `metadata(k)` (the shard writer adds its own prefix)
META_CODEC, META_VERSION, META_PARAMS, META_K = "topk_codec", "topk_codec_version", "topk_codec_params", "topk_k"


class TopkCodec:
    """The interface of a top-k codec, plus the input validation and metadata they share."""

    name: str
    version: int = 1
    floor: float = -math.inf  # log-probs below it are not covered by max_abs_error
    max_abs_error: float = 0.0

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.params})"

    def metadata(self, k: int) -> dict[str, str]:
        """File-metadata entries that let `codec_from_metadata` rebuild this codec."""
        return {META_CODEC: self.name, META_VERSION: str(self.version),
                META_PARAMS: json.dumps(self.params, sort_keys=True), META_K: str(k)}

    def arrow_fields(self, k: int) -> list[pa.Field]:
        """The fields of the two top-k columns (IDS_COLUMN, LOGPROBS_COLUMN)."""
        raise NotImplementedError

    def encode(self, ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray]) -> dict[str, pa.Array]:
        """Rows (responses) of [T_i, k] ids and log-probs (sorted descending) -> {column: one
        element per row}. At least one row; T_i = 0 is allowed."""
        raise NotImplementedError

    def decode(self, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's two top-k columns -> ids [N, k] int64, log-probs [N, k] float32, N = sum T_i,
        rows in order (other columns are ignored). A table without rows gives [0, 0] for `packed`."""
        raise NotImplementedError

    @staticmethod
    def _check(ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], max_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Rows of [T_i, k] ids and log-probs with one k, ids in [0, max_id), log-probs sorted
        descending -> all rows concatenated: ids [N, k] int64, log-probs [N, k] float32; T_i; k."""
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} id rows but {len(logprobs)} log-prob rows")
        if not ids:
            raise ValueError("encode needs at least one row (k is taken from the arrays)")
        ids = [np.asarray(a, dtype=np.int64) for a in ids]
        logprobs = [np.asarray(a, dtype=np.float32) for a in logprobs]
        k = ids[0].shape[-1] if ids[0].ndim == 2 else -1
        for i, (a, b) in enumerate(zip(ids, logprobs)):
            if a.ndim != 2 or a.shape[1] != k or a.shape != b.shape:
                raise ValueError(f"row {i}: ids {a.shape} and logprobs {b.shape} must both be [T, k] with k = {k}")
        if k < 1:
            raise ValueError("k must be >= 1")
        flat_ids, flat_lp = np.concatenate(ids), np.concatenate(logprobs)
        if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= max_id):
            raise ValueError(f"token ids must lie in [0, {max_id})")
        if np.isnan(flat_lp).any():
            raise ValueError("log-probs contain NaN")
        if (flat_lp[:, 1:] > flat_lp[:, :-1]).any():
            raise ValueError("log-probs must be sorted descending along k (as chunked_token_stats returns them)")
        return flat_ids, flat_lp, np.array([len(a) for a in ids], dtype=np.int64), k


def _row_offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())


def _flat_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    """list<fixed_size_list<x, k>> (or list<list<x>>, as some readers return it) -> values [N * k], k."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise ValueError("top-k column has null rows")
    inner = arr.flatten()
    if pa.types.is_fixed_size_list(inner.type):
        k = inner.type.list_size
    else:
        lengths = np.diff(np.asarray(inner.offsets))
        k = int(lengths[0]) if len(lengths) else 0
        if (lengths != k).any():
            raise ValueError("top-k inner lists have different lengths")
    return inner.flatten().to_numpy(zero_copy_only=False), k


class ListCodec(TopkCodec):
    """Columnar: one list entry per token, k values each. Subclasses set the value type and grid."""

    value_type: pa.DataType

    def _to_values(self, lp: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _from_values(self, v: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def arrow_fields(self, k: int) -> list[pa.Field]:
        return [pa.field(IDS_COLUMN, pa.list_(pa.list_(pa.int32(), k))),
                pa.field(LOGPROBS_COLUMN, pa.list_(pa.list_(self.value_type, k)))]

    def encode(self, ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray]) -> dict[str, pa.Array]:
        flat_ids, flat_lp, lengths, k = self._check(ids, logprobs, 2**31)
        off = _row_offsets(lengths)
        tok_ids = pa.FixedSizeListArray.from_arrays(pa.array(flat_ids.reshape(-1).astype(np.int32)), k)
        values = pa.array(self._to_values(flat_lp.reshape(-1)), self.value_type)
        return {IDS_COLUMN: pa.ListArray.from_arrays(off, tok_ids),
                LOGPROBS_COLUMN: pa.ListArray.from_arrays(off, pa.FixedSizeListArray.from_arrays(values, k))}

    def decode(self, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        ids, k = _flat_values(table.column(IDS_COLUMN))
        vals, k2 = _flat_values(table.column(LOGPROBS_COLUMN))
        if ids.shape != vals.shape or (len(ids) and k != k2):
            raise ValueError(f"top-k columns disagree: {ids.shape} ids (k={k}), {vals.shape} log-probs (k={k2})")
        n = len(ids) // k if k else 0
        return (torch.from_numpy(ids.astype(np.int64).reshape(n, k)),
                torch.from_numpy(np.require(self._from_values(vals), np.float32, "W").reshape(n, k)))  # writable for torch


def _check_step(step: float, name: str) -> float:
    step = float(step)
    if not (step > 0 and math.log2(step) == round(math.log2(step)) and 2**-12 <= step <= 1):
        raise ValueError(f"codec {name!r}: step must be a power of two in [2^-12, 1] (exact grid), got {step}")
    return step


class Float32Codec(ListCodec):
    name, value_type = "float32", pa.float32()

    def _to_values(self, lp):
        return lp

    def _from_values(self, v):
        return v


class Float16Codec(ListCodec):
    """float16 has 10 mantissa bits: half-ulp 2^-6 for |x| in [32, 64), so the floor is -64."""

    name, value_type = "float16", pa.float16()
    floor, max_abs_error = -64.0, 2.0**-6

    def _to_values(self, lp):
        return lp.astype(np.float16)

    def _from_values(self, v):
        return v.astype(np.float32)


class Uint8Codec(ListCodec):
    """codes c = clamp(round(-logp / step), 0, 255); decoded -c * step; floor -255 * step."""

    name, value_type = "uint8", pa.uint8()

    def __init__(self, step: float = 1 / 8) -> None:
        super().__init__(step=_check_step(step, self.name))
        self.step = self.params["step"]
        self.floor, self.max_abs_error = -255 * self.step, self.step / 2

    def _to_values(self, lp):
        return np.clip(np.rint(-lp / self.step), 0, 255).astype(np.uint8)

    def _from_values(self, v):
        return v.astype(np.float32) * np.float32(-self.step)


ID_BYTES, CODE_BYTES = 3, 2  # packed: ids < 2^24, log-prob codes < 2^16


def _length_groups(lengths: np.ndarray, elements_per_token: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(T, rows, their first tokens) for the rows of each length T, in chunks whose gather index
    stays under ~32 MB: the packed codec's numpy works per group, not per row."""
    token_starts = np.cumsum(lengths) - lengths
    for T in np.unique(lengths).tolist():
        same_length = np.flatnonzero(lengths == T)
        per_chunk = max(1, (1 << 22) // max(1, elements_per_token * T))
        for c in range(0, len(same_length), per_chunk):
            rows = same_length[c:c + per_chunk]
            yield T, rows, token_starts[rows]


def _row_planes(x: np.ndarray, lengths: np.ndarray, nbytes: int) -> list[bytes]:
    """[N, k] non-negative ints, rows of `lengths` tokens -> per row its blob: nbytes byte planes
    (least significant first), each rank-major (all rank-1 values of the row, then rank 2, ...)."""
    k = x.shape[1]
    planes = x.astype("<u4").view(np.uint8).reshape(len(x), k, 4)[:, :, :nbytes]  # [N, k, nbytes]
    out: list[bytes] = [b""] * len(lengths)
    for T, rows, starts in _length_groups(lengths, k * nbytes):
        blocks = np.ascontiguousarray(planes[starts[:, None] + np.arange(T)].transpose(0, 3, 2, 1))  # [R, nbytes, k, T]
        for r, block in zip(rows.tolist(), blocks):
            out[r] = block.tobytes()
    return out


def _rows_from_planes(data: np.ndarray, byte_starts: np.ndarray, lengths: np.ndarray, k: int, nbytes: int) -> np.ndarray:
    """Inverse of _row_planes: row r's blob at data[byte_starts[r]:] ([nbytes, k, T_r] bytes)
    -> [sum T_r, k] int64 in row order."""
    out = np.empty((int(lengths.sum()), k), np.int64)
    for T, rows, starts in _length_groups(lengths, k * nbytes):
        blocks = data[byte_starts[rows, None] + np.arange(nbytes * k * T)].reshape(len(rows), nbytes, k, T)
        values = blocks[:, 0].astype(np.int64)
        for p in range(1, nbytes):
            values |= blocks[:, p].astype(np.int64) << (8 * p)
        out[starts[:, None] + np.arange(T)] = values.transpose(0, 2, 1)  # [R, T, k]
    return out


def _binary_rows(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A binary (or large_binary) column -> (all bytes as uint8, row offsets [rows + 1] into them)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        raise ValueError(f"packed codec expects a binary column, got {arr.type}")
    if arr.null_count:
        raise ValueError("top-k column has null rows")
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, off_type)[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data, offsets


class PackedCodec(TopkCodec):
    """Byte-plane blobs per row (see the module docstring); floor -(2^16 - 1) * step."""

    name = "packed"

    def __init__(self, step: float = 1 / 32) -> None:
        super().__init__(step=_check_step(step, self.name))
        self.step = self.params["step"]
        self.max_code = 2 ** (8 * CODE_BYTES) - 1
        self.floor, self.max_abs_error = -self.max_code * self.step, self.step / 2

    def arrow_fields(self, k: int) -> list[pa.Field]:
        return [pa.field(IDS_COLUMN, pa.binary()), pa.field(LOGPROBS_COLUMN, pa.binary())]

    def encode(self, ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray]) -> dict[str, pa.Array]:
        flat_ids, flat_lp, lengths, k = self._check(ids, logprobs, 2 ** (8 * ID_BYTES))
        if k >= 2**16:
            raise ValueError(f"packed codec: k must be < 65536, got {k}")
        header = np.uint16(k).astype("<u2").tobytes()
        codes = np.clip(np.rint(-flat_lp / self.step), 0, self.max_code).astype(np.int64)
        gaps = np.diff(codes, axis=1, prepend=0)  # >= 0: log-probs are sorted descending
        id_blobs = [header + b for b in _row_planes(flat_ids, lengths, ID_BYTES)]
        lp_blobs = _row_planes(gaps, lengths, CODE_BYTES)
        return {IDS_COLUMN: pa.array(id_blobs, pa.binary()), LOGPROBS_COLUMN: pa.array(lp_blobs, pa.binary())}

    def decode(self, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        id_data, id_off = _binary_rows(table.column(IDS_COLUMN))
        lp_data, lp_off = _binary_rows(table.column(LOGPROBS_COLUMN))
        rows = len(id_off) - 1
        if rows == 0:
            return torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0)
        starts = id_off[:-1]
        if (np.diff(id_off) < 2).any():
            raise ValueError("packed ids blob shorter than its header")
        ks = id_data[starts].astype(np.int64) | (id_data[starts + 1].astype(np.int64) << 8)
        k = int(ks[0])
        if k < 1 or (ks != k).any():
            raise ValueError(f"packed rows disagree on k: {sorted(set(ks.tolist()))}")
        n = (np.diff(id_off) - 2) // ID_BYTES  # T_i * k per row
        if ((np.diff(id_off) - 2) % ID_BYTES).any() or (n % k).any() or (np.diff(lp_off) != CODE_BYTES * n).any():
            raise ValueError("packed blob lengths do not match [T, k] rows (corrupt or mixed codec)")
        tok = n // k
        out_ids = _rows_from_planes(id_data, starts + 2, tok, k, ID_BYTES)
        out_codes = _rows_from_planes(lp_data, lp_off[:-1], tok, k, CODE_BYTES)
        np.cumsum(out_codes, axis=1, out=out_codes)
        logprobs = out_codes.astype(np.float32) * np.float32(-self.step)  # exact: step is a power of two
        return torch.from_numpy(out_ids), torch.from_numpy(logprobs)


CODECS: dict[str, type[TopkCodec]] = {c.name: c for c in (PackedCodec, Uint8Codec, Float16Codec, Float32Codec)}


def get_codec(name: str = DEFAULT_CODEC, **params: Any) -> TopkCodec:
    """A codec by name, e.g. get_codec("packed", step=1/64)."""
    if name not in CODECS:
        raise ValueError(f"unknown top-k codec {name!r}; known: {', '.join(CODECS)}")
    try:
        return CODECS[name](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters {params} for top-k codec {name!r}: {e}") from None


def codec_from_metadata(meta: dict[str, str]) -> TopkCodec:
    """The codec that wrote a shard, from the keys `metadata(k)` produced (prefix stripped)."""
    missing = [key for key in (META_CODEC, META_VERSION, META_PARAMS) if key not in meta]
    if missing:
        raise ValueError(f"shard metadata lacks {', '.join(missing)}: not written by a known top-k codec (keys: {sorted(meta)})")
    name, version = meta[META_CODEC], meta[META_VERSION]
    if name not in CODECS:
        raise ValueError(f"shard was written with top-k codec {name!r}, which this version does not know "
                         f"(known: {', '.join(CODECS)}); upgrade eopd-pipe or re-score the teacher")
    if version != str(CODECS[name].version):
        raise ValueError(f"shard was written with top-k codec {name!r} version {version}; this version reads "
                         f"version {CODECS[name].version} only; re-score the teacher or use a matching eopd-pipe")
    try:
        params = json.loads(meta[META_PARAMS])
    except json.JSONDecodeError as e:
        raise ValueError(f"top-k codec params {meta[META_PARAMS]!r} are not JSON: {e}") from None
    return get_codec(name, **params)
