"""The run directory on a real GCS-compatible server (fake-gcs-server, started once for this module):
the storage layer's guarantees on gs:// (exclusive create, compare-and-swap updates, leases and
their takeover, exclusive shard writes), bad inputs as one message each, and the stage commands on
gs:// against the same on a local path. Every process reaches the server through the standard
STORAGE_EMULATOR_HOST alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gcsserver import FakeGCS  # noqa: E402
from helpers import check_lease_takeover, environment, race  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = FakeGCS(tmp_path_factory.mktemp("fakegcs")).start()
    try:
        with environment(server.env):
            yield server
    finally:
        server.stop()


@pytest.fixture
def where(gcs):
    """A prefix of a new bucket."""
    from pipeline import storage

    return storage.location(f"gs://{gcs.bucket()}/d")


def _raw_put(gcs: FakeGCS, p, data: bytes) -> None:
    """An object written by another client, straight through the JSON API."""
    bucket, key = p.path.split("/", 1)
    req = urllib.request.Request(f"{gcs.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={key}",
                                 data=data, method="POST")
    urllib.request.urlopen(req, timeout=10).close()


# ----------------------------------------------------------------------------- the storage layer on gs://


def test_gs_urls_are_bucket_locations(gcs):
    """gs:// (and fsspec's gcs://) is a bucket location on gcsfs's JSON-API filesystem; a listing
    sees what another client wrote or deleted a moment ago (no listings cache)."""
    from gcsfs.core import GCSFileSystem

    from pipeline import storage

    bucket = gcs.bucket()
    root = storage.location(f"gs://{bucket}/run/")
    assert storage.is_remote(root) and root.protocol == "gs" and str(root) == f"gs://{bucket}/run"
    alias = storage.location(f"gcs://{bucket}/run")
    assert storage.is_remote(alias) and str(alias) == str(root)
    assert type(storage._fs(root)[0]) is GCSFileSystem  # not gcsfs's gRPC-probing ExtendedGcsFileSystem
    storage.check_reachable(root)
    assert storage.names(root / "shards") == [] and not storage.is_dir(root / "shards")
    _raw_put(gcs, root / "shards" / "part-00000.parquet", b"x")
    assert storage.names(root / "shards") == ["part-00000.parquet"] and storage.is_dir(root / "shards")
    storage.remove(root / "shards" / "part-00000.parquet")
    assert storage.names(root / "shards") == [] and not storage.is_file(root / "shards" / "part-00000.parquet")


def test_create_is_exclusive_and_complete(where):
    from pipeline import storage

    wins = race(6, lambda i: storage.create(where / "x.json", f"writer {i}".encode()))
    assert sum(wins) == 1
    assert storage.read_text(where / "x.json") == f"writer {wins.index(True)}"
    assert storage.create(where / "x.json", b"late") is False
    with pytest.raises(ValueError, match="non-empty"):
        storage.create(where / "empty", b"")


def test_update_loses_no_write(where):
    from pipeline import storage

    p = where / "log.jsonl"
    race(6, lambda i: [storage.append_text(p, f"{i}-{j}\n") for j in range(5)])
    lines = storage.read_text(p).splitlines()
    assert sorted(lines) == sorted(f"{i}-{j}" for i in range(6) for j in range(5))
    # `change` returning None leaves the object as it is
    before = storage._get(p)
    assert storage.update(p, lambda old: None) == before[1] and storage._get(p) == before


def test_claims_are_exclusive_and_released(where):
    from pipeline import storage

    lock = where / ".locks" / "part-00000.parquet.lock"
    got = race(5, lambda i: storage.claim(lock))
    held = [c for c in got if c is not None]
    assert len(held) == 1
    assert storage.claim(lock) is None
    assert [lease["name"] for lease in storage.leases(where / ".locks")] == ["part-00000.parquet.lock"]
    held[0].release()
    assert storage.leases(where / ".locks") == [] and not storage.is_file(lock)
    again = storage.claim(lock)
    assert again is not None
    again.release()


def test_write_file_exclusive_second_writer_loses(where):
    """A shard written with exclusive=True is a conditional create: of racing writers exactly one
    lands, and a late one leaves the object (the bytes its record names) as it is."""
    from pipeline import storage

    final = where / "round-0000" / "rollouts" / "part-00001.parquet"
    wins = race(4, lambda i: storage.write_file(final, lambda tmp: tmp.write_bytes(f"shard by {i}".encode()),
                                                 exclusive=True))
    assert sum(wins) == 1
    want = f"shard by {wins.index(True)}".encode()
    assert storage.write_file(final, lambda tmp: tmp.write_bytes(b"successor"), exclusive=True) is False
    assert storage.read_bytes(final) == want
    storage.write_file(final, lambda tmp: tmp.write_bytes(b"replaced"))  # not exclusive: replaces
    assert storage.read_bytes(final) == b"replaced"


def test_write_read_list_and_trees(where, tmp_path, monkeypatch):
    from pipeline import storage

    storage.write_bytes(where / "a" / "part-00001.parquet", b"1")
    storage.write_bytes(where / "a" / "part-00000.parquet", b"0")
    storage.write_text(where / "a" / "sub" / "f", "2")
    assert storage.names(where / "a", "part-*.parquet") == ["part-00000.parquet", "part-00001.parquet"]
    assert storage.subdirs(where / "a") == ["sub"]
    assert storage.read_bytes(where / "a" / "part-00001.parquet") == b"1"
    assert storage.size(where / "a" / "part-00001.parquet") == 1
    assert storage.is_dir(where / "a") and storage.is_dir(where / "a" / "sub") and not storage.is_dir(where / "b")
    assert storage.is_file(where / "a" / "sub" / "f") and not storage.is_file(where / "a" / "sub")
    assert storage.sha256_of(where / "a" / "sub" / "f") == "d4735e3a265e16eee03f59718b9b5d03019c07d8b6c51f90da3a666eec13ab35"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(where / "a" / "missing")
    with pytest.raises(FileNotFoundError):
        storage.size(where / "a" / "missing")
    storage.move(where / "a" / "sub" / "f", where / "a" / "g")
    assert storage.read_text(where / "a" / "g") == "2" and not storage.is_file(where / "a" / "sub" / "f")
    storage.remove_tree(where / "a")
    assert storage.names(where / "a") == [] and not storage.is_dir(where / "a")
    # a model directory: uploaded with its completion file last, read back through the verified cache
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights").write_bytes(os.urandom(1000))
    storage.upload_tree(src, where / "model", last="config.json")
    monkeypatch.setenv("EOPD_CACHE_DIR", str(tmp_path / "cache"))
    got = storage.local_tree(where / "model")
    assert (got / "sub" / "weights").read_bytes() == (src / "sub" / "weights").read_bytes()
    assert storage.local_tree(where / "model") == got  # the same content: the same verified copy
    storage.write_bytes(where / "model" / "sub" / "weights", b"new")  # a new generation: a new copy
    again = storage.local_tree(where / "model")
    assert again != got and (again / "sub" / "weights").read_bytes() == b"new"


def test_lease_renewed_then_taken_over_only_after_expiry(gcs):
    """A lease is renewed while its holder lives (held past several lifetimes). Frozen (SIGSTOP: alive,
    as one cut off from the store), it is taken over only once its last renewal has expired; thawed,
    the holder learns it lost the lease and its release leaves the new holder's lease alone. A
    holder killed on this machine frees it at once (tests/helpers.py: check_lease_takeover)."""
    bucket = gcs.bucket()
    check_lease_takeover(lambda name: f"gs://{bucket}/run/.locks/{name}")


# ----------------------------------------------------------------------------- bad inputs


def _cli(*args, env=None, drop=(), timeout=120):
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**base, "PYTHONPATH": str(REPO), **(env or {})})


def _one_message(res, *needles):
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_bad_buckets_endpoints_and_credentials_are_one_message_each(gcs, tmp_path):
    bucket = gcs.bucket()
    # a bucket that does not exist
    t0 = time.monotonic()
    _one_message(_cli("status", "gs://no-such-bucket-eopd/x"), "gs://no-such-bucket-eopd/x", "does not exist",
                 "gcloud storage buckets create")
    # an emulator that refuses connections: at once, not after gcsfs's 31+ s of retries
    t1 = time.monotonic()
    line = _one_message(_cli("status", f"gs://{bucket}/x", env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}),
                        f"gs://{bucket}/x", "STORAGE_EMULATOR_HOST=http://127.0.0.1:9")
    assert time.monotonic() - t1 < 20, line
    # Google's endpoint without credentials (no emulator, no key file, no gcloud login, not on GCE):
    # the fix, before any request; never a silent anonymous client
    nowhere = {"HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "NO_GCE_CHECK": "true"}
    t2 = time.monotonic()
    _one_message(_cli("status", f"gs://{bucket}/x", env=nowhere,
                      drop=("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")),
                 f"gs://{bucket}/x", "GOOGLE_APPLICATION_CREDENTIALS", "gcloud auth application-default login")
    _one_message(_cli("rollout", f"gs://{bucket}/x", env={**nowhere, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "key.json")},
                      drop=("STORAGE_EMULATOR_HOST",)),
                 f"gs://{bucket}/x", str(tmp_path / "key.json"), "GOOGLE_APPLICATION_CREDENTIALS")
    assert time.monotonic() - t2 < 40 and time.monotonic() - t0 < 90
    # the run directory was not touched by any of them
    from pipeline import storage

    assert storage.names(storage.location(f"gs://{bucket}")) == []
    # a scheme we do not support is still refused, never taken for a local folder
    _one_message(_cli("status", "az://bucket/x"), "az://", "not supported")
    assert not (REPO / "az:").exists()


# ----------------------------------------------------------------------------- a stage on gs://

from conftest import TRAIN, run_cli, write_config  # noqa: E402


def _cfg(toy, path: Path) -> Path:
    return write_config(path, toy, rounds=1,
                        prompts={"path": str(toy.train_prompts), "limit": 12, "prompts_per_round": 8},
                        rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 2,
                                 "vllm": {"enforce_eager": True, "dtype": "float32"}},
                        score_teacher={"top_k": 8}, train=TRAIN)


def _tables(root) -> dict[str, list]:
    """Every round-0 shard's rows (as Python lists), by path relative to the run dir, local or bucket."""
    from pipeline import storage
    from pipeline.shards import read_parquet

    out = {}
    for stage in ("rollouts", "teacher"):
        d = root / "round-0000" / stage
        for name in storage.names(d, "part-*.parquet"):
            out[f"round-0000/{stage}/{name}"] = read_parquet(d / name).to_pylist()
    return out


