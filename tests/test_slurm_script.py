"""The batch script of `launch slurm`, run by bash without a cluster: which SIGTERM it passes on to
the stage and when it requeues its task. `squeue` and `scontrol` are stand-ins on PATH that print
a given job state and record the requeue; the stage is a small Python process. This pins each
branch (test_slurm.py drives the same script on a real slurmctld, where the SIGNALING state shows
up only under load)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.executors.base import Job
from pipeline.executors.slurm import SlurmExecutor
from pipeline.rundir import RunDir

STAGE = """import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(*_):
    out.write_text("stage got SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
out.write_text("stage started")
time.sleep(60)
"""


class StandIn(SlurmExecutor):
    """The real script, with the stage's argv replaced by STAGE."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(RunDir(tmp / "run"), load_config(None))
        self.tmp = tmp

    def command(self, job: Job, worker: str | None = None) -> list[str]:
        return [sys.executable, str(self.tmp / "stage.py"), str(self.tmp / "stage.out")]


def run_script(tmp: Path, state: str, wait: float) -> tuple[int, str, str]:
    """Start the script with squeue answering `state`, SIGTERM the shell alone (as --signal=B:TERM
    does) once the stage runs; end the stage ourselves if the script has not ended within `wait`
    seconds. Returns (exit code,
    what the stage saw, the requeue record)."""
    (tmp / "stage.py").write_text(STAGE)
    bin_ = tmp / "bin"
    bin_.mkdir()
    (bin_ / "squeue").write_text(f"#!/bin/sh\necho {state}\n")
    (bin_ / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp / "scontrol.log"}\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = tmp / "task.sbatch"
    script.write_text(StandIn(tmp).script(Job("rollout", 0, 1)))
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "7",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = tmp / "stage.out"
    deadline = time.time() + 30
    while not (out.is_file() and out.read_text()):
        assert time.time() < deadline and proc.poll() is None, "the stand-in stage did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the shell alone: the warning's B: flag
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:  # the script did not pass it on: end the stage as Slurm would
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    log = tmp / "scontrol.log"
    return proc.returncode, out.read_text(), log.read_text() if log.is_file() else ""


@pytest.mark.parametrize("state", ["RUNNING", "SIGNALING"])
def test_the_time_limit_warning_reaches_the_stage_and_requeues_the_task(tmp_path, state):
    code, stage, requeue = run_script(tmp_path, state, wait=30)
    assert stage == "stage got SIGTERM" and code == 143
    assert requeue.split() == ["requeue", "7"]


@pytest.mark.parametrize("state", ["COMPLETING", "PREEMPTED"])
def test_a_requeue_or_preemption_is_left_to_slurm(tmp_path, state):
    """Slurm has signalled every process of the job already: the script neither signals the stage
    again nor requeues (Slurm's own requeue brings the task back, or scancel ends it)."""
    code, stage, requeue = run_script(tmp_path, state, wait=2)
    assert stage == "stage got SIGTERM" and code == 143  # from the test's killpg, standing in for Slurm
    assert requeue == ""
