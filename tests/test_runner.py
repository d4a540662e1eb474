"""The sharded-stage runner under real processes: kill -9, SIGTERM, concurrent workers, checksums."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_group, rest_of_stderr, spawn, wait_for_line
from pipeline.errors import UserError
from pipeline.shards import iter_stage, sha256_file

NUM_SHARDS = 6
SCRIPT = str(Path(__file__).with_name("fake_stage.py"))


def start(stage_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return spawn([sys.executable, SCRIPT, str(stage_dir), str(NUM_SHARDS), *extra], env)


def done_now(out: str) -> list[int]:
    return [int(x) for x in next(l for l in out.splitlines() if l.startswith("DONE_NOW")).split()[1:]]


def events(out: str) -> list[tuple[str, int]]:
    return [(l.split()[1], int(l.split()[2])) for l in out.splitlines() if l.startswith("EVENT")]


def finish(stage_dir: Path, *extra: str, env: dict | None = None) -> list[int]:
    proc = start(stage_dir, *extra, env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return done_now(out)


OVERLAP = {"FAKE_OVERLAP": "1"}  # a worker that starts the next shard before finishing the current one


def shard_digests(stage_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(stage_dir.glob("part-*.parquet"))}


def leftovers(stage_dir: Path) -> list[str]:
    return [p.name for p in stage_dir.iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    stage = tmp_path_factory.mktemp("ref") / "stage"
    assert finish(stage) == list(range(NUM_SHARDS))
    return shard_digests(stage)


@pytest.mark.parametrize("overlap", [False, True], ids=["one-at-a-time", "overlap"])
@pytest.mark.parametrize("point", ["shard_compute", "shard_rename", "shard_record"])
def test_kill9_then_resume_gives_identical_shards(tmp_path, reference, point, overlap):
    stage = tmp_path / "stage"
    proc = start(stage, env={"EOPD_TEST_PAUSE": f"{point}:2", **(OVERLAP if overlap else {})})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")
    if point == "shard_rename":
        assert any(".tmp" in p.name for p in stage.iterdir()), "the half-written shard should exist at this point"
    assert kill_group(proc, signal.SIGKILL) == -signal.SIGKILL
    recorded = json.loads((stage / "manifest.json").read_text())["shards"]
    assert sorted(recorded) == ["part-00000.parquet", "part-00001.parquet"]

    redone = finish(stage, env=OVERLAP if overlap else None)
    # Only the unfinished shards are done again (a shard renamed but not recorded is adopted, not recomputed).
    assert redone == [2, 3, 4, 5]
    assert shard_digests(stage) == reference
    assert leftovers(stage) == []
    assert json.loads((stage / "manifest.json").read_text())["complete"] is True


def test_sigterm_abandons_current_shard_and_exits_nonzero(tmp_path, reference):
    stage = tmp_path / "stage"
    proc = start(stage, env={"EOPD_TEST_PAUSE": "shard_compute:1"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")
    assert kill_group(proc, signal.SIGTERM) == 143
    assert "preempted" in rest_of_stderr(proc)
    assert sorted(json.loads((stage / "manifest.json").read_text())["shards"]) == ["part-00000.parquet"]
    assert leftovers(stage) == []
    assert finish(stage) == [1, 2, 3, 4, 5]
    assert shard_digests(stage) == reference


def test_sigterm_during_bookkeeping_finishes_the_shard_first(tmp_path, reference):
    stage = tmp_path / "stage"
    proc = start(stage, env={"EOPD_TEST_PAUSE": "shard_rename:1:3"})  # 3 s between write and rename
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")
    # Held until shard 1 is renamed and recorded, then the process stops with the preemption code.
    assert kill_group(proc, signal.SIGTERM) == 143
    assert sorted(json.loads((stage / "manifest.json").read_text())["shards"]) == ["part-00000.parquet", "part-00001.parquet"]
    assert leftovers(stage) == []
    assert finish(stage) == [2, 3, 4, 5]
    assert shard_digests(stage) == reference


def test_writer_thread_builds_and_writes_beside_the_next_shard(tmp_path, reference):
    """Shard i's table is built and written while shard i + 1 is computed; results unchanged."""
    stage = tmp_path / "stage"
    proc = start(stage, env={"FAKE_BUILD_SECONDS": "0.5"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    ev = events(out)
    # One at a time, shard 1 would start after shard 0's 0.5 s build; overlapped, during it.
    assert ev.index(("finish", 1)) < ev.index(("build-end", 0))
    assert done_now(out) == list(range(NUM_SHARDS))
    assert shard_digests(stage) == reference


def test_writer_error_stops_the_stage_and_keeps_finished_shards(tmp_path, reference):
    stage = tmp_path / "stage"
    proc = start(stage, env={"FAKE_BUILD_SECONDS": "0", "FAKE_FAIL_BUILD": "2"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "could not write" in err and "simulated write failure in shard 2" in err
    assert "Traceback" not in err
    assert sorted(json.loads((stage / "manifest.json").read_text())["shards"]) == ["part-00000.parquet", "part-00001.parquet"]
    assert leftovers(stage) == []
    assert finish(stage, env={"FAKE_BUILD_SECONDS": "0"}) == [2, 3, 4, 5]
    assert shard_digests(stage) == reference


@pytest.mark.parametrize("overlap", [False, True], ids=["one-at-a-time", "overlap"])
def test_two_workers_by_lock_files_do_every_shard_once(tmp_path, reference, overlap):
    stage = tmp_path / "stage"
    env = {"FAKE_SHARD_SECONDS": "0.3", **(OVERLAP if overlap else {})}
    procs = [start(stage, env=env) for _ in range(2)]
    done, started = [], []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        done.append(done_now(out))
        started += [i for kind, i in events(out) if kind == "start"]
    assert sorted(done[0] + done[1]) == list(range(NUM_SHARDS))  # each exactly once
    if overlap:  # a shard is started only by the worker that holds its claim
        assert sorted(started) == list(range(NUM_SHARDS))
    assert shard_digests(stage) == reference


def test_overlap_starts_the_next_shard_before_finishing_the_current(tmp_path, reference):
    stage = tmp_path / "stage"
    proc = start(stage, env=OVERLAP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    expected = [("start", 0), ("start", 1), ("finish", 0)]
    for i in range(1, NUM_SHARDS - 1):
        expected += [("start", i + 1), ("finish", i)]
    assert events(out) == expected + [("finish", NUM_SHARDS - 1)]
    assert shard_digests(stage) == reference


def test_static_worker_split(tmp_path, reference):
    stage = tmp_path / "stage"
    assert finish(stage, "0/2") == [0, 2, 4]
    assert json.loads((stage / "manifest.json").read_text())["complete"] is False
    assert finish(stage, "1/2") == [1, 3, 5]
    assert shard_digests(stage) == reference


def test_bad_worker_spec_is_a_clear_error(tmp_path):
    proc = start(tmp_path / "stage", "3/2")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--worker '3/2'" in err and "Traceback" not in err


def test_corrupted_shard_is_named_and_redone_after_deletion(tmp_path, reference):
    stage = tmp_path / "stage"
    finish(stage)
    victim = stage / "part-00003.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match="part-00003.parquet is corrupted"):
        list(iter_stage(stage, "fake shards", "rerun"))
    victim.unlink()
    assert finish(stage) == [3]
    assert shard_digests(stage) == reference


def test_stale_tmp_cleanup_spares_live_writers(tmp_path):
    """remove_stale_tmp removes the temporary files of writers that are gone (a dead pid here, or a
    file of another machine untouched for an hour) and never one a live writer is still filling:
    two Slurm array tasks that start at once both write the prompt cache."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from pipeline import storage

    final = tmp_path / "prompts.parquet"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    files = {
        "live": tmp_path / f".prompts.parquet.tmp-{host}-{os.getpid()}-1",
        "dead": tmp_path / f".prompts.parquet.tmp-{host}-{dead.pid}-1",
        "foreign_fresh": tmp_path / ".prompts.parquet.tmp-other-host-4242-1",
        "foreign_old": tmp_path / ".prompts.parquet.tmp-other-host-4243-1",
        "old_format": tmp_path / ".prompts.parquet.tmp-4244-1",
    }
    for p in files.values():
        p.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(files["foreign_old"], (old, old))
    storage.remove_stale_tmp(final)
    assert {k for k, p in files.items() if p.exists()} == {"live", "foreign_fresh"}
    assert storage.tmp_name(final).name.startswith(f".prompts.parquet.tmp-{host}-{os.getpid()}-")
