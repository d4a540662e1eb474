"""What an executor's long-lived worker holds: the stage's engine, kept across shards and rounds.

`ShardEngine` is one worker of a sharded stage (a Ray actor holds one): it loads the round's
model on its first shard (the vLLM sampler; the teacher) and keeps it, taking each new round's
student in place (as the persistent `run`), and does exactly the shards it is handed through the
stage functions the stage commands call, so every shard, record and manifest is theirs. The run
directory's records stay the only truth: a shard already recorded is not redone, one claimed by a
live process elsewhere is reported busy, and an engine rebuilt after its node was lost starts over
from the records."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, load_config
from pipeline.models import use_cpu_threads
from pipeline.rundir import RunDir


@dataclass(frozen=True)
class Only:
    """A worker spec that owns exactly the shards given (run_shards asks only `owns(i)`)."""

    shards: frozenset[int]

    def owns(self, shard: int) -> bool:
        return shard in self.shards


class ShardEngine:
    def __init__(self, run_dir: str, stage: str) -> None:
        if stage not in ("rollout", "score-teacher"):
            raise ValueError(f"not a sharded stage: {stage}")
        self.run, self.stage = RunDir(run_dir), stage
        self.cfg: Config = load_config(self.run.config_path, ())  # frozen by the launch: every worker reads it
        use_cpu_threads(self.cfg.cpu_threads)
        self._sampler = self._teacher = None
        self.start_seconds = 0.0  # spent starting this worker's engine (once; again after a restart)

    def plan(self, round_index: int) -> dict[str, Any]:
        """Write the stage's plan (its manifest) without doing a shard or loading a model; the records."""
        summary = self._call(round_index, Only(frozenset()))
        return {"num_shards": summary.num_shards, "complete": summary.complete}

    def shard(self, round_index: int, i: int) -> dict[str, Any]:
        """Do shard i of round `round_index` unless the records hold it (or a live process elsewhere does)."""
        from pipeline.identity import worker_identity

        t0, started = time.perf_counter(), self.start_seconds
        summary = self._call(round_index, Only(frozenset([i])))
        load = summary.load_seconds + self.start_seconds - started  # this call's engine start or weight swap
        return {"shard": i, "done_now": summary.done_now, "done_before": summary.done_before,
                "busy": summary.busy_elsewhere, "seconds": time.perf_counter() - t0,
                "compute_seconds": summary.seconds, "engine_seconds": summary.engine_seconds, "load_seconds": load,
                "worker": worker_identity()}

    def _call(self, r: int, worker: Only):
        if self.stage == "rollout":
            from stages.rollout import run_rollout

            policy = self.run.policy_for_round(self.cfg, r)
            return run_rollout(self.run, self.cfg, r, worker, sampler=self._sampler_for(policy) if worker.shards else None)
        from stages.score_teacher import run_score_teacher

        return run_score_teacher(self.run, self.cfg, r, worker, teacher=self._teacher_model() if worker.shards else None)

    def _sampler_for(self, policy: Path):
        if self._sampler is None:
            from pipeline.sampler import Sampler
            from pipeline.work import derive_seed

            # the engine seed matters little: every request carries its own seed (stages/rollout.py)
            t0 = time.perf_counter()
            self._sampler = Sampler(policy, self.cfg.rollout.vllm, seed=derive_seed(self.cfg.seed, "rollouts"))
            self.start_seconds += time.perf_counter() - t0
        return self._sampler

    def _teacher_model(self):
        if self._teacher is None:
            from pipeline.models import check_model_dir
            from stages.score_teacher import load_teacher

            t0 = time.perf_counter()
            self._teacher = load_teacher(check_model_dir(self.cfg.teacher.path, "teacher"), self.cfg.score_teacher)
            self.start_seconds += time.perf_counter() - t0
        return self._teacher

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
        self._sampler = self._teacher = None


class TrainEngine:
    """The trainer role (a Ray actor holds one): model, optimiser and RNG kept in memory across
    rounds, as in the persistent `run`; rebuilt after a lost node, it resumes from the newest
    checkpoint in the run directory."""

    def __init__(self, run_dir: str) -> None:
        from stages.train import Trainer

        run = RunDir(run_dir)
        cfg = load_config(run.config_path, ())
        use_cpu_threads(cfg.cpu_threads)
        self.trainer = Trainer(run, cfg)

    def train(self, round_index: int) -> dict[str, Any]:
        from pipeline.identity import worker_identity

        s = self.trainer.train_round(round_index)
        return {"steps_done_now": s.steps_done_now, "student": str(s.student_dir), "worker": worker_identity()}


def run_command(argv: list[str]) -> dict[str, Any]:
    """`python -m pipeline.cli ARGV` where this function runs (a Ray task: eval and report at the end of a run)."""
    import subprocess
    import sys

    from pipeline.identity import worker_identity

    res = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True)
    return {"returncode": res.returncode, "stdout": res.stdout, "stderr": res.stderr[-4000:], "worker": worker_identity()}
