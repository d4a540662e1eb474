"""`eopd-pipe status`: one screen after a preemption (who works on what, the last checkpoint, health),
and `--repair` rebuilding lost or corrupted manifests from the shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import CLI_ENV, REPO, kill_group, run_cli, spawn, wait_for_line


def manifests(run: Path) -> dict[str, dict]:
    return {s: json.loads((run / "round-0000" / s / "manifest.json").read_text()) for s in ("rollouts", "teacher")}


def test_shard_in_progress_names_the_worker(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"rounds": 2}))
    stage = run / "round-0000" / "rollouts"
    lease = 3.0  # the heartbeat's expiry: the holder rewrites its lock file every lease / 3
    proc = spawn([sys.executable, str(REPO / "tests" / "fake_stage.py"), str(stage), "3"],
                 env={"EOPD_TEST_PAUSE": "shard_record:1", "EOPD_LEASE_SECONDS": str(lease)})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached shard_record:1", timeout=120)
    res = run_cli("status", run)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "run " in out and "1 of 2 round(s) started" in out and "round 0: in progress" in out
    # Shard 1 is in the writer thread, shard 2 computing meanwhile: both held by the worker.
    assert "rollouts  partial  1/3 shards" in out and "to do" not in out
    assert f"in progress: shard(s) [1, 2] by pid {proc.pid}: python" in out and "fake_stage.py" in out
    assert "teacher   not started" in out and "train     not started" in out
    # Seen from another node of a shared filesystem, whose lock table holds none of this machine's
    # locks: the holder is named by its heartbeat, still fresh after several of its renewals.
    time.sleep(lease)
    out = status_elsewhere(run)
    assert f"in progress: shard(s) [1, 2] by {socket.gethostname()} pid {proc.pid}, heartbeat" in out, out
    kill_group(proc, signal.SIGKILL)  # a lost machine: the OS drops its locks
    out = run_cli("status", run).stdout  # here the holder is seen gone at once
    assert "round 0: not running (interrupted or waiting)" in out and "to do: [1, 2]" in out
    assert "in progress:" not in out
    time.sleep(lease + 0.5)  # elsewhere, once its heartbeat is older than its expiry
    out = status_elsewhere(run)
    assert "to do: [1, 2]" in out and "in progress:" not in out, out


def status_elsewhere(run: Path) -> str:
    """`eopd-pipe status` as another machine on the same filesystem sees the run: in a pid namespace
    and /proc of its own (no lock of this machine's in its /proc/locks, other pids) and another hostname."""
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "sh", "-c",
           'hostname node-b && exec "$@"', "sh", sys.executable, "-m", "pipeline.cli", "status", str(run)]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, **CLI_ENV, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_training_in_progress_then_preempted(killed_checkpoint):
    """A real `train` paused after step 3 (checkpoint every 2 steps): status names the process, the
    last complete checkpoint and the round's health figures; after kill -9, where it resumes.
    (The paused and killed process is conftest's `killed_checkpoint`, shared with the tests that
    resume or corrupt its checkpoint.)"""
    run, out = killed_checkpoint.run, killed_checkpoint.status_paused
    assert "round 0: in progress" in out
    assert f"train     training now (pid {killed_checkpoint.pid}: eopd-pipe train {run}" in out
    assert "step 3 logged; last checkpoint step-000002" in out
    assert "rollouts  complete 2/2 shards" in out and "teacher   complete 2/2 shards" in out
    health = next(l for l in out.splitlines() if l.startswith("  health"))
    assert "KL at start " in health and "at max_tokens " in health and "H(student) " in health and "gate " in health
    out = killed_checkpoint.status_killed
    assert "round 0: not running (interrupted or waiting)" in out
    assert ("train     stopped at step 3 (last checkpoint step-000002): the next `train`/`run` resumes after "
            "step-000002") in out, out


def test_repair_rebuilds_manifests(scored, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(scored[1], run)
    original = manifests(run)
    rollouts, teacher = run / "round-0000" / "rollouts", run / "round-0000" / "teacher"
    (rollouts / "manifest.json").unlink()
    (teacher / "manifest.json").write_text("{\"num_shards\": 2, \"pl")
    out = run_cli("status", run).stdout
    assert "rollouts  2 shard file(s) but no manifest.json: run `eopd-pipe status" in out
    assert "teacher   manifest.json is corrupted: run `eopd-pipe status" in out

    res = run_cli("status", run, "--repair", "--verify")
    assert res.returncode == 0, res.stderr
    assert "repair: round 0 rollouts: manifest.json rebuilt from 2 checked shard(s) (complete)" in res.stdout
    assert "repair: round 0 teacher: manifest.json rebuilt from 2 checked shard(s) (complete)" in res.stdout
    assert "all shards match their manifests" in res.stdout
    assert manifests(run) == original  # the same plan: the stage commands accept it as their own
    assert run_cli("score-teacher", run).returncode == 0  # nothing to redo, no "planned as" refusal

    # A damaged shard with its manifest gone: set aside (kept for a look), the rest recorded.
    victim = teacher / "part-00001.parquet"
    victim.write_bytes(victim.read_bytes()[:-100])
    (teacher / "manifest.json").unlink()
    res = run_cli("status", run, "--repair")
    assert res.returncode == 0, res.stderr
    assert "part-00001.parquet: not readable as Parquet" in res.stdout
    assert "moved to part-00001.parquet.bad" in res.stdout
    assert "teacher: manifest.json rebuilt from 1 checked shard(s) (1 shard(s) still to do)" in res.stdout
    assert "teacher   partial  1/2 shards" in res.stdout and "to do: [1]" in res.stdout
    assert (teacher / "part-00001.parquet.bad").is_file() and not victim.exists()
    assert manifests(run)["teacher"]["plan"] == original["teacher"]["plan"]
