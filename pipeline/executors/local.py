"""Local: worker i of N is the stage command with `--worker i/N`, a process on this machine; the
N processes of a job run side by side and the next job starts when all of them exited 0. A lost
worker does not come back by itself: run the same command again, which plans only what the records
lack (as after a kill -9 of a stage command)."""

from __future__ import annotations

import shlex
import signal
import subprocess
from typing import Sequence

from pipeline.errors import Preempted, UserError
from pipeline.executors.base import Executor, Job


class LocalExecutor(Executor):
    name = "local"

    def launch(self, jobs: Sequence[Job], echo=print) -> list[str]:
        finished = []
        for job in jobs:
            workers = [f"{i}/{job.workers}" if job.sharded else None for i in range(job.workers)]
            cmds = [self.command(job, w) for w in workers]
            for cmd in cmds:
                echo(f"$ {shlex.join(cmd)}")
            procs = [subprocess.Popen(cmd) for cmd in cmds]
            try:
                codes = [p.wait() for p in procs]
            except Preempted:  # our SIGTERM: pass it on, let each worker leave its shard cleanly
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait()
                raise
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            if any(c == Preempted.exit_code for c in codes):
                raise Preempted()
            failed = [f"{shlex.join(cmd[2:])} (exit {c})" for cmd, c in zip(cmds, codes) if c != 0]
            if failed:
                raise UserError(f"{job.name} failed: {'; '.join(failed)}; its message is above. Fix it and run the "
                                f"same command again: finished shards are kept")
            finished.append(job.name)
        return finished
