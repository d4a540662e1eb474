"""The run directory on a real S3-compatible server (SeaweedFS, started once for this module): the
storage layer's guarantees (exclusive create, compare-and-swap updates, leases), bad inputs, and
the stage commands (as `--worker I/N` workers at once, too) and `run` (persistent and with
--per-stage-processes) on a bucket, killed for real, against the same on a local path."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import SeaweedS3  # noqa: E402
from helpers import check_lease_takeover, environment, race  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _kill(server: SeaweedS3) -> None:
    """Stop the server at once with SIGKILL, as a store that crashes (what it stored stays on disk: a
    restart serves it). `SeaweedS3.stop()` sends SIGTERM and waits 20 s before it kills: weed's own
    graceful shutdown takes ~25 s (it keeps retrying its stopped filer), so that is 20 s lost per stop."""
    if server.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.proc = None


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    try:
        with environment(server.env):
            yield server
    finally:
        _kill(server)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A fresh directory: a local one, or a prefix of a new bucket."""
    from pipeline import storage

    if request.param == "local":
        return storage.location(tmp_path / "d")
    server = request.getfixturevalue("s3")
    return storage.location(f"s3://{server.bucket()}/d")


def test_create_is_exclusive_and_complete(where):
    from pipeline import storage

    wins = race(6, lambda i: storage.create(where / "x.json", f"writer {i}".encode()))
    assert sum(wins) == 1
    assert storage.read_text(where / "x.json") == f"writer {wins.index(True)}"
    with pytest.raises(ValueError, match="non-empty"):
        storage.create(where / "empty", b"")


def test_update_loses_no_write(where):
    from pipeline import storage

    p = where / "log.jsonl"
    race(6, lambda i: [storage.append_text(p, f"{i}-{j}\n") for j in range(5)])
    lines = storage.read_text(p).splitlines()
    assert sorted(lines) == sorted(f"{i}-{j}" for i in range(6) for j in range(5))


def test_appender_writes_in_the_background_and_loses_no_line(where, monkeypatch):
    """A training's metrics log (storage.Appender): on a bucket its lines wait in this process until
    a flush (or EOPD_APPEND_SECONDS, here longer than the test), then go out in one conditional PUT;
    another writer in between (whose version the appender did not write) loses no line of either."""
    from pipeline import storage

    monkeypatch.setenv(storage.APPEND_ENV, "600")
    p = where / "train" / "metrics.jsonl"
    storage.write_text(p, "old\n")
    with storage.Appender(p, "kept\n") as log:
        assert storage.read_text(p) == "kept\n"  # started as what a resumed run keeps
        log.write("1\n")
        assert storage.read_text(p) == ("kept\n" if storage.is_remote(p) else "kept\n1\n")
        storage.append_text(p, "other\n")
        log.write("2\n")
        log.flush()
        want = ["kept", "other", "1", "2"] if storage.is_remote(p) else ["kept", "1", "other", "2"]
        assert storage.read_text(p).splitlines() == want
        log.write("3\n")
    assert storage.read_text(p).splitlines() == want + ["3"]  # closing flushes


def test_what_this_process_knows_costs_no_request_and_a_stale_version_loses_nothing(s3, monkeypatch):
    """Storage's knowledge of the process (bench/s3_run.py: ~85 requests a bucket round without it,
    ~50 with it): an object it knows final (here a shard it created) is read from memory until this
    process deletes it; an update sends one conditional PUT on the version this process last wrote,
    and when another writer changed the object since, the failed PUT makes it read and apply the
    change again (no line lost), also where the stale version said there was nothing to change."""
    from pipeline import storage

    calls: dict[str, int] = {}
    monkeypatch.setattr(storage, "_CALLS", calls)
    real_fs = storage._fs
    monkeypatch.setattr(storage, "_fs", lambda p: (storage._CountingFS(real_fs(p)[0]), real_fs(p)[1]))
    bucket = s3.bucket()
    root = storage.location(f"s3://{bucket}/run")

    shard = root / "part-00000.parquet"
    assert storage.write_file(shard, lambda tmp: tmp.write_bytes(b"shard"), exclusive=True)
    n = sum(calls.values())
    assert storage.is_file(shard) and storage.read_bytes(shard) == b"shard" and storage.size(shard) == 5
    assert sum(calls.values()) == n
    storage.remove(shard)
    assert not storage.is_file(shard) and sum(calls.values()) > n + 1

    log = root / "log"
    storage.append_text(log, "a\n")
    n = sum(calls.values())
    storage.append_text(log, "b\n")
    assert sum(calls.values()) == n + 1  # the PUT alone
    s3.client().put_object(Bucket=bucket, Key="run/log", Body=b"a\nb\nother\n")  # another writer
    storage.append_text(log, "c\n")
    assert storage.read_text(log) == "a\nb\nother\nc\n"
    s3.client().put_object(Bucket=bucket, Key="run/log", Body=b"reset\n")
    # on the version this process wrote, "c" is there already: nothing to change; on the object's, there is
    storage.update(log, lambda old: None if b"c\n" in old else old + b"c\n")
    assert storage.read_text(log) == "reset\nc\n"


