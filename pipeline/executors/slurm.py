"""Slurm: each job an sbatch job array, chained by `afterok`, so a whole run is submitted once.

Task i of an array of N runs the stage with `--worker i/N` (i = SLURM_ARRAY_TASK_ID), so each
shard has one owner, with no coordination beyond the run directory. How a lost task comes back:
  - `--requeue`: a preempted task, or one whose node failed, is put back in the queue by Slurm and
    runs the same command again; the stage redoes only the shards its records lack.
  - `--signal=B:TERM@120`: 120 s before the time limit the batch shell alone gets SIGTERM and
    passes it to the stage, which abandons (or finishes writing) its shard and exits 143; the script
    then requeues its own task, which resumes from the records. The job still being RUNNING (or
    SIGNALING: squeue's state while slurmctld delivers that signal, seen under load) tells this warning apart from Slurm's own requeue, a preemption or scancel, which leave it COMPLETING
    and have signalled the stage already.
  - `afterok`: round r's score-teacher starts once every rollout task of round r exited 0, and so
    on (rollout -> score-teacher -> train -> the next round's rollout); a requeued task keeps its
    dependents waiting. `--kill-on-invalid-dep=yes`: a job whose upstream failed is cancelled
    rather than left pending forever.
Logs and the scripts submitted go to RUN_DIR/logs/slurm/ (one file per task: NAME-ARRAYID_TASK.out,
appended to across requeues); RUN_DIR/logs/slurm/jobs.jsonl lists every submission. A RUN_DIR on a
bucket works the same, except that sbatch reads its script and writes the task logs on a file
system, never a bucket: those go to `--log-dir` (default ./eopd-slurm-logs/BUCKET/PREFIX under the
submitting directory, which a cluster shares with its nodes); jobs.jsonl stays in RUN_DIR and
names that directory, so `eopd-pipe status` finds both.
"""

from __future__ import annotations

import json
import re
import os
import shlex
import shutil
import subprocess
import time
from typing import Sequence

from pathlib import Path

from pipeline import storage
from pipeline.errors import UserError
from pipeline.executors.base import Executor, Job
from pipeline.rundir import RunDir, atomic_write_text
from pipeline.config import Config

