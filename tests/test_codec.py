"""Top-k storage codecs: roundtrip error bounds, exact ids, edge shapes, real Parquet files, metadata."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from eopd.teacher_stats import token_stats_naive
from pipeline.codec import (CODECS, DEFAULT_CODEC, IDS_COLUMN, LOGPROBS_COLUMN, codec_from_metadata,
                            get_codec)
from pipeline.shards import file_metadata, write_shard

ALL = [("packed", {}), ("packed", {"step": 1 / 64}), ("uint8", {}), ("float16", {}), ("float32", {})]


def realistic_rows(lengths=(37, 0, 1, 200, 5), k=20, V=5000, seed=0):
    """Top-k of peaked softmaxes: Zipf-like prior + Gaussian noise + a lifted candidate, some flat rows."""
    g = torch.Generator().manual_seed(seed)
    prior = -torch.log1p(torch.randperm(V, generator=g).float())
    ids, lps = [], []
    for T in lengths:
        z = 0.5 * prior + torch.randn(T, V, generator=g)
        z[torch.arange(T), torch.randint(0, V, (T,), generator=g)] += 20 * torch.rand(T, generator=g)
        st = token_stats_naive(z, torch.zeros(T, dtype=torch.long), k)
        ids.append(st.topk_ids.numpy())
        lps.append(st.topk_logprobs.numpy())
    return ids, lps


def check_decoded(codec, ids, lps, got_ids, got_lps):
    want_ids, want_lps = np.concatenate(ids), np.concatenate(lps)
    assert got_ids.dtype == torch.int64 and got_lps.dtype == torch.float32
    assert got_ids.shape == want_ids.shape and got_lps.shape == want_lps.shape
    assert np.array_equal(got_ids.numpy(), want_ids)
    got = got_lps.numpy()
    above = want_lps >= codec.floor
    assert np.abs(got[above] - want_lps[above]).max(initial=0) <= codec.max_abs_error
    assert (got[~above] <= codec.floor + codec.max_abs_error).all()
    return np.abs(got[above] - want_lps[above]).max(initial=0)


@pytest.mark.parametrize("name,params", ALL)
def test_roundtrip_in_memory(name, params):
    codec = get_codec(name, **params)
    ids, lps = realistic_rows()
    table = pa.table(codec.encode(ids, lps))
    assert table.schema == pa.schema(codec.arrow_fields(20))
    err = check_decoded(codec, ids, lps, *codec.decode(table))
    if codec.max_abs_error > 0:
        assert err > codec.max_abs_error / 4  # lossy as stated: the bound is not vacuous


@pytest.mark.parametrize("name,params", ALL)
def test_k1_empty_rows_and_floor(name, params):
    codec = get_codec(name, **params)
    ids = [np.zeros((0, 1), np.int64), np.array([[5], [151935]]), np.zeros((0, 1), np.int64)]
    lps = [np.zeros((0, 1), np.float32), np.array([[-1e-7], [-np.inf]], np.float32), np.zeros((0, 1), np.float32)]
    got_ids, got_lps = codec.decode(pa.table(codec.encode(ids, lps)))
    assert got_ids.tolist() == [[5], [151935]]
    assert abs(got_lps[0, 0].item() - np.float32(-1e-7)) <= codec.max_abs_error
    assert got_lps[1, 0].item() <= codec.floor + codec.max_abs_error  # -inf: clamped or kept, never above
    only_empty = codec.decode(pa.table(codec.encode([np.zeros((0, 3), np.int64)], [np.zeros((0, 3), np.float32)])))
    assert only_empty[0].shape == (0, 3) and only_empty[1].shape == (0, 3)


def test_packed_byte_layout():
    """The stored format (module docstring), byte for byte: shards written earlier must stay readable."""
    ids = [np.array([[1, 256], [2, 65536]]), np.array([[7, 8]])]
    lps = [np.array([[-0.5, -1.0], [0.0, -3.0]], np.float32), np.array([[-1 / 32, -2 / 32]], np.float32)]
    got = get_codec("packed", step=1 / 32).encode(ids, lps)
    assert got[IDS_COLUMN].to_pylist() == [bytes([2, 0, 1, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]), bytes([2, 0, 7, 8, 0, 0, 0, 0])]
    # codes [[16, 32], [0, 96]] -> gaps [[16, 16], [0, 96]] -> rank-major 16, 0, 16, 96 -> low plane, high plane
    assert got[LOGPROBS_COLUMN].to_pylist() == [bytes([16, 0, 16, 96, 0, 0, 0, 0]), bytes([1, 1, 0, 0])]


def test_packed_grid_is_exact():
    """Power-of-two step: every value is off by at most step/2, values on the grid come back exactly."""
    codec = get_codec("packed", step=1 / 32)
    x = -np.sort(np.random.default_rng(0).uniform(0, 60, (1000, 8)).astype(np.float32), axis=1)
    x[:, 0] = np.ceil(x[:, 0] * 32) / 32  # on the grid (and still the largest)
    got = codec.decode(pa.table(codec.encode([np.tile(np.arange(8), (1000, 1))], [x])))[1].numpy()
    assert np.array_equal(got[:, 0], x[:, 0])
    assert np.abs(got - x).max() <= 1 / 64
    assert codec.floor == -(2**16 - 1) / 32 and codec.max_abs_error == 1 / 64


@pytest.mark.parametrize("name,params", ALL)
def test_decode_sliced_and_chunked(name, params):
    codec = get_codec(name, **params)
    ids, lps = realistic_rows()
    table = pa.table(codec.encode(ids, lps))
    got_ids, got_lps = codec.decode(table.slice(2, 2))  # rows 2..3 only: offsets must be honoured
    assert np.array_equal(got_ids.numpy(), np.concatenate(ids[2:4]))
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2)])
    assert torch.equal(codec.decode(chunked)[0], codec.decode(table)[0])


def write_teacher_shard(path, codec, ids, lps):
    k = ids[0].shape[1]
    rng = np.random.default_rng(1)
    cols = {"prompt_id": pa.array([f"p{i}" for i in range(len(ids))]),
            "teacher_entropy": pa.array([rng.random(len(a), dtype=np.float32) for a in ids], pa.list_(pa.float32())),
            "teacher_token_logprob": pa.array([-rng.random(len(a), dtype=np.float32) for a in ids], pa.list_(pa.float32())),
            **codec.encode(ids, lps)}
    write_shard(path, pa.table(cols), codec.metadata(k))


@pytest.mark.parametrize("name,params", ALL)
def test_parquet_file_pyarrow_pandas_datasets(tmp_path, name, params):
    codec = get_codec(name, **params)
    ids, lps = realistic_rows()
    path = tmp_path / "part-00000.parquet"
    write_teacher_shard(path, codec, ids, lps)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"

    again = codec_from_metadata(file_metadata(path))
    assert (again.name, again.params, again.max_abs_error) == (codec.name, codec.params, codec.max_abs_error)
    check_decoded(codec, ids, lps, *again.decode(pq.read_table(path)))

    import pandas as pd

    df = pd.read_parquet(path)
    assert len(df) == len(ids) and len(df[IDS_COLUMN][3]) > 0

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(ids) and len(ds[3]["teacher_entropy"]) == 200
    check_decoded(codec, ids, lps, *again.decode(ds.data.table))


@pytest.mark.parametrize("name,params", ALL)
def test_metadata_roundtrip(name, params):
    codec = get_codec(name, **params)
    meta = codec.metadata(20)
    assert all(isinstance(v, str) for v in meta.values()) and meta["topk_k"] == "20"
    again = codec_from_metadata(meta)
    assert type(again) is type(codec) and again.params == codec.params and again.floor == codec.floor


def test_unknown_codec_and_version_errors():
    with pytest.raises(ValueError, match="unknown top-k codec 'zip'.*known: packed"):
        get_codec("zip")
    meta = get_codec(DEFAULT_CODEC).metadata(20)
    with pytest.raises(ValueError, match="codec 'zip'.*does not know"):
        codec_from_metadata({**meta, "topk_codec": "zip"})
    with pytest.raises(ValueError, match="version 9"):
        codec_from_metadata({**meta, "topk_codec_version": "9"})
    with pytest.raises(ValueError, match="lacks topk_codec"):
        codec_from_metadata({"k": "20"})
    with pytest.raises(ValueError, match="bad parameters"):
        codec_from_metadata({**meta, "topk_codec_params": json.dumps({"bits": 3})})
    with pytest.raises(ValueError, match="power of two"):
        get_codec("packed", step=0.1)
    assert set(CODECS) == {"packed", "uint8", "float16", "float32"}


def test_encode_rejects_bad_input():
    codec = get_codec("packed")
    ids, lps = realistic_rows(lengths=(4,), k=3)
    with pytest.raises(ValueError, match="sorted descending"):
        codec.encode(ids, [lps[0][:, ::-1]])
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(ids, [np.full((4, 3), np.nan, np.float32)])
    with pytest.raises(ValueError, match=r"\[0, 16777216\)"):
        codec.encode([ids[0] + 2**24], lps)
    with pytest.raises(ValueError, match="must both be"):
        codec.encode([ids[0], ids[0][:, :2]], [lps[0], lps[0][:, :2]])
    with pytest.raises(ValueError, match="id rows"):
        codec.encode(ids, lps * 2)


def test_packed_rejects_corrupt_blob():
    codec = get_codec("packed")
    ids, lps = realistic_rows(lengths=(4,), k=3)
    cols = codec.encode(ids, lps)
    bad = pa.table({IDS_COLUMN: cols[IDS_COLUMN], LOGPROBS_COLUMN: pa.array([b"\x00" * 5], pa.binary())})
    with pytest.raises(ValueError, match="lengths do not match"):
        codec.decode(bad)