def test_uploaded_student_is_the_cached_copy(s3, tmp_path, monkeypatch):
    """upload_tree(cache=True): the directory just uploaded becomes the verified local copy that
    local_tree gives (the same files, moved: nothing downloaded); a directory whose objects differ
    from it (another writer's) is downloaded as before."""
    from pipeline import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    dest = storage.location(f"s3://{s3.bucket()}/run/round-0000/student")
    src = storage.scratch_dir(dest, "student")
    (src / "model.safetensors").write_bytes(os.urandom(300_000))
    (src / "config.json").write_text("{}")
    inode = (src / "model.safetensors").stat().st_ino
    storage.upload_tree(src, dest, last="config.json", cache=True)
    got = storage.local_tree(dest)
    assert not src.exists() and (got / "model.safetensors").stat().st_ino == inode
    assert storage.read_bytes(dest / "model.safetensors") == (got / "model.safetensors").read_bytes()
    src = storage.scratch_dir(dest, "student")
    (src / "config.json").write_text('{"a": 1}')
    storage.write_bytes(dest / "extra.txt", b"not in the local copy")
    storage.upload_tree(src, dest, last="config.json", cache=True)
    assert src.exists()  # not adopted: the bucket holds more than it
    again = storage.local_tree(dest)
    assert again != got and (again / "extra.txt").read_bytes() == b"not in the local copy"
    assert (again / "config.json").read_text() == '{"a": 1}'


def test_claims_are_exclusive_and_released(where):
    from pipeline import storage

    got = race(5, lambda i: storage.claim(where / ".locks" / "part-00000.parquet.lock"))
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
    # (SeaweedFS's filer may keep an empty "sub/" directory entry; no object is left)
    assert storage.names(where / "a", "part-*") == [] and not storage.is_file(where / "a" / "sub" / "f")


def test_lease_renewed_while_alive_expires_when_frozen_and_is_freed_when_its_holder_dies(s3, tmp_path):
    """A lease is renewed while its holder lives; a frozen holder (SIGSTOP: alive, as one cut off from
    the store) loses it only once it has expired, and its release then leaves the new holder's lease
    alone; a holder killed on this machine (its pid gone) frees it at once, as the OS frees a dead
    process's lock (tests/helpers.py: check_lease_takeover)."""
    from pipeline.identity import holder_gone, worker_identity

    assert not holder_gone(worker_identity())
    assert not holder_gone({**worker_identity(), "boot_id": "another-machine", "pid": 2 ** 22 + 7})
    bucket = s3.bucket()
    check_lease_takeover(lambda name: f"s3://{bucket}/run/.locks/{name}")


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
    from concurrent.futures import ThreadPoolExecutor

    bucket = s3.bucket()
    url = f"s3://{bucket}/x"
    calls = {  # independent of each other: run at once
        "foo": (("status", "foo://bucket/x"), {}),
        "azure": (("rollout", "azure://bucket/x"), None),  # gs:// is supported: test_gcs.py
        "no bucket": (("status", "s3://no-such-bucket-eopd/x"), None),
        "secret": (("status", url), {"AWS_SECRET_ACCESS_KEY": "wrong"}),
        "key id": (("status", url), {"AWS_ACCESS_KEY_ID": "nobody"}),
        "refused": (("status", url), {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
    }

    def timed(call):
        t = time.monotonic()
        return _cli(*call[0], env=call[1]), time.monotonic() - t
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(calls)) as pool:
        got = dict(zip(calls, pool.map(timed, calls.values())))
    # a scheme we do not support is refused, never taken for a local folder "foo:/..."
    _one_message(got["foo"][0], "foo://", "not supported")
    assert not (REPO / "foo:").exists()
    _one_message(got["azure"][0], "azure://", "not supported")
    # a bucket that does not exist
    _one_message(got["no bucket"][0], "no-such-bucket-eopd", "does not exist", "create")
    # wrong credentials
    _one_message(got["secret"][0], url, "credentials")
    _one_message(got["key id"][0], url, "AWS_ACCESS_KEY_ID")
    # an endpoint that refuses connections: one message within a few seconds
    line = _one_message(got["refused"][0], url, "http://127.0.0.1:9", "AWS_ENDPOINT_URL")
    assert got["refused"][1] < 30, line
    assert time.monotonic() - t0 < 120


# ----------------------------------------------------------------------------- the stages on a bucket

from conftest import TRAIN, kill_group, rest_of_stderr, run_cli, spawn_cli, wait_for_line, write_config  # noqa: E402


def _cfg(toy, path: Path, rounds: int = 1) -> Path:
    return write_config(path, toy, rounds=rounds,
                        prompts={"path": str(toy.train_prompts), "limit": 12, "prompts_per_round": 8},
                        rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 2,
                                 "vllm": {"enforce_eager": True, "dtype": "float32"}},
                        score_teacher={"top_k": 8}, train={**TRAIN, "checkpoint_every": 1},
                        eval={"prompts": {"path": str(toy.eval_prompts), "limit": 4}, "verifier": "toy", "samples": 2,
                              "max_tokens": 12, "models": []})


