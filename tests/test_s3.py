"""The run directory on a real S3-compatible server (SeaweedFS, started once for this module): the
storage layer's guarantees (exclusive create, compare-and-swap updates, leases), bad inputs, and
the stages and the persistent `run` on a bucket, killed for real, against the same on a local path."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import SeaweedS3  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A fresh directory: a local one, or a prefix of a new bucket."""
    from pipeline import storage

    if request.param == "local":
        return storage.location(tmp_path / "d")
    server = request.getfixturevalue("s3")
    return storage.location(f"s3://{server.bucket()}/d")


def _race(n: int, fn) -> list:
    out, barrier = [None] * n, threading.Barrier(n)

    def run(i):
        barrier.wait()
        out[i] = fn(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_create_is_exclusive_and_complete(where):
    from pipeline import storage

    wins = _race(6, lambda i: storage.create(where / "x.json", f"writer {i}".encode()))
    assert sum(wins) == 1
    assert storage.read_text(where / "x.json") == f"writer {wins.index(True)}"
    with pytest.raises(ValueError, match="non-empty"):
        storage.create(where / "empty", b"")


def test_update_loses_no_write(where):
    from pipeline import storage

    p = where / "log.jsonl"
    _race(6, lambda i: [storage.append_text(p, f"{i}-{j}\n") for j in range(5)])
    lines = storage.read_text(p).splitlines()
    assert sorted(lines) == sorted(f"{i}-{j}" for i in range(6) for j in range(5))


def test_claims_are_exclusive_and_released(where):
    from pipeline import storage

    got = _race(5, lambda i: storage.claim(where / ".locks" / "part-00000.parquet.lock"))
    held = [c for c in got if c is not None]
    assert len(held) == 1
    assert storage.claim(where / ".locks" / "part-00000.parquet.lock") is None
    held[0].release()
    again = storage.claim(where / ".locks" / "part-00000.parquet.lock")
    assert again is not None
    again.release()


def test_write_bytes_and_listing(where):
    from pipeline import storage

    storage.write_bytes(where / "a" / "part-00001.parquet", b"1")
    storage.write_bytes(where / "a" / "part-00000.parquet", b"0")
    storage.write_bytes(where / "a" / "sub" / "f", b"2")
    assert storage.names(where / "a", "part-*.parquet") == ["part-00000.parquet", "part-00001.parquet"]
    assert storage.subdirs(where / "a") == ["sub"]
    assert storage.read_bytes(where / "a" / "part-00001.parquet") == b"1"
    storage.remove_tree(where / "a")
    assert storage.names(where / "a") == []


_HOLDER = """
import sys, time
from pipeline import storage
c = storage.claim(storage.location(sys.argv[1]))
print("held" if c is not None else "refused", flush=True)
time.sleep(3600)
"""


def test_lease_of_a_killed_worker_expires_and_a_live_one_is_renewed(s3, tmp_path):
    """A lease is renewed while its holder lives (held past several lifetimes) and taken over once
    its holder is killed with SIGKILL and it has expired; never before."""
    from pipeline import storage

    url = f"s3://{s3.bucket()}/run/.locks/part-00003.parquet.lock"
    env = {**os.environ, "EOPD_LEASE_SECONDS": "2", "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.environ["EOPD_LEASE_SECONDS"] = "2"
        time.sleep(5)  # 2.5 lifetimes: alive only through its renewals
        assert storage.claim(storage.location(url)) is None
        lease = storage.leases(storage.location(url).parent)
        assert len(lease) == 1 and lease[0]["worker"]["pid"] == holder.pid and not lease[0]["expired"]
        holder.kill()
        holder.wait()
        t0 = time.monotonic()
        while (c := storage.claim(storage.location(url))) is None:
            assert time.monotonic() - t0 < 15
            time.sleep(0.2)
        waited = time.monotonic() - t0
        assert waited > 0.5  # not at once: its last renewal had to age past 2 s
        c.release()
    finally:
        os.environ.pop("EOPD_LEASE_SECONDS", None)
        if holder.poll() is None:
            holder.kill()


# ----------------------------------------------------------------------------- bad inputs


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _one_message(res, *needles):
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_bad_urls_and_stores_are_one_message_each(s3, tmp_path):
    bucket = s3.bucket()
    # a scheme we do not support is refused, never taken for a local folder "foo:/..."
    res = _cli("status", "foo://bucket/x", env={})
    _one_message(res, "foo://", "not supported")
    assert not (REPO / "foo:").exists()
    _one_message(_cli("rollout", "gs://bucket/x"), "gs://", "not supported")
    # a bucket that does not exist
    t0 = time.monotonic()
    _one_message(_cli("status", "s3://no-such-bucket-eopd/x"), "no-such-bucket-eopd", "does not exist", "create")
    # wrong credentials
    _one_message(_cli("status", f"s3://{bucket}/x", env={"AWS_SECRET_ACCESS_KEY": "wrong"}), f"s3://{bucket}/x",
                 "credentials")
    _one_message(_cli("status", f"s3://{bucket}/x", env={"AWS_ACCESS_KEY_ID": "nobody"}), f"s3://{bucket}/x",
                 "AWS_ACCESS_KEY_ID")
    # an endpoint that refuses connections: one message within a few seconds
    t1 = time.monotonic()
    line = _one_message(_cli("status", f"s3://{bucket}/x", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
                        f"s3://{bucket}/x", "http://127.0.0.1:9", "AWS_ENDPOINT_URL")
    assert time.monotonic() - t1 < 30, line
    assert time.monotonic() - t0 < 120
