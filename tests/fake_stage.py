"""A sharded stage with a cheap deterministic shard function, run as a real process by test_runner.py.

usage: python tests/fake_stage.py STAGE_DIR NUM_SHARDS [I/N]
env: FAKE_SHARD_SECONDS (work per shard), FAKE_OVERLAP=1 (a ShardWorker that starts shards ahead,
     like rollout's; every start/finish is printed as "EVENT start|finish I"),
     FAKE_BUILD_SECONDS (the table is built by a function, in the writer thread, as score-teacher's
     is; prints "EVENT build-start|build-end I"), FAKE_FAIL_BUILD=I (building shard I raises)
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.cli import handle_errors
from pipeline.work import ShardResult, ShardWorker, WorkerSpec, derive_seed, run_shards


def event(what: str, i: int) -> None:
    # One write per line: the writer thread prints too, and print() writes a line in pieces.
    sys.stdout.write(f"EVENT {what} {i}\n")
    sys.stdout.flush()


@handle_errors
def main(stage_dir: str, num_shards: str, worker: str | None = None) -> None:
    delay = float(os.environ.get("FAKE_SHARD_SECONDS", "0"))

    overlap = os.environ.get("FAKE_OVERLAP") == "1"
    build_seconds = os.environ.get("FAKE_BUILD_SECONDS")
    fail_build = int(os.environ.get("FAKE_FAIL_BUILD", "-1"))

    def open_worker():
        def compute(i: int) -> ShardResult:
            event("finish", i)
            time.sleep(delay)
            values = np.random.default_rng(derive_seed(1, "fake", i)).integers(0, 1000, size=200)
            table = pa.table({"shard": pa.array([i] * 200, pa.int32()), "value": values})
            if build_seconds is None:
                return ShardResult(table, tokens=200)

            def build() -> pa.Table:
                event("build-start", i)
                time.sleep(float(build_seconds))
                if i == fail_build:
                    raise OSError(f"simulated write failure in shard {i}")
                event("build-end", i)
                return table
            return ShardResult(build, tokens=200)
        if not overlap:
            return compute
        return ShardWorker(finish=compute, start=lambda i: event("start", i))

    s = run_shards(Path(stage_dir), int(num_shards), {"fake": True}, open_worker, {"stage": "fake"},
                   WorkerSpec.parse(worker), desc="fake")
    print("DONE_NOW", " ".join(map(str, s.done_now)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