WORKER_EXPR = "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"
JOB_STAGES = ("rollout", "score-teacher", "train", "finish")


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, run: RunDir, cfg: Config, array_parallelism: int | None = None,
                 sbatch_args: Sequence[str] = (), signal_seconds: int = 120, python: str | None = None,
                 log_dir: Path | None = None) -> None:
        super().__init__(run, cfg, python)
        if array_parallelism is not None and array_parallelism < 1:
            raise UserError(f"--array-parallelism {array_parallelism}: need at least 1")
        self.array_parallelism = array_parallelism
        self.signal_seconds = signal_seconds
        self.sbatch_args = [parse_sbatch_arg(a) for a in sbatch_args]
        self.records = run.root / "logs" / "slurm"  # jobs.jsonl: in RUN_DIR, wherever it is
        self.log_dir = slurm_log_dir(run, log_dir)  # scripts and task logs: a file system sbatch can use

    def job_name(self, job: Job) -> str:
        return f"eopd-{self.run.root.name}-{job.name}"

    def script(self, job: Job) -> str:
        """The batch script of `job` (an array of job.workers tasks)."""
        array = f"0-{job.workers - 1}"
        if self.array_parallelism is not None and self.array_parallelism < job.workers:
            array += f"%{self.array_parallelism}"
        directives = [
            f"--job-name={self.job_name(job)}",
            f"--array={array}",
            f"--output={self.log_dir / job.name}-%A_%a.out",
            "--open-mode=append",  # a requeued task appends to its log
            "--requeue",
            f"--signal=B:TERM@{self.signal_seconds}",
            f"--chdir={os.getcwd()}",
        ] + [arg for stage, arg in self.sbatch_args if stage in (None, job.stage)]
        cmd = " ".join(shlex.quote(a) for a in self.command(job, "@WORKER@")).replace("@WORKER@", f'"{WORKER_EXPR}"')
        what = "eval and report, once every round is done" if job.stage == "finish" else f"round {job.round} {job.stage}"
        lines = ["#!/bin/bash"] + [f"#SBATCH {shlex.quote(d)}" for d in directives] + [
            f"# eopd-pipe launch slurm: {what}, task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT.",
            "# Requeued or restarted, it runs the same command again: the stage redoes only what RUN_DIR's records lack.",
            "set -u",
            'echo "eopd-pipe: $(date -u +%FT%TZ) job ${SLURM_JOB_ID} (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})'
            ' on $(hostname), restart ${SLURM_RESTART_COUNT:-0}"',
            "state() {  # the job's state by squeue, asked again while the controller does not answer",
            "  local s i",
            "  for i in 1 2 3 4 5; do",
            '    s=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null) && [ -n "$s" ] && { echo "$s"; return; }',
            "    sleep 1",
            "  done",
            "  echo UNKNOWN",
            "}",
            "on_term() {",
            "  warned=1",
            "  local s; s=$(state)",
            '  echo "eopd-pipe: $(date -u +%FT%TZ) SIGTERM, job $s"',
            "  # RUNNING (SIGNALING while slurmctld still delivers it; seen under load): the time limit's warning",
            "  # (--signal=B:TERM), which reaches only this shell: pass it on to the stage. Otherwise a requeue,",
            "  # preemption or scancel has signalled every process of the job, the stage too.",
            '  case "$s" in RUNNING|SIGNALING|UNKNOWN) kill -TERM "$stage" 2>/dev/null ;; esac',
            "}",
            "warned= stage=",
            "trap on_term TERM",
            f"{cmd} &",
            "stage=$!",
            "while :; do",
            '  wait "$stage"; code=$?',
            '  kill -0 "$stage" 2>/dev/null || break  # still there: the wait was cut short by the trap',
            "done",
            'if [ "$code" != 0 ] && [ -n "$warned" ] && case "$(state)" in RUNNING|SIGNALING) true ;; *) false ;; esac; then',
            "  # Stopped by the time limit's warning (exit 143; or killed by it before its handler was set up).",
            "  # Requeue this task: it resumes from the records.",
            '  echo "eopd-pipe: stopped before the time limit; requeueing ${SLURM_JOB_ID}"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
            'echo "eopd-pipe: $(date -u +%FT%TZ) exit $code"',
            'exit "$code"',
        ]
        return "\n".join(lines) + "\n"

    def launch(self, jobs: Sequence[Job], dry_run: bool = False, echo=print) -> list[str]:
        """Submit `jobs` in order, each after the previous one (afterok). Returns the job ids
        (dry run: prints the scripts and the sbatch commands, submits and writes nothing)."""
        if not dry_run:
            check_slurm_tools()
            self.log_dir.mkdir(parents=True, exist_ok=True)
        ids: list[str] = []
        previous: str | None = None
        for job in jobs:
            path = self.log_dir / f"{job.name}.sbatch"
            sbatch = ["sbatch", "--parsable"]
            if previous is not None:
                sbatch += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
            sbatch.append(str(path))
            if dry_run:
                echo(f"# {path}\n{self.script(job)}$ {shlex.join(sbatch)}\n")
                previous = f"<{job.name}>"
                continue
            atomic_write_text(path, self.script(job))
            res = subprocess.run(sbatch, capture_output=True, text=True)
            if res.returncode != 0:
                done = f"; already submitted: {', '.join(ids)} (scancel them, or keep them: a job resubmitted " \
                       f"later redoes only what the records lack)" if ids else ""
                raise UserError(f"sbatch {path} failed (exit {res.returncode}): {res.stderr.strip()}{done}")
            previous = res.stdout.strip().split(";")[0]  # "ID" or "ID;CLUSTER"
            ids.append(previous)
            storage.append_text(self.records / "jobs.jsonl", json.dumps(
                {"time": time.time(), "job": job.name, "slurm_job_id": previous, "workers": job.workers,
                 "after": ids[-2] if len(ids) > 1 else None, "log_dir": str(self.log_dir)}) + "\n")
            echo(f"submitted {job.name}: job {previous} ({job.workers} task(s)), log {self.log_dir}/{job.name}-{previous}_*.out")
        return ids