@pytest.mark.slow
def test_rollout_and_score_teacher_on_gcs_equal_local(gcs, toy, tmp_path):
    """rollout then score-teacher as stage commands on gs://, then status --verify there: the same
    shards, row for row, as the same commands on a local path; no credential in the run directory."""
    from pipeline import storage

    cfg = _cfg(toy, tmp_path / "cfg.yaml")
    local = tmp_path / "run"
    url = f"gs://{gcs.bucket()}/runs/stages"
    # A key file the emulator never reads: its path and contents must not end up in the run directory.
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "private_key": "SECRET-KEY-MATERIAL-7f3a"}))
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(key)}
    for where in (str(local), url):
        for stage in ("rollout", "score-teacher"):
            res = run_cli(stage, where, "--config", cfg, "--round", "0", env=env)
            assert res.returncode == 0, (where, stage, res.stderr[-3000:])
    root = storage.location(url)
    got, want = _tables(root), _tables(storage.location(local))
    assert want and any(k.startswith("round-0000/teacher/") for k in want)
    assert got == want
    res = run_cli("status", url, "--verify")
    assert res.returncode == 0 and "round 0" in res.stdout, res.stdout + res.stderr
    fs, prefix = storage._fs(root)
    objects = fs.find(prefix)
    assert any(o.endswith("round-0000/teacher/manifest.json") for o in objects)
    for name in objects:
        body = fs.cat_file(name)
        assert b"SECRET-KEY-MATERIAL" not in body and str(key).encode() not in body, name
