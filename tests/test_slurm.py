"""`eopd-pipe launch slurm` on a real single-node Slurm cluster (Debian's slurm-wlm and munge, started
once for this module under a temporary directory, stopped at its end): a 2-round run submitted once as
job arrays chained by afterok, one rollout task requeued in the middle of a shard, ends with exactly
the shards, manifests, students and losses of the same `run` on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI_ENV, REPO, TRAIN, cli_cmd, run_cli, write_config

from pipeline.executors.slurm import slurm_status_lines
from pipeline.rundir import RunDir
from pipeline.shards import sha256_file

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster of this machine; yields the environment for sbatch/squeue/scontrol."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    assert not missing, f"{missing} not installed: apt-get install -y slurm-wlm munge (.ci/run does)"
    d = tmp_path_factory.mktemp("slurm")
    # A munge daemon and key of its own (socket in the temp dir): nothing shared with a system munged.
    key, sock = d / "munge.key", d / "munge.sock"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    subprocess.run(["munged", "--force", f"--socket={sock}", f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
                    f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"], check=True)
    host = socket.gethostname().split(".")[0]
    mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 8 // 10
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=eopdtest", f"SlurmctldHost={host}", f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SlurmUser=root", "SlurmdUser=root",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill", "MpiDefault=none",
        "ReturnToService=2", f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={mem_mib} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
        deadline = time.time() + 60
        while _sh(env, "sinfo", "-h", "-o", "%T") != "idle":
            assert time.time() < deadline, f"slurm did not come up: {(d / 'slurmctld.log').read_text()[-2000:]}"
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        deadline = time.time() + 60
        while _sh(env, "squeue", "-h") and time.time() < deadline:
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):  # by their pid files: only the daemons this fixture started
            pid_file = d / f"{name}.pid"
            if pid_file.is_file():
                _stop(int(pid_file.read_text().split()[0]))


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _sh(env: dict, *cmd: str) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True).stdout.strip()


def digests(run: Path) -> dict[str, str]:
    files = sorted(run.glob("round-*/rollouts/part-*.parquet")) + sorted(run.glob("round-*/teacher/part-*.parquet"))
    files += sorted(run.glob("round-*/student/model.safetensors"))
    return {str(p.relative_to(run)): sha256_file(p) for p in files}


def manifests(run: Path) -> dict[str, dict]:
    return {str(p.relative_to(run)): json.loads(p.read_text()) for p in sorted(run.glob("round-*/*/manifest.json"))}


def losses(run: Path) -> list[tuple]:
    return [(m["round"], m["step"], m["loss"]) for p in sorted(run.glob("round-*/train/metrics.jsonl"))
            for m in map(json.loads, p.read_text().splitlines())]


def wait_for(cond, what: str, timeout: float, detail=lambda: "") -> None:
    """Poll `cond` until true; on timeout fail with `what` and `detail()` (a task's log, say)."""
    deadline = time.time() + timeout
    while not cond():
        if time.time() >= deadline:
            raise AssertionError(f"timeout ({timeout:.0f} s) waiting for {what}\n{detail()}")
        time.sleep(0.2)


def test_dry_run_prints_the_chained_arrays_and_writes_nothing(toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", toy, rounds=2)
    run = tmp_path / "run"
    res = run_cli("launch", "slurm", "run", run, "--config", cfg, "--workers", "3", "--array-parallelism", "2",
                  "--sbatch-arg=--partition=gpu", "--sbatch-arg=train:--gres=gpu:4", "--dry-run")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    names = ["r0000-rollout", "r0000-score-teacher", "r0000-train", "r0001-rollout", "r0001-score-teacher",
             "r0001-train", "finish"]
    assert [line.split("/")[-1] for line in out.splitlines() if line.startswith("# /")] == [f"{n}.sbatch" for n in names]
    assert out.count("#SBATCH --array=0-2%2") == 4 and out.count("#SBATCH --array=0-0") == 3
    assert out.count("#SBATCH --requeue") == 7 and out.count("#SBATCH --signal=B:TERM@120") == 7
    assert out.count("#SBATCH --partition=gpu") == 7 and out.count("#SBATCH --gres=gpu:4") == 2
    assert f"#SBATCH --output={run.resolve()}/logs/slurm/r0000-rollout-%A_%a.out" in out
    assert 'rollout ' + str(run.resolve()) + ' --round 1 --worker "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"' in out
    assert out.count("--dependency=afterok:") == 6
    assert not run.exists()
    bad = run_cli("launch", "slurm", "run", run, "--config", cfg, "--sbatch-arg=partition=gpu", "--dry-run")
    assert bad.returncode == 2 and "--sbatch-arg 'partition=gpu'" in bad.stderr
    # No Slurm here: one message, and RUN_DIR untouched.
    res = run_cli("launch", "slurm", "run", run, "--config", cfg, env={"PATH": "/nonexistent"})
    assert res.returncode == 2 and "`sbatch` is not on PATH" in res.stderr and not run.exists(), res.stderr[-2000:]


CONFIG = dict(rounds=2, prompts={"limit": 12, "prompts_per_round": 8},
              rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 2, "vllm": {"enforce_eager": True, "dtype": "float32"}},
              score_teacher={"top_k": 8}, train=TRAIN)


def config(toy, path: Path) -> Path:
    sections = {**CONFIG, "prompts": {"path": str(toy.train_prompts), **CONFIG["prompts"]}}
    return write_config(path, toy, **sections)


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    """The same run on this machine (`eopd-pipe run`), started at once beside the cluster's jobs;
    `wait()` gives its run dir."""
    tmp = tmp_path_factory.mktemp("reference")
    # Not conftest's spawn: that one is ended after each test, and this serves the whole module.
    proc = subprocess.Popen(cli_cmd("run", tmp / "ref", "--config", config(toy, tmp / "cfg.yaml")), cwd=REPO,
                            env={**os.environ, **CLI_ENV, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    class Reference:
        def wait(self) -> Path:
            if proc.returncode is None:
                _, err = proc.communicate(timeout=1800)
                assert proc.returncode == 0, err[-3000:]
            return tmp / "ref"
    yield Reference()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def launch(slurm: dict, *args, env: dict | None = None) -> list[dict]:
    """`eopd-pipe launch slurm ARGS`; returns RUN_DIR/logs/slurm/jobs.jsonl."""
    res = subprocess.run(["python3", "-m", "pipeline.cli", "launch", "slurm", *map(str, args)], cwd=REPO,
                         env={**slurm, **CLI_ENV, "PYTHONPATH": str(REPO), **(env or {})}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    run = Path(args[1])
    return [json.loads(line) for line in (run / "logs" / "slurm" / "jobs.jsonl").read_text().splitlines()]


def release_requeued(slurm: dict, task: str, *fields: str) -> None:
    """Start a requeued task now instead of at its BeginTime. slurmd refuses a launch whose credential
    is from the same second as the requeue's revocation ("Job credential revoked", seen once: the task
    then exits 1 and never comes back), so the release waits for the next whole second first."""
    time.sleep(2.0)
    assert subprocess.run(["scontrol", "update", f"jobid={task}", *fields, "starttime=now"], env=slurm).returncode == 0


def wait_until_gone(slurm: dict, jobs: list[dict], timeout: float) -> None:
    ids = {j["slurm_job_id"] for j in jobs}
    wait_for(lambda: not ids & set(_sh(slurm, "squeue", "-h", "-r", "-o", "%F").split()), "the jobs to end", timeout)


def elapsed_seconds(slurm: dict, task: str) -> int:
    """How long a running task has run (squeue's %M: [D-]H:MM:SS or M:SS)."""
    text = _sh(slurm, "squeue", "-h", "-j", task, "-o", "%M")
    days, _, hms = text.rpartition("-")
    seconds = 0
    for part in hms.split(":"):
        seconds = 60 * seconds + int(part)
    return seconds + 86400 * int(days or 0)


def test_a_task_warned_before_its_time_limit_requeues_itself_and_resumes(slurm, toy, reference, tmp_path):
    """The warning 240 s before the time limit (--signal=B:TERM@240): the stage gets SIGTERM in the
    middle of shard 1, stops cleanly and the batch script requeues the task (the job still RUNNING:
    not Slurm's own requeue); given time, it comes back and finishes the stage exactly as on this
    machine. The warning comes on an event, not a clock, so that neither a slow machine (the stage
    not yet at its shard) nor a fast one (the stage already done) misses it: the first run pauses
    at shard 1 (only a SIGTERM ends the pause early), and only then is its time limit cut to the
    next whole minute at least 150 s away (Slurm limits are whole minutes). slurmctld checks limits
    every 30 s, so the warning comes within ~30 s and leaves the stage at least ~2 min to stop and
    the script to requeue while the job is still running. Under load (a CI run) squeue shows the
    job SIGNALING, not RUNNING, while the warning is delivered: the script must take that for the
    warning too (it once did not; the stage then sat out its pause and no requeue came)."""
    run = tmp_path / "run"
    jobs = launch(slurm, "rollout", run, "--config", config(toy, tmp_path / "cfg.yaml"), "--workers", "1",
                  "--sbatch-arg=--time=15", "--signal-seconds", "240",
                  env={"EOPD_TEST_PAUSE": "shard_compute:1:900", "EOPD_TEST_PAUSE_ONCE": str(tmp_path / "paused")})
    task = f"{jobs[0]['slurm_job_id']}_0"
    log = run / "logs" / "slurm" / f"r0000-rollout-{task}.out"

    def detail() -> str:
        state = _sh(slurm, "squeue", "-h", "-j", task, "-o", "%T %M %l")
        return f"squeue: {state!r}\n{log}:\n" + (log.read_text()[-3000:] if log.is_file() else "(no log)")
    wait_for(lambda: (tmp_path / "paused").exists(), "the first run to reach its pause in shard 1", 480, detail)
    minutes = -(-(elapsed_seconds(slurm, task) + 150) // 60)  # 150-210 s left: fewer than the warning's 240
    assert subprocess.run(["scontrol", "update", f"jobid={task}", f"TimeLimit={minutes}"], env=slurm).returncode == 0
    wait_for(lambda: log.is_file() and "requeueing" in log.read_text(), "the task to requeue itself", 300, detail)
    wait_for(lambda: _sh(slurm, "squeue", "-h", "-j", task, "-o", "%T") == "PENDING", "the requeued task", 120)
    release_requeued(slurm, task, "TimeLimit=UNLIMITED")
    wait_until_gone(slurm, jobs, 900)
    text = log.read_text()
    assert "restart 1" in text and "stage complete" in text, text[-3000:]
    ref = reference.wait()
    stage = "round-0000/rollouts"
    assert digests(run) == {k: v for k, v in digests(ref).items() if k.startswith(stage)}
    assert manifests(run) == {k: v for k, v in manifests(ref).items() if k.startswith(stage)}


def test_run_submitted_once_with_a_task_requeued_mid_shard_equals_the_local_run(slurm, toy, reference, tmp_path):
    run = tmp_path / "run"
    # Rollout shard 1 (task 1 of 2: shards 1 and 3) pauses after vLLM computed it, before it is
    # written: requeued there, the task abandons it and does it again when it comes back.
    jobs = launch(slurm, "run", run, "--config", config(toy, tmp_path / "cfg.yaml"), "--workers", "2",
                  env={"EOPD_TEST_PAUSE": "rollouts.shard_compute:1:25"})
    assert [j["job"] for j in jobs] == ["r0000-rollout", "r0000-score-teacher", "r0000-train", "r0001-rollout",
                                        "r0001-score-teacher", "r0001-train", "finish"]
    array = jobs[0]["slurm_job_id"]
    log = run / "logs" / "slurm" / f"r0000-rollout-{array}_1.out"
    wait_for(lambda: log.is_file() and "EOPD_TEST_PAUSE reached rollouts.shard_compute:1" in log.read_text(),
             "rollout task 1 in shard 1", 600)
    assert "part-00001.parquet" not in json.loads((run / "round-0000/rollouts/manifest.json").read_text())["shards"]
    assert subprocess.run(["scontrol", "requeue", f"{array}_1"], env=slurm).returncode == 0
    # A requeued task waits for its BeginTime (Slurm holds it a while); release it at once.
    wait_for(lambda: _sh(slurm, "squeue", "-h", "-j", f"{array}_1", "-o", "%T") == "PENDING", "the requeued task", 120)
    release_requeued(slurm, f"{array}_1")

    wait_until_gone(slurm, jobs, 1800)
    text = log.read_text()
    assert "restart 0" in text and "restart 1" in text and "preempted (SIGTERM)" in text
    status = slurm_status_lines(RunDir(run))  # what `eopd-pipe status` shows of it, without sacct
    assert len(status) == 2 + 2 + 1 + 2 + 2 + 1 + 1 and all(", exit 0; last started " in line for line in status), status
    assert any(line.startswith(f"r0000-rollout task {array}_1: ") and line.endswith(", restart 1") for line in status)
    finish = next((run / "logs" / "slurm").glob("finish-*_0.out")).read_text()
    assert "plot:" in finish, finish[-2000:]
    ref = reference.wait()

    assert len(digests(run)) == 4 + 4 + 4 + 4 + 2
    assert digests(run) == digests(ref)
    assert manifests(run) == manifests(ref)
    assert losses(run) == losses(ref)
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_stage_on_a_bucket_run_dir_as_an_array(slurm, toy, reference, tmp_path, monkeypatch):
    """RUN_DIR on a real S3 server (SeaweedFS): a rollout array of 2 tasks, launched from a directory
    of its own with no --log-dir: scripts and task logs land under ./eopd-slurm-logs/BUCKET/PREFIX
    (sbatch cannot write to a bucket), jobs.jsonl in the bucket; the tasks reach the store through
    the submitting shell's AWS_* variables; rows equal the local run's; `eopd-pipe status` on the
    URL lists both tasks, ended with exit 0."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from s3server import SeaweedS3

    from pipeline import storage
    from pipeline.shards import read_parquet

    server = SeaweedS3(tmp_path / "seaweed").start()
    try:
        bucket = server.bucket()  # a new bucket each call
        url = f"s3://{bucket}/runs/slurm"
        here = tmp_path / "submit"
        here.mkdir()
        env = {**slurm, **CLI_ENV, **server.env, "PYTHONPATH": str(REPO)}
        res = subprocess.run(["python3", "-m", "pipeline.cli", "launch", "slurm", "rollout", url, "--config",
                              str(config(toy, tmp_path / "cfg.yaml")), "--workers", "2"],
                             cwd=here, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        logs = here / "eopd-slurm-logs" / bucket / "runs" / "slurm" / "logs" / "slurm"
        assert (logs / "r0000-rollout.sbatch").is_file(), res.stdout
        for k, v in server.env.items():  # this process reads the bucket too
            monkeypatch.setenv(k, v)
        root = storage.location(url)
        jobs = [json.loads(line) for line in storage.read_text(root / "logs" / "slurm" / "jobs.jsonl").splitlines()]
        assert [j["job"] for j in jobs] == ["r0000-rollout"] and jobs[0]["log_dir"] == str(logs)
        wait_until_gone(slurm, jobs, 900)
        array = jobs[0]["slurm_job_id"]
        for t in (0, 1):
            text = (logs / f"r0000-rollout-{array}_{t}.out").read_text()
            assert "exit 0" in text, text[-3000:]
        status = subprocess.run(["python3", "-m", "pipeline.cli", "status", url, "--no-health"], cwd=here,
                                env=env, capture_output=True, text=True)
        assert status.returncode == 0, status.stderr[-3000:]
        for t in (0, 1):
            assert f"r0000-rollout task {array}_{t}: ended " in status.stdout, status.stdout
        assert "rollouts  complete 4/4 shards" in status.stdout, status.stdout
        ref = reference.wait() / "round-0000" / "rollouts"
        d = root / "round-0000" / "rollouts"
        got = {n: read_parquet(d / n).to_pylist() for n in storage.names(d, "part-*.parquet")}
        assert got == {p.name: read_parquet(p).to_pylist() for p in sorted(ref.glob("part-*.parquet"))}
    finally:
        server.stop()
