"""Running a sharded stage: claim shards, do them, record them. Shared by rollout and score-teacher.

Resumability: a shard is done iff the manifest records it (and its file exists). A restarted
stage redoes only the rest, and because every shard's randomness derives from (run seed, stage,
round, shard/prompt), the redone rows equal those of an uninterrupted run.

Workers: each shard is claimed through `pipeline.storage.claim` (an fcntl lock locally, released
by the OS when the holder exits or is killed; on a bucket a lease object, renewed while held and
taken over once expired), so any number of processes can run the same stage command at once and
no live worker's shard is done twice; a killed worker's shard is redone by another. `--worker I/N`
additionally restricts a process to shards i with i % N == I (a static split across machines).

Writing: one writer thread encodes, compresses, writes and records shard i while the engine
computes shard i + 1 (on a GPU the CPU work is then off the critical path; bench/end_to_end.py).
A SIGTERM waits for the shard in the writer; a kill -9 leaves a temporary file (removed on
restart) or a renamed, unrecorded shard (adopted on restart), as before.

Following: a stage may read its upstream stage while another thread of this process still writes
it (the persistent `run` scores rollout shard i while vLLM generates shard i + 1). `Follow` waits
for each upstream shard's record; the stage's plan then names the upstream shards it has seen so
far (`growing`), and is complete, exactly as a stage run after its upstream writes it, once every
shard is done.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
from tqdm.auto import tqdm

from pipeline import storage
from pipeline.errors import UserError
from pipeline.shards import GrowingManifest, Manifest, info_of_shard, remove_stale_tmp, shard_index, shard_name, write_shard
from pipeline.signals import PREEMPTION
from pipeline.storage import Claim, Location

TEST_PAUSE_ENV = "EOPD_TEST_PAUSE"


def test_pause(point: str, index: int, stage: str | None = None) -> None:
    """Fault injection for the kill tests: with EOPD_TEST_PAUSE=POINT:INDEX[:SECONDS] the process
    announces itself on stderr and sleeps there (default an hour), so a test can kill it at that point.
    A point of a stage's shard loop also answers to STAGE.POINT (e.g. teacher.shard_compute), for
    tests where stages run side by side in one process. With EOPD_TEST_PAUSE_ONCE=FILE only the first
    process to reach the point pauses (it creates FILE): a requeued or restarted one goes on."""
    spec = os.environ.get(TEST_PAUSE_ENV, "").split(":")
    if spec[:2] == [f"{stage}.{point}", str(index)]:
        point = spec[0]
    if spec[:2] == [point, str(index)]:
        once = os.environ.get(TEST_PAUSE_ENV + "_ONCE")  # a file: pause only the first process to get here
        if once:
            try:
                open(once, "x").close()
            except FileExistsError:
                return
        # The terminal's stderr, not a log: `run` sends its stages' output to RUN_DIR/logs/run.log,
        # and the kill tests wait for this line on the process's stderr.
        from pipeline.logs import terminal_stderr

        print(f"{TEST_PAUSE_ENV} reached {point}:{index}", file=terminal_stderr(), flush=True)
        deadline = time.monotonic() + (float(spec[2]) if len(spec) > 2 else 3600)
        while time.monotonic() < deadline and not PREEMPTION.requested:  # a SIGTERM ends the pause (threads too)
            time.sleep(0.05)



def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (run seed, stage, round, shard, ...): stable across processes and machines."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    count: int

    @staticmethod
    def parse(text: str | None) -> "WorkerSpec | None":
        if text is None:
            return None
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise UserError(f"--worker {text!r}: expected I/N with integers, e.g. --worker 0/4") from None
        if not (n >= 1 and 0 <= i < n):
            raise UserError(f"--worker {text!r}: need 0 <= I < N, e.g. --worker 0/4 .. 3/4")
        return WorkerSpec(i, n)

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index


@dataclass
class ShardResult:
    table: pa.Table | Callable[[], pa.Table]  # or a function that builds it, run in the writer thread
    tokens: int  # tokens produced/processed, for the tokens/s readout
    engine_seconds: float = 0.0  # inside the model engine (vLLM, teacher forward), for bench/end_to_end.py


@dataclass
class StageSummary:
    stage_dir: Location
    num_shards: int
    done_now: list[int] = field(default_factory=list)
    done_before: list[int] = field(default_factory=list)
    busy_elsewhere: list[int] = field(default_factory=list)  # claimed by another live worker
    tokens: int = 0
    seconds: float = 0.0  # computing shards, model load excluded
    load_seconds: float = 0.0
    engine_seconds: float = 0.0
    wall_seconds: float = 0.0
    complete: bool = False


ShardFn = Callable[[int], ShardResult]


@dataclass
class ShardWorker:
    """What run_shards drives once the model is loaded.

    `finish(i)` computes shard i and returns its rows. An engine that works on many requests at
    once (vLLM's continuous batching) also gives `start(i)`, which only queues shard i's work:
    run_shards then claims the next shard and starts it before finishing the current one, so the
    engine refills its batch from the next shard instead of draining at every shard boundary.
    """
    finish: ShardFn
    start: Callable[[int], None] | None = None


class Stopped(Exception):
    """run_shards was asked to stop (its `stop` event set) between shards."""


class Follow:
    """An upstream stage that another thread of this process is still writing: `record(i)` waits
    until shard i is in its manifest (polling: every 10 ms, as each round waits for its shards once or
    twice and a round of the toy takes about 2 s), and stops with the writer's error as soon as
    `check()` raises one (it fails, is stopped, or ends without finishing the stage)."""

    def __init__(self, stage_dir: Location, check: Callable[[], None], poll_seconds: float | None = None) -> None:
        # A bucket answers in milliseconds too, but each poll is a billed GET: 4 a second there.
        if poll_seconds is None:
            poll_seconds = 0.25 if storage.is_remote(stage_dir) else 0.01
        self.manifest, self.check, self.poll_seconds = Manifest(stage_dir), check, poll_seconds

    def data(self) -> dict[str, Any]:
        """The upstream manifest as it is now, once it exists (its shard count is then known)."""
        while (data := self.manifest.read_if_any()) is None:
            self._pause()
        return data

    def record(self, i: int) -> dict[str, Any]:
        while (record := self.data()["shards"].get(shard_name(i))) is None:
            self._pause()
        return record

    def _pause(self) -> None:
        self.check()
        time.sleep(self.poll_seconds)


@dataclass
class _Claim:
    shard: int
    lock: Claim
    adopt: bool  # the shard file is already in place (renamed, not recorded): record it, compute nothing


def run_shards(
    stage_dir: Location,
    num_shards: int,
    plan: dict[str, Any],
    open_worker: Callable[[], ShardFn | ShardWorker],
    file_metadata: dict[str, str],
    worker: WorkerSpec | None = None,
    desc: str = "shards",
    growing: str | None = None,
    stop: threading.Event | None = None,
) -> StageSummary:
    """Do every unfinished shard this process can claim.

    `open_worker()` loads the model (slow) and returns the function that computes one shard (or a
    ShardWorker); it is called only if there is a shard to do, so a finished stage costs no model load.
    `growing`: the plan key that names the upstream shards read (see GrowingManifest). `stop`: when
    set (by another thread), the stage raises `Stopped` before its next shard.
    """
    wall0 = time.perf_counter()
    manifest = Manifest(stage_dir) if growing is None else GrowingManifest(stage_dir, growing)
    recorded = {shard_index(name) for name in manifest.init(num_shards, plan)["shards"]}
    summary = StageSummary(stage_dir, num_shards)

    present = set(storage.names(stage_dir, "part-*.parquet"))  # one listing, not a lookup per shard
    for i in sorted(recorded):
        if shard_name(i) not in present:  # deleted by the user, e.g. after a checksum error
            manifest.forget(i)
            recorded.discard(i)
    mine = [i for i in range(num_shards) if worker is None or worker.owns(i)]
    summary.done_before = [i for i in mine if i in recorded]
    todo = collections.deque(i for i in mine if i not in recorded)
    # On a bucket a killed worker's shard stays claimed until its lease expires: wait for it (and
    # take it over) instead of ending the stage incomplete. Locally the OS frees a dead holder's lock.
    wait_for_busy = storage.is_remote(stage_dir)
    engine: ShardWorker | None = None

    def load() -> ShardWorker:
        nonlocal engine
        if engine is None:
            t0 = time.perf_counter()
            opened = open_worker()
            engine = opened if isinstance(opened, ShardWorker) else ShardWorker(finish=opened)
            summary.load_seconds = time.perf_counter() - t0
        return engine

    def claim_next(wait: bool) -> _Claim | None:
        """Claim the next shard of `todo` that nobody else holds or has finished. `wait`: when only
        shards claimed by others are left, wait for them (never while holding a claim of our own:
        two workers would wait for each other's shard)."""
        busy: list[int] = []
        while todo or (busy and wait and wait_for_busy):
            if not todo:  # only shards claimed by others are left: recheck them after a while
                if stop is not None and stop.is_set():
                    break
                time.sleep(min(storage.lease_seconds() / 4, 2.0))
                done = manifest.done()
                todo.extend(i for i in busy if i not in done)
                busy.clear()
                continue
            i = todo.popleft()
            # released by the writer thread after it records the shard
            lock = storage.claim(stage_dir / ".locks" / f"{shard_name(i)}.lock")
            if lock is None:
                busy.append(i)
                continue
            if i in manifest.done():  # finished by another worker since we listed the todo
                lock.release()
                continue
            final = stage_dir / shard_name(i)
            remove_stale_tmp(final)  # left by a killed predecessor
            # Complete whenever it has its final name: a predecessor died between writing and recording it.
            claim = _Claim(i, lock, adopt=storage.is_file(final))
            if not claim.adopt and load().start is not None:
                engine.start(i)
            todo.extendleft(reversed(busy))  # tried again after this one
            return claim
        summary.busy_elsewhere = sorted(set(busy))
        return None

    def commit(claim: _Claim, result: ShardResult | None) -> None:
        """Write + rename + record shard `claim.shard` (or record an adopted file), then unlock it.
        Runs in the writer thread: signals reach only the main thread, which waits for it."""
        i, final = claim.shard, stage_dir / shard_name(claim.shard)
        try:
            if result is None:
                info = info_of_shard(final)
            else:
                table = result.table() if callable(result.table) else result.table
                info = write_shard(final, table, file_metadata, tokens=result.tokens,
                                   before_rename=lambda: test_pause("shard_rename", i, stage_dir.name))
            test_pause("shard_record", i, stage_dir.name)
            manifest.record(i, info)
        except OSError as e:
            raise storage.store_error(final, "write", e) from None
        finally:
            claim.lock.release()

    # One writer thread: shard i is encoded, compressed, written and recorded while the engine
    # computes shard i + 1. At most one shard is in the writer, so memory stays bounded.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eopd-shard-writer")
    in_writer: tuple[Future, int, int] | None = None  # (future, shard, tokens)

    def wait_for_writer() -> None:
        nonlocal in_writer
        if in_writer is not None:
            future, shard, tokens = in_writer
            future.result()  # the writer's error, if any, surfaces here
            in_writer = None
            summary.done_now.append(shard)
            summary.tokens += tokens
            bar.update(1)
            if summary.seconds > 0:
                bar.set_postfix(tok_s=f"{summary.tokens / summary.seconds:,.0f}")

    claims: list[_Claim] = []  # claimed, in order; at most two when the engine can start ahead
    bar = tqdm(total=len(mine), initial=len(summary.done_before), desc=desc, unit="shard", dynamic_ncols=True)
    try:
        while True:
            if stop is not None and stop.is_set():
                raise Stopped()
            if not claims and (c := claim_next(wait=True)) is not None:
                claims.append(c)
            if not claims:
                break
            if len(claims) == 1 and not claims[0].adopt and engine.start is not None:
                if (c := claim_next(wait=False)) is not None:  # queued behind the current shard (see ShardWorker)
                    claims.append(c)
            claim, result = claims[0], None
            if not claim.adopt:
                t0 = time.perf_counter()  # after the model load: tokens/s is the steady rate
                result = engine.finish(claim.shard)  # a SIGTERM up to here abandons the shard: nothing is on disk yet
                summary.seconds += time.perf_counter() - t0
                summary.engine_seconds += result.engine_seconds
            wait_for_writer()
            if result is not None:
                test_pause("shard_compute", claim.shard, stage_dir.name)  # the previous shard is recorded by now
            in_writer = (writer.submit(commit, claim, result), claim.shard, result.tokens if result else 0)
            claims.pop(0)  # from here the writer releases its lock
        wait_for_writer()
    finally:
        # A SIGTERM or an error: the shard in the writer is finished first (never cut between
        # write and record); shards claimed but not computed are freed for other workers. Signals
        # reach only the main thread: a stage run in another thread defers nothing.
        main = threading.current_thread() is threading.main_thread()
        with PREEMPTION.deferred() if main else nullcontext():
            writer.shutdown(wait=True)
        for c in claims:
            c.lock.release()
        bar.close()
    summary.complete = manifest.is_complete()
    summary.wall_seconds = time.perf_counter() - wall0
    if summary.done_now:
        record_timing(stage_dir.parent, stage_dir.name, summary.wall_seconds, summary.load_seconds,
                      summary.engine_seconds)
    return summary


def record_timing(round_dir: Location, stage: str, wall: float, load: float, engine: float) -> None:
    """One line per stage execution in ROUND/timings.jsonl: where a round's time went (model
    load, engine compute, the rest), for `bench/rounds.py` and anyone asking why a round is slow.
    On a bucket the append (a GET and a conditional PUT) is left to a background thread, off the
    round's critical path; it is written by the time the process exits (a kill may lose it)."""
    line = {"stage": stage, "end": time.time(), "wall_s": round(wall, 4), "load_s": round(load, 4),
            "engine_s": round(engine, 4), "pid": os.getpid()}
    if "torch" in sys.modules:  # config cpu_threads, or torch's default: part of why a round is slow
        line["torch_threads"] = sys.modules["torch"].get_num_threads()
    path, text = round_dir / "timings.jsonl", json.dumps(line) + "\n"
    if not storage.is_remote(path):
        storage.append_text(path, text)
        return
    global _timings_writer
    with _timings_lock:
        if _timings_writer is None:  # one thread, so one process's lines keep their order
            _timings_writer = ThreadPoolExecutor(1, thread_name_prefix="eopd-timings")  # joined at exit
        _timings_writer.submit(_append_or_warn, path, text)


_timings_writer: ThreadPoolExecutor | None = None
_timings_lock = threading.Lock()


def _append_or_warn(path: Location, text: str) -> None:
    try:
        storage.append_text(path, text)
    except Exception as e:  # a diagnostic line: say so once, never stop the run for it
        print(f"warning: a timing line was not written to {path}: {e}", file=sys.stderr)