def slurm_log_dir(run: RunDir, given: Path | None) -> Path:
    """Where sbatch scripts and task logs go: `given`, else RUN_DIR/logs/slurm for a local RUN_DIR,
    else ./eopd-slurm-logs/BUCKET/PREFIX (a bucket is no place for sbatch's --output)."""
    if given is not None:
        return Path(given).resolve()
    if not storage.is_remote(run.root):
        return run.root / "logs" / "slurm"
    return Path("eopd-slurm-logs", run.root.path.strip("/"), "logs", "slurm").resolve()


def check_slurm_tools() -> None:
    for tool in ("sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            raise UserError(f"`{tool}` is not on PATH: run `eopd-pipe launch slurm` on a Slurm login node "
                            f"(or add Slurm's bin directory to PATH)")


def parse_sbatch_arg(text: str) -> tuple[str | None, str]:
    """`--sbatch-arg ARG` goes to every job; `--sbatch-arg STAGE:ARG` only to that stage's jobs."""
    stage, sep, rest = text.partition(":")
    if sep and stage in JOB_STAGES:
        text = rest
    else:
        stage = None
    if not text.startswith("-"):
        raise UserError(f"--sbatch-arg {text!r}: expected an sbatch option such as --partition=gpu or "
                        f"train:--gres=gpu:4 (STAGE: one of {', '.join(JOB_STAGES)})")
    return stage, text


_START = re.compile(r"eopd-pipe: (\S+) job (\d+) \(array (\d+)_(\d+)\) on (\S+), restart (\d+)$")
_END = re.compile(r"eopd-pipe: (\S+) exit (\d+)$")


def slurm_status_lines(run: RunDir) -> list[str]:
    """What `eopd-pipe launch slurm` submitted to RUN_DIR and where each task last ran, without sacct:
    RUN_DIR/logs/slurm/jobs.jsonl, the first line each task start writes to its log, and squeue for
    the tasks still queued or running (where squeue is on PATH). For `eopd-pipe status`."""
    try:
        text = storage.read_text(run.root / "logs" / "slurm" / "jobs.jsonl")
    except FileNotFoundError:
        return []
    jobs = [json.loads(line) for line in text.splitlines() if line.strip()]
    states: dict[str, str] = {}
    if shutil.which("squeue"):
        ids = ",".join(j["slurm_job_id"] for j in jobs)
        res = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%F_%K %T"], capture_output=True, text=True)
        states = dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)
    lines = []
    for j in jobs:
        log_dir = Path(j["log_dir"]) if "log_dir" in j else run.root / "logs" / "slurm"
        if not log_dir.is_dir():  # status asked from a machine that does not see the cluster's files
            lines.append(f"{j['job']}: job {j['slurm_job_id']}, {j['workers']} task(s); task logs in {log_dir} "
                         f"on the cluster (not on this machine)")
            continue
        for t in range(j["workers"]):
            task = f"{j['slurm_job_id']}_{t}"
            log = _read_lines(log_dir / f"{j['job']}-{task}.out")
            starts = [i for i, line in enumerate(log) if _START.search(line)]
            if not starts:
                lines.append(f"{j['job']} task {task}: {states.get(task, 'not queued')}, not started")
                continue
            m = _START.search(log[starts[-1]])
            ends = [e for line in log[starts[-1]:] if (e := _END.search(line))]
            state = states.get(task) or (f"ended {ends[-1][1]}, exit {ends[-1][2]}" if ends else "gone (no exit line: killed)")
            lines.append(f"{j['job']} task {task}: {state}; last started {m[1]} on {m[5]}, restart {m[6]}")
    return lines


def _read_lines(path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
