"""`eopd-pipe launch ray` on a real Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head
with no CPUs and two one-CPU worker nodes, started once for this module and shut down at its end),
against one persistent `eopd-pipe run` on a local path (2 rounds, also once for this module):

- a rollout stage on two long-lived actors, the node of the actor holding shard 1 removed in the
  middle of that shard and a new node added; Ray rebuilds the actor there and retries the shard.
  Every shard is recorded once and equals the local run's; then score-teacher on the same cluster;
- the persistent `run` on Ray with RUN_DIR on a real S3 server (SeaweedFS), on a cluster too small
  to keep every role up (the roles take turns), equal to the local run; `status` on the URL names
  the actor holding a shard's lease with its Ray node;
- a launch the cluster can never hold: one message at once, naming what it needs and has."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI_ENV, REPO, TRAIN, cli_cmd, run_cli, spawn_cli, write_config

from pipeline import storage
from pipeline.executors.base import Job
from pipeline.executors.ray import releases, worker_slots
from pipeline.shards import sha256_file
from pipeline.storage import Location

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import ACCESS_KEY, SECRET_KEY, SeaweedS3  # noqa: E402


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    try:
        yield server
    finally:
        # Its data is thrown away: SIGKILL, as a graceful stop takes SeaweedFS some 25 s here.
        if server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    from ray.cluster_utils import Cluster

    # Nodes are processes of this test: they inherit the environment the actors need, the store's
    # keys included, as a node gets them from its own environment (they are never forwarded). The
    # endpoint is not set here: it reaches the actors from the driver, through FORWARDED_ENV.
    saved = dict(os.environ)
    os.environ.update({**CLI_ENV, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
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


@pytest.fixture(scope="module")
def config(toy, tmp_path_factory) -> Path:
    """One config for every launch of this module: 2 rounds of 4 shards per stage."""
    return write_config(tmp_path_factory.mktemp("raycfg") / "cfg.yaml", toy, rounds=2,
                        prompts={"path": str(toy.train_prompts), "limit": 12, "prompts_per_round": 8},
                        rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 2,
                                 "vllm": {"enforce_eager": True, "dtype": "float32"}},
                        score_teacher={"top_k": 8}, train=TRAIN)


@pytest.fixture(scope="module")
def ref(config, tmp_path_factory):
    """The persistent `eopd-pipe run` on this machine, what every launch on the cluster must equal
    (its round 0 is the plain stages' too: tests/test_run.py). Started at once beside the first
    launch, its CPU going where the cluster waits (a node's death, an engine's start, a pause);
    `wait()` gives its run dir."""
    tmp = tmp_path_factory.mktemp("rayref")
    # Not conftest's spawn: that one is ended after each test, and this serves the whole module.
    with open(tmp / "stderr", "w") as err:
        proc = subprocess.Popen(cli_cmd("run", tmp / "run", "--config", config), cwd=REPO,
                                env={**os.environ, **CLI_ENV, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)

    class Reference:
        def wait(self) -> Path:
            code = proc.wait(timeout=1800)
            assert code == 0, (tmp / "stderr").read_text()[-3000:]
            return tmp / "run"
    try:
        yield Reference()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def digests(stage_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(stage_dir.glob("part-*.parquet"))}


def wait_for(cond, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, f"timeout waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.mark.slow
def test_a_launch_the_cluster_cannot_hold_is_one_message_at_once(cluster, config, tmp_path):
    """--workers 3 of 1 CPU on two one-CPU nodes: Ray would leave the third actor pending for
    ever; the launch says so before any actor starts: what it needs, what the cluster has, the fixes."""
    t0 = time.monotonic()
    res = run_cli("launch", "ray", "run", tmp_path / "run", "--config", config, "--workers", "3",
                  "--address", cluster.address)
    assert res.returncode == 2, res.stderr[-3000:]
    err = " ".join(res.stderr.split())
    for text in ("r0000-rollout needs 3 actor(s) of 1 CPU at once (the rollout role, --workers 3)",
                 "the Ray cluster holds 2 (CPU 2 in all, ", " free now; GPU 0 in all",
                 "pending for ever", "Fix: --workers 2 or fewer; or --cpus-per-worker 0.5"):
        assert text in err, res.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    assert not storage.subdirs(tmp_path / "run", "round-*")  # no stage began
    assert not (tmp_path / "run" / "config.yaml").exists()  # nor was the run's config frozen


@pytest.mark.slow
def test_shard_stages_on_actors_survive_a_lost_node_and_equal_the_local_stages(cluster, config, ref, tmp_path):
    run = tmp_path / "run"
    # The actor doing rollout shard 1 pauses after computing it, before writing it; only the first
    # (the actor rebuilt on the new node goes on at once).
    driver = spawn_cli("launch", "ray", "rollout", run, "--config", config, "--workers", "2", "--address", cluster.address,
                       env={"EOPD_TEST_PAUSE": "rollouts.shard_compute:1:30",
                            "EOPD_TEST_PAUSE_ONCE": str(tmp_path / "paused")})
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
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]

    res = run_cli("launch", "ray", "score-teacher", run, "--workers", "2", "--address", cluster.address)
    assert res.returncode == 0, res.stderr[-3000:]
    # Done by the records: launched again, nothing is handed out.
    again = run_cli("launch", "ray", "score-teacher", run, "--workers", "2", "--address", cluster.address)
    assert again.returncode == 0 and "already done" in again.stdout, again.stderr[-3000:]

    local = ref.wait()
    for stage in ("rollouts", "teacher"):
        assert digests(run / "round-0000" / stage) == digests(local / "round-0000" / stage), stage
        assert (json.loads((run / "round-0000" / stage / "manifest.json").read_text())
                == json.loads((local / "round-0000" / stage / "manifest.json").read_text())), stage


def digests_run(root: Location) -> dict[str, str]:
    """Every shard's and student's sha256, by path relative to the run dir (local or bucket)."""
    out = {}
    for rd in storage.subdirs(root, "round-*"):
        for d in ("rollouts", "teacher"):
            for name in storage.names(root / rd / d, "part-*.parquet"):
                out[f"{rd}/{d}/{name}"] = storage.sha256_of(root / rd / d / name)
        if storage.is_file(student := root / rd / "student" / "model.safetensors"):
            out[f"{rd}/student/model.safetensors"] = storage.sha256_of(student)
    return out


def manifests_run(root: Location) -> dict[str, dict]:
    return {f"{rd}/{d}": json.loads(storage.read_text(root / rd / d / "manifest.json"))
            for rd in storage.subdirs(root, "round-*") for d in ("rollouts", "teacher")
            if storage.is_file(root / rd / d / "manifest.json")}


def losses(root: Location) -> list[tuple]:
    return [(m["round"], m["step"], m["loss"]) for rd in storage.subdirs(root, "round-*")
            if storage.is_file(p := root / rd / "train" / "metrics.jsonl")
            for m in map(json.loads, storage.read_text(p).splitlines())]


@pytest.mark.slow
def test_persistent_run_on_ray_on_a_bucket_equals_the_local_persistent_run(cluster, s3, config, ref, tmp_path,
                                                                          monkeypatch):
    """`launch ray run` with RUN_DIR on s3:// and --workers 1 (1 CPU each) on the two one-CPU
    nodes: the rollout, teacher and trainer roles (3 actors) do not fit at once, so they take turns,
    the one needed again furthest ahead released first: the rollout engine takes round 0's student
    in place, the trainer keeps its model and optimiser across rounds, the teacher is loaded again
    for round 1; then eval and report as a task. The actors reach the bucket with the endpoint the
    driver forwards and the keys of their nodes' environment. While rollout shard 1 is held, `status`
    on the URL names its actor's Ray node. Shards, students and losses equal the local run's."""
    url = f"s3://{s3.bucket()}/runs/ray"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the driver's, `status`'s and this process's store
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3.env["AWS_DEFAULT_REGION"])
    root = storage.location(url)
    driver = spawn_cli("launch", "ray", "run", url, "--config", config, "--workers", "1", "--address", cluster.address,
                       env={"EOPD_TEST_PAUSE": "rollouts.shard_compute:1:15",
                            "EOPD_TEST_PAUSE_ONCE": str(tmp_path / "paused")})
    locks = root / "round-0000" / "rollouts" / ".locks"
    wait_for(lambda: any(le["name"] == "part-00001.parquet.lock" and not le["expired"] for le in storage.leases(locks)),
             "the lease of rollout shard 1", 600)
    status = run_cli("status", url, "--no-health")
    assert status.returncode == 0, status.stderr[-3000:]
    line = next((x for x in status.stdout.splitlines() if x.strip().startswith("rollouts")), "")
    nodes = [n.node_id[:12] for n in cluster.worker_nodes]
    assert "in progress: shard(s) [1] by " in line and any(f"ray node {n}" in line for n in nodes), status.stdout

    out, err = driver.communicate(timeout=1800)
    assert driver.returncode == 0, err[-3000:]
    assert "ray: the cluster holds 2 actor(s) of 1 CPU" in out and "needs 3: a role is released" in out, out
    for job in ("r0000-rollout", "r0000-score-teacher", "r0000-train", "r0001-rollout", "r0001-train", "finish"):
        assert f"{job}: " in out, out
    # Which roles were kept: the pid of each job's actor, from its summary line.
    pid = {line.split(":")[0]: re.findall(r"pid (\d+)", line) for line in out.splitlines() if re.match(r"r\d{4}-", line)}
    assert pid["r0000-rollout"] == pid["r0001-rollout"] and pid["r0000-train"] == pid["r0001-train"], out
    assert pid["r0000-score-teacher"] != pid["r0001-score-teacher"], out
    assert "plot:" in out
    local = ref.wait()
    assert len(digests_run(root)) == 18 and digests_run(root) == digests_run(local)
    assert manifests_run(root) == manifests_run(local)
    assert losses(root) == losses(local)


def test_roles_take_turns_only_where_the_cluster_is_too_small():
    """`worker_slots` counts identical actors node by node; `releases` keeps every role where they
    fit, and otherwise releases the role needed again furthest ahead (or never)."""
    one_cpu = {"Alive": True, "Resources": {"CPU": 1.0}}
    nodes = [{"Alive": True, "Resources": {}}, one_cpu, one_cpu, {"Alive": False, "Resources": {"CPU": 8.0}}]
    assert worker_slots(nodes, 1, 0) == 2 and worker_slots(nodes, 0.3, 0) == 6 and worker_slots(nodes, 1 / 3, 0) == 6
    assert worker_slots(nodes, 0.6, 0) == 2 and worker_slots(nodes, 1, 1) == 0 and worker_slots(nodes, 0, 0) is None
    gpus = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 4.0}}] * 2
    assert worker_slots(gpus, 1, 1) == 8 and worker_slots(gpus, 8, 1) == 4

    def run(workers: int) -> list[Job]:
        return [Job(s, r, workers if s != "train" else 1) for r in range(2)
                for s in ("rollout", "score-teacher", "train")] + [Job("finish", None)]

    every = ["rollout", "score-teacher", "train"]
    assert releases(run(2), 5) == [[]] * 6 + [every]  # all kept up until eval and report
    assert releases(run(2), None) == [[]] * 6 + [every]
    # 3 roles of 1 on 2 slots: the teacher (needed after the next rollout) makes room for the
    # trainer; the rollout (never needed again) for round 1's teacher.
    assert releases(run(1), 2) == [[], [], ["score-teacher"], [], ["rollout"], [], ["train", "score-teacher"]]
    # pools of 2 on 2 slots: each role alone
    assert releases(run(2), 2) == [[], ["rollout"], ["score-teacher"], ["train"], ["rollout"], ["score-teacher"],
                                   ["train"]]
    assert releases([Job("rollout", 0, 4)], 2) == [[]]  # too few for one role: `fit` refuses it first


@pytest.mark.slow
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
