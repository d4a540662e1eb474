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

Room: the roles' actors (a stage's pool of --workers actors, the trainer) each hold
`cpus_per_worker` CPUs and `gpus_per_worker` GPUs for as long as they live, and Ray leaves an actor
it cannot place pending for ever. Before the first job the driver counts how many such actors the
cluster's nodes can hold at once: fewer than one role needs is one message at once; fewer than
every role of the launch needs together, and a role is released when another needs its room
(`releases`: the one needed again furthest ahead goes first), its engine loaded again when it is
next needed (the records and checkpoints carry the run across, as for the stage commands).
"""

from __future__ import annotations

import math
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
# nodes take credentials as any AWS or Google client does (instance role or service account, ~/.aws,
# GOOGLE_APPLICATION_CREDENTIALS, the env of `ray start`).
FORWARDED_ENV = ("PYTHONPATH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "EOPD_TEST_PAUSE", "EOPD_TEST_PAUSE_ONCE",
                 "EOPD_LEASE_SECONDS", "EOPD_CACHE_DIR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "STORAGE_EMULATOR_HOST", "GCSFS_DEBUG")
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


def role_of(job: Job) -> str:
    """What a job runs on: its stage's actor pool ("rollout", "score-teacher"), the trainer actor
    ("train"), or "finish" (a task, once every role is released)."""
    return "finish" if job.round is None else job.stage


def worker_slots(nodes: Sequence[dict[str, Any]], cpus: float, gpus: float) -> int | None:
    """How many actors asking `cpus` CPUs and `gpus` GPUs the live nodes (`ray.nodes()`) hold at
    once; None when an actor asks neither (Ray then places any number)."""
    asks = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    if not asks:
        return None
    # The actors are all alike, so a node holds floor(has / asks) of them in its scarcest resource,
    # whatever else it holds (1e-6: Ray keeps resources in fixed point; 1 / (1/3) must count 3).
    return sum(min(math.floor(n.get("Resources", {}).get(k, 0.0) / v + 1e-6) for k, v in asks.items())
               for n in nodes if n.get("Alive"))


def releases(jobs: Sequence[Job], slots: int | None) -> list[list[str]]:
    """For each job, the roles to release before it runs, so that the live roles' actors never
    exceed `slots` (None: no limit): a role is kept (its engine loaded) until its room is needed;
    then the role needed again furthest ahead, or never, goes first. "finish" releases every role."""
    def next_use(role: str, after: int) -> float:
        return next((k for k in range(after + 1, len(jobs)) if role_of(jobs[k]) == role), math.inf)

    live: dict[str, int] = {}  # role -> its actors, in the order they were started
    out = []
    for j, job in enumerate(jobs):
        role, drop = role_of(job), []
        if role == "finish":
            drop, live = list(live), {}
        elif role not in live:
            while slots is not None and live and sum(live.values()) + job.workers > slots:
                far = max(live, key=lambda r: next_use(r, j))
                drop.append(far)
                del live[far]
            live[role] = job.workers
        out.append(drop)
    return out


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
        optimiser kept across rounds), "finish" (eval and report) as a task once the pools are freed.
        Where the cluster cannot hold every role at once, a role is released when another needs its
        room (see `fit`)."""
        if not jobs:
            return []
        self.connect()
        plan = self.fit(jobs, echo)
        runs = []
        for job, drop in zip(jobs, plan):
            for role in drop:
                self.release(role)
            if job.sharded:
                runs.append(self.run_sharded(job))
            elif job.stage == "train":
                runs.append(self.run_train(job))
            else:
                runs.append(self.run_finish(job))
            echo(summarize(runs[-1]))
        return runs

    def fit(self, jobs: Sequence[Job], echo: Callable[[str], None] = lambda line: None) -> list[list[str]]:
        """The roles to release before each job (`releases`) on this cluster's live nodes; one
        message at once where a job needs more actors than the nodes hold together (Ray would
        leave the rest pending for ever), one line where the roles take turns."""
        nodes = self.ray.nodes()
        slots = worker_slots(nodes, self.cpus, self.gpus)
        sizes = {role_of(j): j.workers for j in jobs if role_of(j) != "finish"}
        need, together = max(j.workers for j in jobs), sum(sizes.values())
        if slots is not None and slots < need:
            raise UserError(self._short(jobs, nodes, slots, need))
        if slots is not None and slots < together:
            roles = ", ".join(f"{ROLE_NAMES[r]} {n}" for r, n in sizes.items())
            echo(f"ray: the cluster holds {slots} actor(s) of {self._ask()} ({self._has()}); keeping every role up "
                 f"({roles}) needs {together}: a role is released when another needs its room, and its engine "
                 f"loads again when it is next needed")
        return releases(jobs, slots)

    def _ask(self) -> str:
        return " and ".join(f"{v:g} {k}" for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0) or "nothing"

    def _has(self) -> str:
        """What the cluster has: in all (`ray.cluster_resources`), free now (`ray.available_resources`)."""
        total, free = self.ray.cluster_resources(), self.ray.available_resources()
        alive = len([n for n in self.ray.nodes() if n.get("Alive")])
        return "; ".join(f"{k} {total.get(k, 0):g} in all, {free.get(k, 0):g} free now" for k in ("CPU", "GPU")) + \
            f"; {alive} live node(s)"

    def _short(self, jobs: Sequence[Job], nodes: Sequence[dict[str, Any]], slots: int, need: int) -> str:
        """The message for a cluster too small for one job: what it needs, what the cluster has, the fixes."""
        job = next(j for j in jobs if j.workers == need)
        fixes = [f"--workers {slots} or fewer"] if slots >= 1 and job.sharded else []
        if self.cpus > 0:
            # the largest CPU ask (of the form `a node's CPUs / k`, 2 decimals down) with which `need` actors fit
            cands = sorted({math.floor(n.get("Resources", {}).get("CPU", 0.0) / k * 100) / 100 for n in nodes if n.get("Alive")
                            for k in range(1, need + 1)}, reverse=True)
            cpus = next((c for c in cands if c > 0 and (worker_slots(nodes, c, self.gpus) or 0) >= need), None)
            if cpus:
                fixes.append(f"--cpus-per-worker {cpus:g} (actors then share a node's CPUs)")
        fixes.append(f"add nodes or {'GPUs' if self.gpus > 0 else 'CPUs'} (nodes are counted as they are up now: on an "
                     f"autoscaling cluster, bring them up first)")
        what = (f"the {ROLE_NAMES[role_of(job)]} role, --workers {job.workers}" if job.sharded
                else f"the {ROLE_NAMES[role_of(job)]}")
        return (f"`eopd-pipe launch ray`: {job.name} needs {need} actor(s) of {self._ask()} at once ({what}); the Ray "
                f"cluster holds {slots} ({self._has()}): Ray would leave the rest pending for ever. "
                f"Fix: {'; or '.join(fixes)}.")

    def release(self, role: str) -> None:
        """Kill a role's actors (their resources go back to the cluster); started again when next needed."""
        if role == "train":
            if self._trainer is not None:
                self.ray.kill(self._trainer, no_restart=True)
                self._trainer = None
            return
        for a in self._actors.pop(role, []):
            self.ray.kill(a, no_restart=True)

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
        for role in [*self._actors, "train"]:
            self.release(role)


ROLE_NAMES = {"rollout": "rollout", "score-teacher": "teacher", "train": "trainer", "finish": "eval and report"}


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