def _tables(root) -> dict[str, list]:
    """Every shard's rows (as Python lists), by path relative to the run dir, local or bucket."""
    from pipeline import storage
    from pipeline.shards import read_parquet

    out = {}
    for r in range(8):
        for stage in ("rollouts", "teacher"):
            d = root / f"round-{r:04d}" / stage
            for name in storage.names(d, "part-*.parquet"):
                out[f"round-{r:04d}/{stage}/{name}"] = read_parquet(d / name).to_pylist()
    return out


def _manifests(root) -> dict[str, dict]:
    from pipeline import storage

    out = {}
    for r in range(8):
        for stage in ("rollouts", "teacher"):
            p = root / f"round-{r:04d}" / stage / "manifest.json"
            if storage.is_file(p):
                data = json.loads(storage.read_text(p))
                data["shards"] = {n: {k: v for k, v in rec.items() if k != "tokens"} for n, rec in data["shards"].items()}
                out[f"round-{r:04d}/{stage}"] = data
    return out


def _students(root) -> dict[str, bytes]:
    from pipeline import storage

    return {f"round-{r:04d}": storage.read_bytes(root / f"round-{r:04d}" / "student" / "model.safetensors")
            for r in range(8) if storage.is_file(root / f"round-{r:04d}" / "student" / "model.safetensors")}


def _losses(root) -> dict[str, list]:
    from pipeline import storage

    out = {}
    for r in range(8):
        p = root / f"round-{r:04d}" / "train" / "metrics.jsonl"
        if storage.is_file(p):
            out[f"round-{r:04d}"] = [(m["global_step"], m["loss"]) for m in map(json.loads, storage.read_text(p).splitlines())]
    return out


def _same_run(a, b) -> None:
    assert _manifests(a) == _manifests(b)
    assert _tables(a) == _tables(b)
    assert _students(a) == _students(b)
    assert _losses(a) == _losses(b)


