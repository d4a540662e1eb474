"""The executor base class and the jobs it hands out.

A `Job` is one stage of one round (or the end of a run: eval and report), done by `workers`
workers; worker i of N is the stage command with `--worker i/N`. A job is done when the run
directory's records say so (`Job.done`): the stage manifest is complete, the round's student is
written. No executor keeps state of its own about what is done: a job submitted twice, a worker
requeued, a driver restarted, all re-read those records and redo only what they lack.
"""

from __future__ import annotations

import importlib
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.shards import Manifest

SHARDED = ("rollout", "score-teacher")  # stage commands that take --worker I/N
TARGETS = (*SHARDED, "train", "run")
STAGE_DIRS = {"rollout": "rollouts", "score-teacher": "teacher"}


@dataclass(frozen=True)
class Job:
    """`stage`: rollout, score-teacher, train, or "finish" (what `eopd-pipe run` does once every
    round is done: eval and report). `round`: None for "finish"."""

    stage: str
    round: int | None
    workers: int = 1

    @property
    def name(self) -> str:
        return "finish" if self.round is None else f"r{self.round:04d}-{self.stage}"

    @property
    def sharded(self) -> bool:
        return self.stage in SHARDED

    def args(self, run: RunDir, worker: str | None = None, train_launcher: list[str] | None = None) -> list[str]:
        """The `eopd-pipe` arguments of one worker; `worker` is "I/N" (or shell text that expands to it)."""
        if self.stage == "finish":
            return ["run", str(run.root)]
        args = [self.stage, str(run.root), "--round", str(self.round)]
        if self.sharded and worker is not None:
            args += ["--worker", worker]
        return args

    def done(self, run: RunDir) -> bool:
        if self.stage == "finish":
            return False  # eval and report skip what they have themselves; always cheap to ask
        if self.stage == "train":
            return run.student_done(self.round)
        return Manifest(run.stage_dir(self.round, STAGE_DIRS[self.stage])).is_complete()


def plan_jobs(run: RunDir, rounds: int, target: str, round_index: int, workers: int) -> list[Job]:
    """The jobs of `target` not yet done by the records: one stage of round `round_index`, or
    (target "run") every round's rollout -> score-teacher -> train, then "finish"."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1")
    if target == "run":
        jobs = [Job(stage, r, workers if stage in SHARDED else 1)
                for r in range(rounds) for stage in ("rollout", "score-teacher", "train")]
        jobs.append(Job("finish", None))
    else:
        jobs = [Job(target, round_index, workers if target in SHARDED else 1)]
    return [j for j in jobs if not j.done(run)]


class Executor(ABC):
    """Runs jobs in order, each after the previous one completed. Subclasses say where each
    worker runs and how a lost one comes back; `launch` returns what the user needs to follow it
    (job ids, or the finished jobs)."""

    name: str = "?"

    def __init__(self, run: RunDir, cfg: Config, python: str | None = None) -> None:
        self.run, self.cfg = run, cfg
        self.python = python or sys.executable  # workers run the interpreter (and so the install) of the launch

    def command(self, job: Job, worker: str | None = None) -> list[str]:
        """The argv of one worker of `job`. Training on several processes goes under torchrun, as `run` does."""
        if job.stage == "train" and self.cfg.train.processes > 1:
            launcher = [self.python, "-m", "torch.distributed.run", "--nproc_per_node", str(self.cfg.train.processes)]
        else:
            launcher = [self.python]
        return [*launcher, "-m", "pipeline.cli", *job.args(self.run, worker)]

    @abstractmethod
    def launch(self, jobs: Sequence[Job]) -> list[str]:
        ...


def require_extra(module: str, extra: str, command: str):
    """Import an optional engine (ray, sky) for the command that uses it, or one message naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"`{command}` needs the `{module}` package: pip install 'eopd-pipe[{extra}]' "
                        f"(or pip install -e '.[{extra}]' in a clone)") from None
