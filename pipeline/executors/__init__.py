"""Where a stage runs, apart from what it does (datatrove's executors): `base.Executor` and one
subclass per engine that already schedules work, `LocalExecutor` (processes on this machine),
`SlurmExecutor` (sbatch job arrays), `RayExecutor` (long-lived actors). Each decides only which
worker takes which shards and how a lost worker comes back; whether a shard, a stage or a round is
done is answered by the run directory's records alone, so any executor resumes what another began."""

from pipeline.executors.base import Executor, Job, plan_jobs, require_extra

__all__ = ["Executor", "Job", "plan_jobs", "require_extra"]