@pytest.fixture(scope="module")
def local_ref(toy, tmp_path_factory):
    """The persistent `run` of 3 rounds on a local path: what every bucket run must equal."""
    tmp = tmp_path_factory.mktemp("s3ref")
    cfg = _cfg(toy, tmp / "cfg.yaml", rounds=3)
    res = run_cli("run", tmp / "run", "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    from pipeline import storage

    return cfg, storage.location(tmp / "run")


def _two_workers(stage: str, url: str, cfg) -> None:
    """`STAGE URL --worker 0/2` and `--worker 1/2`, started together (each starts its own engine).
    Worker 1 is frozen (SIGSTOP) once it has computed its first shard, before writing it, and
    worker 0 must then end on its own: it does shards 0 and 2 and leaves the stage incomplete. A
    worker 0 that ignored --worker would also do the shards worker 1 has not claimed, and wait for
    those it holds until their leases expire (60 s) to redo them: more than 2 shards, the stage
    complete. Then worker 1 thaws, does shards 1 and 3 and completes the stage."""
    args = (stage, url, "--config", cfg, "--round", "0")
    # The pause outlasts the moment it takes this process to read its line and freeze worker 1 (were
    # the freeze late, worker 1 would also have to finish shard 3 before worker 0 ends to fail the
    # check); the freeze counts towards it (monotonic clock), so little of it is left after the thaw.
    w1 = spawn_cli(*args, "--worker", "1/2", env={"EOPD_TEST_PAUSE": "shard_compute:1:5"})
    w0 = spawn_cli(*args, "--worker", "0/2")
    try:
        wait_for_line(w1, "EOPD_TEST_PAUSE reached shard_compute:1")
        os.killpg(w1.pid, signal.SIGSTOP)
        out0, err0 = w0.communicate(timeout=900)
        assert w0.returncode == 0, (stage, err0[-3000:])
        assert f"{stage}: 2 shard(s) done now, 0 before" in out0 and "stage incomplete" in out0, (stage, out0)
        os.killpg(w1.pid, signal.SIGCONT)
        assert w1.wait(timeout=900) == 0, (stage, rest_of_stderr(w1)[-3000:])
        out1 = w1.stdout.read()
        assert f"{stage}: 2 shard(s) done now, 0 before" in out1 and "stage complete" in out1, (stage, out1)
    finally:
        for p in (w0, w1):
            if p.poll() is None:
                kill_group(p, signal.SIGKILL)


@pytest.mark.slow
def test_stage_commands_and_tools_on_a_bucket(s3, local_ref):
    """rollout and score-teacher as two workers each (`--worker 0/2` and `1/2` at once), train, then
    status --verify, eval, report, compare on the bucket: shards, students and losses equal to the
    local persistent run's round 0, and no credential anywhere in the run directory."""
    from pipeline import storage

    cfg, ref = local_ref
    url = f"s3://{s3.bucket()}/runs/stages"
    for stage in ("rollout", "score-teacher"):
        _two_workers(stage, url, cfg)
    res = run_cli("train", url, "--config", cfg, "--round", "0")
    assert res.returncode == 0, ("train", res.stderr[-3000:])
    root = storage.location(url)
    got, want = _tables(root), {k: v for k, v in _tables(ref).items() if k.startswith("round-0000")}
    assert got == want
    assert _students(root)["round-0000"] == _students(ref)["round-0000"]
    assert _losses(root)["round-0000"] == _losses(ref)["round-0000"]
    # eval (an engine start) runs beside status, report and compare: it reads only the round-0 student
    # and writes only eval/ and its log, and holds no lease (status --repair below counts them).
    evaluation = spawn_cli("eval", url, "--model", "round-0")
    res = run_cli("status", url, "--verify")
    assert res.returncode == 0 and "round 0" in res.stdout, res.stdout + res.stderr
    # --repair on a bucket: refused while a live lease is held there, then rebuilds a lost manifest as it was.
    rollouts = root / "round-0000" / "rollouts"
    before = storage.read_text(rollouts / "manifest.json")
    storage.remove(rollouts / "manifest.json")
    lease = storage.claim(rollouts / ".locks" / "part-00000.parquet.lock")  # this test process, alive
    try:
        res = run_cli("status", url, "--repair")
        assert res.returncode == 2 and "before `status --repair`" in res.stderr, res.stdout + res.stderr
        assert f"pid {os.getpid()}" in res.stderr, res.stderr
    finally:
        lease.release()
    res = run_cli("status", url, "--repair", "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "repair: round 0 rollouts: manifest.json rebuilt from" in res.stdout, res.stdout
    assert json.loads(storage.read_text(rollouts / "manifest.json")) == json.loads(before)
    res = run_cli("report", url)
    assert res.returncode == 0, res.stderr[-3000:]
    assert storage.names(root / "report", "*.png")
    res = run_cli("compare", url, str(ref.parent / "run"), "--out", str(ref.parent / "cmp"))
    assert res.returncode == 0, res.stderr[-3000:]
    out, err = evaluation.communicate(timeout=900)
    assert evaluation.returncode == 0, err[-3000:]
    assert storage.is_file(root / "eval" / "round-0.json")
    assert storage.is_file(root / "logs" / "train.log")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    fs, prefix = root.fs, root.path
    for key in fs.find(prefix):
        assert secret not in fs.cat_file(key), key


@pytest.mark.slow
def test_workers_on_a_bucket_one_frozen_mid_shard_all_finish(s3, local_ref, toy):
    """Three rollout workers on one bucket at once. One freezes (SIGSTOP, as a worker cut off from
    the store: alive, so nothing tells the others it is gone) holding shards 1 and 2 (the second
    claimed ahead, see ShardWorker), with shard 1 computed but not yet written. The others finish
    the rest, wait for its leases to expire and redo its shards. Then it thaws and finishes too:
    both wrote shards 1 and 2, and each is recorded once, with one object whose bytes equal the
    local run's. (A holder seen dead on the same machine is taken over at once: the lease test
    above and the persistent run's kill test.)"""
    from pipeline import storage

    cfg, ref = local_ref
    url = f"s3://{s3.bucket()}/runs/workers"
    env = {"EOPD_LEASE_SECONDS": "4"}
    # The victim's own leases live 20 s (their expiry is written in them), so the status screen below
    # sees them live on a slow machine; the pause ends 30 s after it began, long over once it thaws.
    victim = spawn_cli("rollout", url, "--config", cfg,
                       env={"EOPD_LEASE_SECONDS": "20", "EOPD_TEST_PAUSE": "shard_compute:1:30"})
    wait_for_line(victim, "EOPD_TEST_PAUSE reached shard_compute:1")
    os.killpg(victim.pid, signal.SIGSTOP)
    try:
        res = run_cli("status", url, "--no-health")  # the status screen names the holder and its lease's age
        assert res.returncode == 0, res.stderr[-2000:]
        line = next(line for line in res.stdout.splitlines() if line.lstrip().startswith("rollouts"))
        held = re.search(r"shard\(s\) \[([\d, ]+)\] by (\S+) pid (\d+), lease \d+ s old", line)
        assert held, res.stdout
        assert 1 in {int(x) for x in held.group(1).split(",")}, res.stdout
        assert (held.group(2), int(held.group(3))) == (socket.gethostname(), victim.pid), res.stdout
        others = [spawn_cli("rollout", url, "--config", cfg, env=env) for _ in range(2)]
        for p in others:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-3000:]
        root = storage.location(url)
        fs, stage = root.fs, (root / "round-0000" / "rollouts").path
        written = {i: fs.info(f"{stage}/part-0000{i}.parquet", refresh=True)["LastModified"] for i in (1, 2)}
        time.sleep(1.5)  # LastModified has 1 s resolution: a replaced object would show a later one
        os.killpg(victim.pid, signal.SIGCONT)
        assert victim.wait(timeout=900) == 0, rest_of_stderr(victim)[-3000:]
    finally:
        if victim.poll() is None:
            kill_group(victim, signal.SIGKILL)
    # The thawed worker wrote its shards with a conditional create: the successors' objects stand.
    assert {i: fs.info(f"{stage}/part-0000{i}.parquet", refresh=True)["LastModified"] for i in (1, 2)} == written
    m = json.loads(storage.read_text(root / "round-0000" / "rollouts" / "manifest.json"))
    assert m["complete"] and len(m["shards"]) == m["num_shards"]
    want = {k: v for k, v in _tables(ref).items() if k.startswith("round-0000/rollouts")}
    assert _tables(root) == want
    res = run_cli("status", url, "--verify", "--no-health")  # the records' checksums name the objects' bytes
    assert res.returncode == 0, res.stdout + res.stderr
    assert not storage.leases(root / "round-0000" / "rollouts" / ".locks")  # all released


@pytest.mark.slow
def test_object_server_stopped_mid_stage_then_resumed(s3, local_ref):
    """The object store goes away while a stage runs: one message naming the URL and the fix, no
    traceback, nothing half-recorded; once it is back the same command finishes, equal to local."""
    from pipeline import storage

    cfg, ref = local_ref
    url = f"s3://{s3.bucket()}/runs/outage"
    # The pause outlasts the moment it takes this process to read its line and kill the server.
    proc = spawn_cli("rollout", url, "--config", cfg, env={"EOPD_TEST_PAUSE": "shard_compute:1:5"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached shard_compute:1")
    _kill(s3)
    try:
        proc.wait(timeout=600)
        err = rest_of_stderr(proc)  # wait_for_line's reader holds the pipe
        seen = run_cli("status", url, "--no-health")  # the screen too: never "not started" for a store away
    finally:
        s3.start()
    _one_message(seen, url, "AWS_ENDPOINT_URL")
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and url in lines[0] and "AWS_ENDPOINT_URL" in lines[0], err[-2000:]
    root = storage.location(url)
    m = json.loads(storage.read_text(root / "round-0000" / "rollouts" / "manifest.json"))
    assert set(m["shards"]) == {"part-00000.parquet"}  # shard 1 was never recorded (nor visible)
    assert storage.names(root / "round-0000" / "rollouts", "part-*.parquet") == ["part-00000.parquet"]
    res = run_cli("rollout", url, "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    want = {k: v for k, v in _tables(ref).items() if k.startswith("round-0000/rollouts")}
    assert _tables(root) == want


@pytest.mark.slow
def test_run_on_a_bucket_persistent_and_per_stage_processes_killed_at_random(s3, local_ref):
    """`run` on s3:// over 3 rounds, its process group killed with SIGKILL at random moments (drawn
    by progress: shards and students written) and restarted until done, alternately as the
    persistent run and with --per-stage-processes (the last call, which finishes the run, with
    it): rows, students and per-step losses equal to the uninterrupted local persistent run.
    With --per-stage-processes every stage is a process of its own: no stage is recorded by the
    `run` process itself, and stage processes wrote rollouts, teacher shards and students."""
    from pipeline import storage

    cfg, ref = local_ref
    url = f"s3://{s3.bucket()}/runs/persistent"
    root = storage.location(url)
    rng = random.Random(21)

    def outputs() -> dict[str, int]:
        """Shards and students written (a student counts once its config.json, written last, is there)."""
        rounds = [root / f"round-{r:04d}" for r in range(3)]
        return {**{s: sum(len(storage.names(d / s, "part-*.parquet")) for d in rounds) for s in ("rollouts", "teacher")},
                "student": sum(storage.is_file(d / "student" / "config.json") for d in rounds)}

    total = sum(1 for _ in _tables(ref)) + 3
    kills, runs, grown = 0, {}, set()  # grown: what the per-stage calls' stage processes wrote
    per_stage = ("--per-stage-processes",)
    # (7, 15, 24) of 27 outputs: the per-stage call runs from round 0's teacher shards into round 1's,
    # so its stage processes write round 1's rollouts and teacher shards; the last call trains round 2.
    for n, target in enumerate(sorted(rng.sample(range(2, total - 1), 3))):
        mode = "per-stage" if n % 2 else "persistent"
        before = outputs()
        proc = spawn_cli("run", url, "--config", cfg, *(per_stage if mode == "per-stage" else ()))
        runs[proc.pid] = mode
        deadline = time.monotonic() + 900
        while sum(outputs().values()) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.3)
        if proc.poll() is None:
            kill_group(proc, signal.SIGKILL)
            kills += 1
        else:
            assert proc.returncode == 0, (mode, proc.stderr.read()[-3000:])
        if mode == "per-stage":
            grown |= {k for k, v in outputs().items() if v > before[k]}
    before = outputs()
    last = spawn_cli("run", url, "--config", cfg, *per_stage)
    runs[last.pid] = "per-stage"
    out, err = last.communicate(timeout=1800)
    assert last.returncode == 0, err[-3000:]
    grown |= {k for k, v in outputs().items() if v > before[k]}
    assert kills >= 2
    _same_run(root, ref)
    # Who recorded each finished stage (ROUND/timings.jsonl: the pid of the process that ran it).
    done = [json.loads(line) for r in range(3)
            for line in storage.read_text(root / f"round-{r:04d}" / "timings.jsonl").splitlines() if line]
    assert not [t for t in done if runs.get(t["pid"]) == "per-stage"], done  # never in the `run` process
    assert {t["stage"] for t in done if t["pid"] not in runs} >= {"rollouts", "train"}, done
    assert grown == {"rollouts", "teacher", "student"}, grown


@pytest.mark.slow
def test_run_on_a_bucket_killed_after_a_checkpoint_keeps_its_metrics(s3, local_ref, tmp_path, monkeypatch):
    """The persistent `run` on s3:// writes metrics.jsonl in the background (storage.Appender; here
    only at flushes); killed with SIGKILL after round 0's step-1 checkpoint, its resumed run keeps the
    lines up to that checkpoint: one line per step, rows, students and losses equal to the local
    run. Each student it wrote became its local cached copy (the next round samples from it without
    downloading it): the last round's student too, which nothing reads."""
    from pipeline import storage

    cfg, ref = local_ref
    url = f"s3://{s3.bucket()}/runs/metrics"
    root = storage.location(url)
    cache = tmp_path / "cache"
    env = {storage.APPEND_ENV: "600", storage.CACHE_ENV: str(cache)}
    monkeypatch.setenv(storage.CACHE_ENV, str(cache))  # this process's local_tree looks there too
    proc = spawn_cli("run", url, "--config", cfg, env={**env, "EOPD_TEST_PAUSE": "train_step:2"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached train_step:2")
    kill_group(proc, signal.SIGKILL)
    checkpoints = root / "round-0000" / "train" / "checkpoints"
    assert storage.is_file(checkpoints / "step-000001" / "COMPLETE")
    # Round 0's last checkpoint uploads in a thread beside the student, whose config.json waits for
    # it; meanwhile round 1 samples from the student's local copy but records nothing. Killed there
    # (the checkpoint held back, the student's other files up, round 1 begun), neither is complete,
    # round 1 has no shard, and the resumed run redoes the steps after step 1 to the same student.
    last = len(storage.read_text(ref / "round-0000" / "train" / "metrics.jsonl").splitlines())
    proc = spawn_cli("run", url, "--config", cfg, env={**env, "EOPD_TEST_PAUSE": f"checkpoint_upload:{last}"})
    wait_for_line(proc, f"EOPD_TEST_PAUSE reached checkpoint_upload:{last}")
    student = root / "round-0000" / "student"
    deadline = time.monotonic() + 300
    while not storage.is_file(student / "model.safetensors"):
        assert time.monotonic() < deadline and proc.poll() is None, "the student's files were not uploaded"
        time.sleep(0.2)
    rollouts = root / "round-0001" / "rollouts"
    while not storage.is_file(rollouts / "manifest.json"):  # round 1's rollout stage has begun
        assert time.monotonic() < deadline and proc.poll() is None, "round 1 did not start beside the upload"
        time.sleep(0.2)
    time.sleep(3.0)  # a toy shard is sampled in well under this: were it not held back, it would be recorded
    kill_group(proc, signal.SIGKILL)
    assert not storage.is_file(student / "config.json")
    assert not storage.is_file(checkpoints / f"step-{last:06d}" / "COMPLETE")
    assert storage.names(rollouts, "part-*.parquet") == []
    res = run_cli("run", url, "--config", cfg, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    _same_run(root, ref)
    for r in range(3):
        student = root / f"round-{r:04d}" / "student"
        copy = storage.local_tree(student)
        assert copy.parent == cache / "objects"
        assert (copy / "model.safetensors").read_bytes() == storage.read_bytes(student / "model.safetensors")
    assert len(list((cache / "objects").iterdir())) == 3 + 1  # the students, and the checkpoint resumed from


@pytest.mark.slow
def test_models_read_from_a_bucket(s3, local_ref, toy, tmp_path):
    """student.path and teacher.path as s3:// URLs: each model is downloaded once into the local
    cache (verified), and the rows equal those made from the local copies."""
    import yaml

    from pipeline import storage

    cfg, ref = local_ref
    bucket = s3.bucket()
    fs = storage.location(f"s3://{bucket}").fs
    for name, src in (("student", toy.student), ("teacher", toy.teacher)):
        fs.put(str(src), f"{bucket}/models/{name}", recursive=True)
    data = yaml.safe_load(Path(cfg).read_text())
    data["student"]["path"] = f"s3://{bucket}/models/student"
    data["teacher"]["path"] = f"s3://{bucket}/models/teacher"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    cache = tmp_path / "cache"
    env = {"EOPD_CACHE_DIR": str(cache)}
    for stage in ("rollout", "score-teacher"):
        res = run_cli(stage, tmp_path / "run", "--config", tmp_path / "cfg.yaml", env=env)
        assert res.returncode == 0, (stage, res.stderr[-3000:])
    assert len(list((cache / "objects").iterdir())) == 2  # one verified copy per model, reused by both stages
    got = _tables(storage.location(tmp_path / "run"))
    assert got == {k: v for k, v in _tables(ref).items() if k.startswith("round-0000/")}
