"""Ray: one long-lived actor per worker slot (a GPU; a CPU here), holding the stage's engine; the
driver hands out shard indices, one at a time, to whichever actor is free.

How a lost worker comes back: the actors are created with `max_restarts=-1, max_task_retries=-1`,
so an actor lost with its node is rebuilt by Ray on another node and the shard call it was doing
is retried there. The half-done shard left nothing the records count (a temporary file, removed by
the next claimer; its OS lock went with the process). The driver itself keeps no state: started
again, it re-reads the stage's records and hands out only the shards they lack.

The actor's class is given as a factory (`engine`: `(run_dir, stage) -> object` with
`plan(round)` and `shard(round, i)`, e.g. stages.launch.ShardEngine), so this module knows
nothing of what a stage does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.executors.base import Executor, Job, require_extra
from pipeline.rundir import RunDir

# Environment a worker needs that a fresh Ray worker process would not have (Ray starts workers from
# its raylet, not from the driver): where eopd-pipe is imported from, and the engines' switches.
# Where the run directory's bucket is and how claims behave, so actors on every node reach the same
# store. Not the secret keys: a runtime_env is kept in Ray's control store and shown by its dashboard;
# nodes take credentials as any AWS client does (instance role, ~/.aws, the env of `ray start`).
FORWARDED_ENV = ("PYTHONPATH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "EOPD_TEST_PAUSE", "EOPD_LEASE_SECONDS",
                 "EOPD_CACHE_DIR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
FORWARDED_PREFIXES = ("VLLM_",)


@dataclass
class StageRun:
    """What one sharded job did on the cluster: every shard call's answer, in completion order."""

    job: str
    results: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def shards_done(self) -> list[int]:
        return sorted(i for r in self.results for i in r["done_now"])


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES)}


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, run: RunDir, cfg: Config, engine: Callable[[str, str], Any], workers: int,
                 address: str | None = None, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                 poll_seconds: float = 1.0, trainer: Callable[[str], Any] | None = None,
                 command: Callable[[list[str]], dict] | None = None) -> None:
        super().__init__(run, cfg)
        self.ray = require_extra("ray", "ray", "eopd-pipe launch ray")
        self.engine, self.workers = engine, workers
        self.trainer, self.command_fn = trainer, command  # the trainer role's factory; how "finish" runs a command
        self._trainer = None
        self.address, self.cpus, self.gpus = address, cpus_per_worker, gpus_per_worker
        self.poll_seconds = poll_seconds
        self._actors: dict[str, list] = {}  # stage -> its actors, kept across rounds (engines stay loaded)

    def connect(self) -> None:
        if not self.ray.is_initialized():
            # address=None: RAY_ADDRESS, else a new local cluster; never a guess at a stale one
            self.ray.init(address=self.address, runtime_env={"env_vars": forwarded_env()}, log_to_driver=False)

    def actors(self, stage: str) -> list:
        if stage not in self._actors:
            actor_cls = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=-1,
                                        max_task_retries=-1)(EngineActor)
            self._actors[stage] = [actor_cls.remote(self.engine, str(self.run.root), stage)
                                   for _ in range(self.workers)]
        return self._actors[stage]

    def launch(self, jobs: Sequence[Job], echo: Callable[[str], None] = lambda line: None) -> list[StageRun]:
        """Each job in order: sharded stages on the stage's actor pool (kept across rounds: each engine
        loads once, a new round's student in place), training on the trainer actor (model and
        optimiser kept across rounds), "finish" (eval and report) as a task once the pools are freed."""
        runs = []
        for job in jobs:
            if job.sharded:
                runs.append(self.run_sharded(job))
            elif job.stage == "train":
                runs.append(self.run_train(job))
            else:
                runs.append(self.run_finish(job))
            echo(summarize(runs[-1]))
        return runs

    def run_train(self, job: Job) -> StageRun:
        if self.trainer is None or self.cfg.train.processes > 1:
            raise UserError(f"`eopd-pipe launch ray` trains on one process per run (the trainer actor); for "
                            f"train.processes > 1 run `eopd-pipe {' '.join(job.args(self.run))}` under torchrun, "
                            f"or `eopd-pipe launch slurm`")
        self.connect()
        t0 = time.perf_counter()
        if self._trainer is None:
            cls = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=-1, max_task_retries=-1)(TrainerActor)
            self._trainer = cls.remote(self.trainer, str(self.run.root))
        result = self._get(self._trainer.train.remote(job.round))
        return StageRun(job.name, [result], time.perf_counter() - t0)

    def run_finish(self, job: Job) -> StageRun:
        """Eval and report (`eopd-pipe run` once every round is done) as one Ray task on a worker's
        resources, after the role actors are gone (their memory goes to eval's engine)."""
        self.connect()
        self.shutdown()
        t0 = time.perf_counter()
        task = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=-1)(self.command_fn)
        result = self._get(task.remote(job.args(self.run)))
        if result["returncode"] != 0:
            raise UserError(f"`eopd-pipe {' '.join(job.args(self.run))}` failed on the cluster (exit "
                            f"{result['returncode']}):\n{result['stderr']}")
        return StageRun(job.name, [result], time.perf_counter() - t0)

    def run_sharded(self, job: Job) -> StageRun:
        """Every shard of `job` the records lack, each handed to the next free actor, until the
        records say the stage is complete."""
        self.connect()
        t0 = time.perf_counter()
        actors = self.actors(job.stage)
        out = StageRun(job.name)
        while True:
            plan = self._get(actors[0].plan.remote(job.round))  # writes the stage's manifest; loads no model
            todo = [i for i in range(plan["num_shards"]) if i not in self._recorded(job)]
            if not todo:
                break
            busy = self._dispatch(job, actors, todo, out)
            if busy:  # held by a live process outside this launch: wait for its record, then look again
                time.sleep(self.poll_seconds)
        out.wall_seconds = time.perf_counter() - t0
        return out

    def _dispatch(self, job: Job, actors: list, todo: list[int], out: StageRun) -> set[int]:
        ray = self.ray
        queue, running, busy = list(todo), {}, set()
        idle = list(actors)
        while queue or running:
            while queue and idle:
                actor = idle.pop()
                running[actor.shard.remote(job.round, queue.pop(0))] = actor
            ready, _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready[0])
            result = self._get(ready[0])
            out.results.append(result)
            busy.update(result["busy"])
            idle.append(actor)
        return busy

    def _get(self, ref) -> Any:
        """An actor's answer; a user error raised in the actor is this command's one message."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise UserError(str(e.cause)) from None
            raise

    def _recorded(self, job: Job) -> set[int]:
        from pipeline.executors.base import STAGE_DIRS
        from pipeline.shards import Manifest

        manifest = Manifest(self.run.stage_dir(job.round, STAGE_DIRS[job.stage]))
        return manifest.done() if manifest.exists() else set()

    def shutdown(self) -> None:
        for actors in self._actors.values():
            for a in actors:
                self.ray.kill(a, no_restart=True)
        self._actors.clear()
        if self._trainer is not None:
            self.ray.kill(self._trainer, no_restart=True)
            self._trainer = None


class EngineActor:
    """The Ray actor: builds its engine once (again after a restart), then does what it is handed."""

    def __init__(self, engine: Callable[[str, str], Any], run_dir: str, stage: str) -> None:
        self.engine = engine(run_dir, stage)

    def plan(self, round_index: int) -> dict[str, Any]:
        return self.engine.plan(round_index)

    def shard(self, round_index: int, i: int) -> dict[str, Any]:
        return self.engine.shard(round_index, i)

    def identity(self) -> dict[str, Any]:
        from pipeline.identity import worker_identity

        return worker_identity()


class TrainerActor:
    """The trainer role: built once (again after a restart, resuming from the newest checkpoint)."""

    def __init__(self, trainer: Callable[[str], Any], run_dir: str) -> None:
        self.trainer = trainer(run_dir)

    def train(self, round_index: int) -> dict[str, Any]:
        return self.trainer.train(round_index)


def summarize(stage_run: StageRun) -> str:
    """One line per finished job: what was done, on which workers, how long it took."""
    from pipeline.identity import describe_worker

    done = [r for r in stage_run.results if r.get("done_now", True)]
    hosts = sorted({describe_worker(r["worker"]) for r in done if "worker" in r})
    what = (f"{len(stage_run.shards_done)} shard(s) done now" if stage_run.results and "done_now" in stage_run.results[0]
            else "done")
    return f"{stage_run.job}: {what} on {len(hosts)} worker(s) ({'; '.join(hosts)}) in {stage_run.wall_seconds:.1f} s"
