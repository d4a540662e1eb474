"""`eopd-pipe launch ray` on a real Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head
with no CPUs and two one-CPU worker nodes, started once for this module and shut down at its end):
a rollout stage on two long-lived actors, the node of the actor holding shard 1 removed in the
middle of that shard and a new node added; Ray rebuilds the actor there and retries the shard.
Every shard is recorded once and the stage equals the plain `eopd-pipe rollout` on this machine;
then score-teacher on the same actors' cluster, again equal to the local stage."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import CLI_ENV, REPO, TRAIN, run_cli, spawn_cli, write_config

from pipeline.shards import sha256_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Nodes are processes of this test: they inherit the environment the actors need.
    saved = dict(os.environ)
    os.environ.update({**CLI_ENV, "PYTHONPATH": str(REPO)})
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no actor
    try:
        c.add_node(num_cpus=1)
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()  # stops every node's processes (actors with them)
        os.environ.clear()
        os.environ.update(saved)


def holder_pid(lock: Path) -> int | None:
    """The pid holding an flock on `lock` (from /proc/locks), if any."""
    ino = os.stat(lock).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if "->" in parts:  # a process waiting for the lock, not holding it
            continue
        pid, dev_ino = parts[4], parts[5]
        if int(dev_ino.split(":")[2]) == ino:
            return int(pid)
    return None


def node_of(cluster, pid: int):
    """The cluster node whose raylet started process `pid` (walking up its parents)."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in cluster.worker_nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        pid = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("PPid:")).split()[1])
    raise AssertionError("the shard's holder is no worker node's process")


def digests(stage_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(stage_dir.glob("part-*.parquet"))}


def wait_for(cond, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, f"timeout waiting for {what}"
        time.sleep(0.2)
    return value


def test_shard_stages_on_actors_survive_a_lost_node_and_equal_the_local_stages(cluster, toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", toy,
                       prompts={"path": str(toy.train_prompts), "limit": 12, "prompts_per_round": 8},
                       rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 2,
                                "vllm": {"enforce_eager": True, "dtype": "float32"}},
                       score_teacher={"top_k": 8})
    ref = tmp_path / "ref"
    for stage in ("rollout", "score-teacher"):
        res = run_cli(stage, ref, "--config", cfg)
        assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "run"
    # The actor doing rollout shard 1 pauses after computing it, before writing it.
    driver = spawn_cli("launch", "ray", "rollout", run, "--config", cfg, "--workers", "2", "--address", cluster.address,
                       env={"EOPD_TEST_PAUSE": "rollouts.shard_compute:1:30"})
    lock = run / "round-0000" / "rollouts" / ".locks" / "part-00001.parquet.lock"
    pid = wait_for(lambda: lock.is_file() and holder_pid(lock), "an actor claiming shard 1", 600)
    lost = node_of(cluster, pid)
    manifest = run / "round-0000" / "rollouts" / "manifest.json"
    assert "part-00001.parquet" not in json.loads(manifest.read_text())["shards"]
    cluster.remove_node(lost)  # its actor and the shard half-done go with it
    cluster.add_node(num_cpus=1)
    out, err = driver.communicate(timeout=900)
    assert driver.returncode == 0, err[-3000:]
    assert "r0000-rollout: 4 shard(s) done now" in out, out

    assert digests(run / "round-0000" / "rollouts") == digests(ref / "round-0000" / "rollouts")
    assert json.loads(manifest.read_text()) == json.loads((ref / "round-0000" / "rollouts" / "manifest.json").read_text())
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]

    res = run_cli("launch", "ray", "score-teacher", run, "--workers", "2", "--address", cluster.address)
    assert res.returncode == 0, res.stderr[-3000:]
    assert digests(run / "round-0000" / "teacher") == digests(ref / "round-0000" / "teacher")
    assert (json.loads((run / "round-0000" / "teacher" / "manifest.json").read_text())
            == json.loads((ref / "round-0000" / "teacher" / "manifest.json").read_text()))
    # Done by the records: launched again, nothing is handed out.
    again = run_cli("launch", "ray", "score-teacher", run, "--workers", "2", "--address", cluster.address)
    assert again.returncode == 0 and "already done" in again.stdout, again.stderr[-3000:]


def losses(run: Path) -> list[tuple]:
    return [(m["round"], m["step"], m["loss"]) for p in sorted(run.glob("round-*/train/metrics.jsonl"))
            for m in map(json.loads, p.read_text().splitlines())]


def test_persistent_run_on_ray_equals_the_local_persistent_run(cluster, toy, tmp_path):
    """`launch ray run`: the rollout and teacher pools (2 actors each) and the trainer actor live for
    the whole run, the rollout engines taking round 0's student in place, then eval and report as a
    task; 2 rounds equal to `eopd-pipe run` on this machine, shard for shard and loss for loss."""
    cfg = write_config(tmp_path / "cfg.yaml", toy, rounds=2,
                       prompts={"path": str(toy.train_prompts), "limit": 12, "prompts_per_round": 8},
                       rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 2,
                                "vllm": {"enforce_eager": True, "dtype": "float32"}},
                       score_teacher={"top_k": 8}, train=TRAIN)
    ref = tmp_path / "ref"
    res = run_cli("run", ref, "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    # Logical CPUs: five actors (2 + 2 + the trainer) on the two one-CPU nodes.
    res = run_cli("launch", "ray", "run", run, "--config", cfg, "--workers", "2", "--cpus-per-worker", "0.3",
                  "--address", cluster.address)
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("r0000-rollout", "r0000-score-teacher", "r0000-train", "r0001-rollout", "r0001-train", "finish"):
        assert f"{job}: " in res.stdout, res.stdout
    assert "plot:" in res.stdout
    assert len(digests_run(run)) == 18 and digests_run(run) == digests_run(ref)
    assert manifests_run(run) == manifests_run(ref)
    assert losses(run) == losses(ref)


def digests_run(run: Path) -> dict[str, str]:
    files = sorted(run.glob("round-*/*/part-*.parquet")) + sorted(run.glob("round-*/student/model.safetensors"))
    return {str(p.relative_to(run)): sha256_file(p) for p in files}


def manifests_run(run: Path) -> dict[str, dict]:
    return {str(p.relative_to(run)): json.loads(p.read_text()) for p in sorted(run.glob("round-*/*/manifest.json"))}


def test_without_ray_one_message_naming_the_extra(toy, tmp_path):
    """Where `import ray` fails (here: made to fail), `launch ray` says which extra to install and
    leaves RUN_DIR untouched."""
    import subprocess
    import sys

    cfg = write_config(tmp_path / "cfg.yaml", toy)
    code = ("import sys; sys.modules['ray'] = None\nfrom pipeline.cli import main\n"
            f"main(['launch', 'ray', 'rollout', {str(tmp_path / 'run')!r}, '--config', {str(cfg)!r}], prog_name='eopd-pipe')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True)
    assert res.returncode == 2 and "pip install 'eopd-pipe[ray]'" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
