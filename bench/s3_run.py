"""The run directory on object storage (#21): the persistent `run` on a local S3 server vs on local disk.

    nice -n 10 python bench/s3_run.py --assets toy-assets [--rounds 20] [--slice 15]

Both sides run the embedded default (configs/default.yaml: 128 prompts x 1 rollout, 8 optimiser
steps of 16 responses per round) for --rounds rounds with eval off (eval.models=[]), one with
RUN_DIR on local disk and one with RUN_DIR=s3://BUCKET/run on a SeaweedFS server started here
(tests/s3server.py; same disk, loopback), configured only through the standard AWS_* variables.

Fair under a shared, loaded host: the two `run` process groups are started together and time-sliced
(SIGSTOP/SIGCONT of the whole group, --slice seconds each, alternating), so both see the same
background load, and only one runs at any moment. Each side's clock counts only its own slices:
a round's wall time is the active time between the end of the previous round's last stage and
the end of its own (ROUND/timings.jsonl), round 0 from the process start.

Also measured:
- store calls per round, by storage-layer method (EOPD_STORAGE_STATS, counted in pipeline/storage.py)
  and by S3 request and object kind with bytes (s3fs's `_call_s3`, and `call_s3` made from it, counted
  by a sitecustomize hook in the S3 side's processes; one count per request, botocore's own retries
  not counted), and summed by HTTP method. Per round =
  (calls of the N-round run - calls of a 1-round run) / (N - 1), so the start-up is left out.
- which thread waited for those requests, and how long (the same hook: the thread that called
  fsspec's `sync` goes with each request): the main thread's requests are on the persistent run's
  critical path, a background thread's only where the main thread waits for it. Only the seconds
  the S3 side ran count (a request in flight when its slice ended would count the local side's too).
- shard write and read throughput: `storage.write_bytes`/`read_bytes` of the run's real shard
  bytes (and of a student's model.safetensors) on both, alternating local and S3 per repeat.
- that both sides wrote identical students (the storage layer must not change the run).

    python bench/s3_run.py --assets toy-assets --shard-scan

instead measures what one more shard costs: round 0's `rollout` and `score-teacher` stage commands
on the bucket with the round's 128 prompts in 1 shard and in 16 shards (rollout.prompts_per_shard
128 vs 8); per shard = (16-shard calls - 1-shard calls) / 15, by method and by request, with the
manifest.json bytes each shard moves (the manifest grows by one record per shard).

    python bench/s3_run.py --assets toy-assets --worker-scan 2

instead measures what more workers cost: round 0's `rollout` and `score-teacher` stage commands on the
bucket (16 shards each) done by one process, by W processes started together with `--worker i/W`,
and by W processes that split the shards by leases alone (no --worker): requests per stage, and per
further worker.

Prints a table of ratios s3 / local; --json writes every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# Counts each S3 request of a process (s3fs's one entry point, `S3FileSystem._call_s3`, and its
# blocking form `call_s3`, which pipeline/storage.py calls directly) by
# operation and object kind, with the bytes sent (PUT bodies) and received (GET ContentLength).
# Installed by an import hook so that processes that never touch s3fs (vLLM's engine) pay nothing.
HOOK = textwrap.dedent('''
    import atexit, contextvars, importlib.abc, importlib.util, json, os, sys, threading, time

    _OUT = os.environ.get("EOPD_BENCH_REQUESTS")
    _COUNTS = {}
    _TIMES = []  # [thread, "op kind", start, end] (wall clock) of every request: which thread waited for which
    _THREAD = contextvars.ContextVar("eopd_bench_thread", default="?")

    def _thread_name():
        # without the round or the pool index: eopd-rollout-round-3 -> eopd-rollout
        return threading.current_thread().name.split("-round-")[0].split("_")[0]

    def _patch_sync():
        # A request runs on fsspec's event-loop thread; the thread that waits for it is the one that
        # called `sync`: its name goes with the coroutine.
        import fsspec.asyn as fa
        orig = fa.sync

        def sync(loop, func, *args, timeout=None, **kwargs):
            name = _thread_name()

            async def run():
                _THREAD.set(name)
                return await func(*args, **kwargs)
            return orig(loop, run, timeout=timeout)
        fa.sync = sync

    def _kind(key):
        if key is None:
            return "bucket"
        name = key.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".parquet"):
            return "shard"
        if name.endswith(".lock"):
            return "lease"
        if name in ("manifest.json", "timings.jsonl", "metrics.jsonl"):
            return name
        for part in ("/student", "/checkpoints/", "/report/", "/logs/"):
            if part in "/" + key:
                return part.strip("/")
        return "other"

    def _patch(module):
        cls = module.S3FileSystem
        orig = cls._call_s3

        async def _call_s3(self, method, *args, **kwargs):
            op = method if isinstance(method, str) else getattr(method, "__name__", str(method))
            kw = {}
            for a in args:
                if isinstance(a, dict):
                    kw.update(a)
            kw.update(kwargs)
            key = f"{op} {_kind(kw.get('Key', kw.get('Prefix')))}"
            rec = _COUNTS.setdefault(key, [0, 0, 0])
            rec[0] += 1
            body = kw.get("Body")
            if isinstance(body, (bytes, bytearray, memoryview)):
                rec[1] += len(body)
            t0 = time.time()
            try:
                out = await orig(self, method, *args, **kwargs)
            finally:
                _TIMES.append([_THREAD.get(), key, t0, time.time()])
            if op == "get_object" and isinstance(out, dict):
                rec[2] += int(out.get("ContentLength") or 0)
            return out
        cls._call_s3 = _call_s3
        # `call_s3`, the blocking form that pipeline/storage.py calls directly (its one-GET reads, HEADs,
        # listings), was made from the original `_call_s3` when the class was defined: without this it
        # would go uncounted.
        from fsspec.asyn import sync_wrapper
        cls.call_s3 = sync_wrapper(_call_s3)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "s3fs.core":
                return None
            sys.meta_path.remove(self)
            _patch_sync()  # before s3fs.core imports `sync` by name
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)
            spec.loader.exec_module = exec_module
            return spec

    def _dump():
        if _COUNTS:
            with open(_OUT, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "requests": _COUNTS, "times": _TIMES}) + "\\n")

    if _OUT:
        sys.meta_path.insert(0, _Finder())
        atexit.register(_dump)
''')


def failed(returncode: int, output: str, what: str) -> bool:
    """True for a failure. (The log-upload TypeError of 4612caa that this once tolerated is fixed:
    pipeline/logs.py log_path keeps a bucket location as it is.)"""
    return returncode != 0


class Side:
    """One `eopd-pipe run` process group, time-sliced: `intervals` are its running (start, end) times."""

    def __init__(self, name: str, run_dir: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.run_dir, self.cmd, self.env, self.log = name, run_dir, cmd, env, log
        self.proc: subprocess.Popen | None = None
        self.intervals: list[list[float]] = []
        self.exit_time: float | None = None

    @property
    def done(self) -> bool:
        return self.exit_time is not None

    def resume(self) -> None:
        now = time.time()
        if self.proc is None:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=open(self.log, "ab"),
                                         stderr=subprocess.STDOUT, start_new_session=True)
        else:
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.intervals.append([now, now])

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.intervals[-1][1] = time.time()

    def poll(self) -> bool:
        """True once the process has exited (its last interval then ends at its exit)."""
        if self.proc.poll() is None:
            return False
        self.exit_time = time.time()
        self.intervals[-1][1] = self.exit_time
        if failed(self.proc.returncode, out := self.log.read_text(errors="replace"), self.name):
            tail = out[-3000:]
            raise SystemExit(f"{self.name}: `{' '.join(self.cmd)}` failed (exit {self.proc.returncode}):\n{tail}")
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
            self.proc.wait()

    def active(self, t: float) -> float:
        """Seconds this side ran between its start and wall-clock time t."""
        return sum(max(0.0, min(b, t) - a) for a, b in self.intervals if a < t)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_sliced(sides: list[Side], slice_s: float) -> None:
    """Run the sides one at a time, `slice_s` seconds each in turn, until all have exited."""
    turn = 0
    try:
        while not all(s.done for s in sides):
            side = sides[turn % len(sides)]
            turn += 1
            if side.done:
                continue
            side.resume()
            others_left = any(not s.done for s in sides if s is not side)
            t_end = time.time() + slice_s
            while not side.poll():
                if others_left and time.time() >= t_end:
                    side.pause()
                    break
                time.sleep(0.1)
    finally:
        for s in sides:
            s.kill()


def run_cmd(run_dir: str, assets: Path, rounds: int, command: str = "run", extra: tuple[str, ...] = ()) -> list[str]:
    sets = [*extra, f"rounds={rounds}", "eval.models=[]", f"student.path={assets}/student", f"teacher.path={assets}/teacher",
            f"prompts.path={assets}/train_prompts.jsonl", f"eval.prompts.path={assets}/eval_prompts.jsonl"]
    return [sys.executable, "-m", "pipeline.cli", command, run_dir] + [a for s in sets for a in ("--set", s)]


def round_walls(side: Side, rounds: int) -> list[float]:
    """Active seconds per round: from the end of round r-1's last stage (round 0: the start) to round r's."""
    from pipeline import storage

    root = storage.location(side.run_dir)
    walls, prev = [], 0.0
    for r in range(rounds):
        lines = [json.loads(x) for x in storage.read_text(root / f"round-{r:04d}" / "timings.jsonl").splitlines() if x]
        end = side.active(max(x["end"] for x in lines))
        walls.append(end - prev)
        prev = end
    return walls


def stage_sums(side: Side, rounds: int) -> dict[str, float]:
    """Per stage, its active seconds (ROUND/timings.jsonl's end and wall, less the other side's slices)
    summed over rounds 1..R-1: which stage the bucket makes slower (rollouts and teacher overlap)."""
    from pipeline import storage

    root, out = storage.location(side.run_dir), {}
    for r in range(1, rounds):
        for x in storage.read_text(root / f"round-{r:04d}" / "timings.jsonl").splitlines():
            if x:
                line = json.loads(x)
                active = side.active(line["end"]) - side.active(line["end"] - line["wall_s"])
                out[line["stage"]] = out.get(line["stage"], 0.0) + active
    return out


def students(run_dir: str, rounds: int) -> list[str]:
    from pipeline import storage

    root = storage.location(run_dir)
    return [hashlib.sha256(storage.read_bytes(root / f"round-{r:04d}" / "student" / "model.safetensors")).hexdigest()
            for r in range(rounds)]


def sum_jsonl(path: Path, field: str) -> dict:
    """The per-process counts of a stats file, summed (storage-layer calls: int; requests: [n, up, down])."""
    total: dict = {}
    if not path.exists():
        return total
    for line in path.read_text().splitlines():
        for k, v in json.loads(line)[field].items():
            if k == "_":
                continue
            if isinstance(v, list):
                total[k] = [a + b for a, b in zip(total.get(k, [0] * len(v)), v)]
            else:
                total[k] = total.get(k, 0) + v
    return total


def waits(path: Path, side: Side | None = None) -> dict[str, list[float]]:
    """"thread op kind" -> [requests, seconds waited] of the request hook's records; with `side`, only
    the seconds that side ran (a request in flight when its slice ended would count the other's too)."""
    out: dict[str, list[float]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        for thread, key, t0, t1 in json.loads(line).get("times", []):
            rec = out.setdefault(f"{thread} {key}", [0, 0.0])
            rec[0] += 1
            rec[1] += side.active(t1) - side.active(t0) if side is not None else t1 - t0
    return out


def per_round(full: dict, base: dict, rounds: int) -> dict:
    out = {}
    for k in sorted(set(full) | set(base)):
        a, b = full.get(k, 0), base.get(k, 0)
        if isinstance(a, list) or isinstance(b, list):
            a, b = a or [0, 0, 0], b or [0, 0, 0]
            out[k] = [(x - y) / (rounds - 1) for x, y in zip(a, b)]
        else:
            out[k] = (a - b) / (rounds - 1)
    return out


# s3fs's operations as HTTP requests (a multipart upload's parts are PUTs, its start and end POSTs).
METHODS = {"head_object": "HEAD", "get_object": "GET", "put_object": "PUT", "list_objects_v2": "LIST",
           "list_objects": "LIST", "delete_object": "DELETE", "delete_objects": "DELETE", "copy_object": "PUT",
           "upload_part": "PUT", "create_multipart_upload": "POST", "complete_multipart_upload": "POST",
           "head_bucket": "HEAD"}


def by_method(reqs: dict) -> dict[str, list[float]]:
    """Request counts and bytes ([n, sent, received]) summed by HTTP method."""
    out: dict[str, list[float]] = {}
    for k, v in reqs.items():
        op = k.split(" ", 1)[0]
        m = METHODS.get(op, op)
        out[m] = [a + b for a, b in zip(out.get(m, [0, 0, 0]), v)]
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def method_line(reqs: dict) -> str:
    return ", ".join(f"{m} {v[0]:.1f}" for m, v in by_method(reqs).items())


def print_waits(waited: dict) -> None:
    """Seconds per round that each thread waited for S3 requests (the request hook), by object kind:
    the main thread's are on the persistent run's critical path, a background thread's only where
    the main thread waits for it (the rollout thread while the teacher follows it, the shard writer).
    Requests sent at once (a directory's files) each count in full: their sum exceeds the wait."""
    threads: dict[str, dict[str, list[float]]] = {}
    for key, (n, s) in waited.items():
        thread, op, kind = key.split(" ")
        t = threads.setdefault(thread, {})
        rec = t.setdefault(kind, [0.0, 0.0, {}])
        rec[0] += n
        rec[1] += s
        rec[2][op] = rec[2].get(op, 0) + n
    print("seconds per round waiting for S3 requests, by thread and object (requests, s; by operation):")
    for thread, kinds in sorted(threads.items(), key=lambda kv: -sum(v[1] for v in kv[1].values())):
        print(f"  {thread}: {sum(v[1] for v in kinds.values()):.3f} s in {sum(v[0] for v in kinds.values()):.1f} requests")
        for kind, (n, s, ops) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
            detail = ", ".join(f"{op} {c:.1f}" for op, c in sorted(ops.items(), key=lambda kv: -kv[1]) if abs(c) > 0.05)
            print(f"    {kind:16s} {n:6.1f} {s:7.3f}   {detail}")


def throughput(roots: dict, blobs: dict[str, list[bytes]], repeats: int) -> dict:
    """MB/s and ms per object of storage.write_bytes then read_bytes of `blobs`, on each root in turn
    (alternating the order per repeat), each object under a new name."""
    from pipeline import storage

    out: dict = {name: {kind: {"write_s": 0.0, "read_s": 0.0, "bytes": 0, "ops": 0} for kind in blobs} for name in roots}
    for rep in range(repeats):
        order = list(roots) if rep % 2 == 0 else list(roots)[::-1]
        for name in order:
            for kind, items in blobs.items():
                rec, d = out[name][kind], roots[name] / "throughput" / f"{kind}-{rep}"
                t0 = time.perf_counter()
                for i, b in enumerate(items):
                    storage.write_bytes(d / f"obj-{i:05d}", b)
                rec["write_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                for i, b in enumerate(items):
                    assert storage.read_bytes(d / f"obj-{i:05d}") == b
                rec["read_s"] += time.perf_counter() - t0
                rec["bytes"] += sum(map(len, items))
                rec["ops"] += len(items)
    for name in out:
        for rec in out[name].values():
            rec["write_MBps"] = rec["bytes"] / rec["write_s"] / 1e6
            rec["read_MBps"] = rec["bytes"] / rec["read_s"] / 1e6
            rec["write_ms"] = 1e3 * rec["write_s"] / rec["ops"]
            rec["read_ms"] = 1e3 * rec["read_s"] / rec["ops"]
            rec["mean_bytes"] = rec["bytes"] / rec["ops"]
    return out


def manifest_sizes(run_dir: str, rounds: int) -> dict[str, list[int]]:
    """Final manifest.json size and shard count of each stage, per round."""
    from pipeline import storage

    root, out = storage.location(run_dir), {}
    for stage in ("rollouts", "teacher"):
        sizes, shards = [], []
        for r in range(rounds):
            text = storage.read_text(root / f"round-{r:04d}" / stage / "manifest.json")
            sizes.append(len(text.encode()))
            shards.append(len(json.loads(text)["shards"]))
        out[stage] = {"bytes": sizes, "shards": shards}
    return out


def shard_scan(bucket: str, assets: Path, s3_env) -> dict:
    """Store calls and requests per extra shard of round 0's rollout + score-teacher (1 vs 16 shards)."""
    from pipeline import storage

    got = {}
    for shards in (1, 16):
        url, tag = f"s3://{bucket}/scan-{shards}", f"scan-{shards}"
        env = s3_env(tag)
        for command in ("rollout", "score-teacher"):
            cmd = run_cmd(url, assets, 1, command, (f"rollout.prompts_per_shard={128 // shards}",)) + ["--round", "0"]
            res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if failed(res.returncode, res.stderr, f"{command} ({shards} shards)"):
                sys.exit(f"`{' '.join(cmd)}` failed:\n{res.stderr[-3000:]}")
        root = storage.location(url) / "round-0000"
        sizes = {stage: len(storage.read_bytes(root / stage / "manifest.json")) for stage in ("rollouts", "teacher")}
        got[shards] = (sum_jsonl(Path(env["EOPD_STORAGE_STATS"]), "calls"),
                       sum_jsonl(Path(env["EOPD_BENCH_REQUESTS"]), "requests"), sizes)
        print(f"{shards} shard(s) per stage: manifests {sizes} bytes", flush=True)
    calls, reqs = per_round(got[16][0], got[1][0], 16), per_round(got[16][1], got[1][1], 16)
    record = {stage: (got[16][2][stage] - got[1][2][stage]) / 15 for stage in ("rollouts", "teacher")}
    return {"calls_per_shard": calls, "requests_per_shard": reqs, "manifest_bytes": {k: v[2] for k, v in got.items()},
            "manifest_bytes_per_record": record}


def worker_scan(bucket: str, assets: Path, s3_env, workers: int, shards: int = 16) -> dict:
    """Requests of round 0's `rollout` and `score-teacher` stage commands (`shards` shards each) done by
    one process, by `workers` processes started together with a static split (`--worker i/W`, as
    `launch local` and `launch slurm` run them), and by `workers` processes that split the shards by
    leases alone (no --worker)."""
    setups = [("1 process", 1, False), (f"{workers} processes, --worker i/{workers}", workers, True),
              (f"{workers} processes, leases only", workers, False)]
    got: dict = {}
    for n, (label, w, static) in enumerate(setups):
        url, got[label] = f"s3://{bucket}/wscan-{n}", {}
        for command in ("rollout", "score-teacher"):
            env = s3_env(f"wscan-{n}-{command}")
            cmd = run_cmd(url, assets, 1, command, (f"rollout.prompts_per_shard={128 // shards}",)) + ["--round", "0"]
            procs = [subprocess.Popen(cmd + (["--worker", f"{i}/{w}"] if static else []), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(w)]
            for proc in procs:
                out, err = proc.communicate()
                if failed(proc.returncode, err, f"{command} ({label})"):
                    sys.exit(f"`{' '.join(proc.args)}` failed:\n{err[-3000:]}")
            got[label][command] = sum_jsonl(Path(env["EOPD_BENCH_REQUESTS"]), "requests")
        print(f"{label}: done", flush=True)
    return {"workers": workers, "shards": shards, "requests": got}


def print_worker_scan(scan: dict) -> None:
    w, shards = scan["workers"], scan["shards"]
    print(f"\nS3 requests of round 0's stage commands, {shards} shards per stage (count; manifest.json GETs, MB received):")
    totals = {}
    for label, stages in scan["requests"].items():
        for command, reqs in stages.items():
            n = sum(v[0] for v in reqs.values())
            totals[(label, command)] = n
            mget = reqs.get("get_object manifest.json", [0, 0, 0])
            print(f"  {label:34s} {command:14s} {n:7.0f}   manifest GETs {mget[0]:5.0f} {mget[2] / 1e6:7.3f} MB   "
                  f"by method: {method_line(reqs)}")
    single, static, leases = list(scan["requests"])
    for command in ("rollout", "score-teacher"):
        per_worker = (totals[(static, command)] - totals[(single, command)]) / (w - 1)
        visits = (totals[(leases, command)] - totals[(static, command)]) / ((w - 1) * shards)
        print(f"  {command}: each further worker with --worker adds {per_worker:.1f} requests (its start-up); "
              f"without --worker it adds {visits:.2f} more per shard (it visits the shards the others do)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=REPO / "toy-assets", help="built by `eopd-pipe make-toy DIR`")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of each side's run (the default config has 200)")
    ap.add_argument("--slice", type=float, default=15.0, help="seconds each side runs in turn")
    ap.add_argument("--repeats", type=int, default=6, help="repeats of the throughput measurement")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--shard-scan", action="store_true", help="only measure the store calls per extra shard (see above)")
    ap.add_argument("--worker-scan", type=int, metavar="W",
                    help="only measure round 0's stage commands done by 1 process and by W processes at once (see above)")
    args = ap.parse_args()
    assets = args.assets.resolve()
    for need in ("teacher", "student", "train_prompts.jsonl", "eval_prompts.jsonl"):
        if not (assets / need).exists():
            sys.exit(f"{assets / need} is missing: build the assets with `eopd-pipe make-toy {args.assets}`")
    if args.rounds < 2:
        sys.exit("--rounds must be at least 2 (per-round calls are the difference to a 1-round run)")
    from s3server import SeaweedS3

    from pipeline import storage

    with tempfile.TemporaryDirectory(prefix="eopd-s3bench-") as tmp_s:
        tmp = Path(tmp_s)
        server = SeaweedS3(tmp / "seaweed").start()
        try:
            os.environ.update(server.env)  # the bench reads the bucket too
            bucket = server.bucket()
            (tmp / "hook").mkdir()
            (tmp / "hook" / "sitecustomize.py").write_text(HOOK)
            base_env = {**os.environ, "PYTHONPATH": f"{tmp / 'hook'}:{REPO}", "VLLM_LOGGING_LEVEL": "WARNING",
                        "TOKENIZERS_PARALLELISM": "false", **server.env}

            def s3_env(tag: str) -> dict[str, str]:
                return {**base_env, "EOPD_STORAGE_STATS": str(tmp / f"calls-{tag}.jsonl"),
                        "EOPD_BENCH_REQUESTS": str(tmp / f"requests-{tag}.jsonl"),
                        "EOPD_CACHE_DIR": str(tmp / f"cache-{tag}")}

            if args.worker_scan:
                if args.worker_scan < 2:
                    sys.exit("--worker-scan W needs W >= 2")
                scan = worker_scan(bucket, assets, s3_env, args.worker_scan)
                print_worker_scan(scan)
                if args.json:
                    args.json.write_text(json.dumps(scan, indent=1))
                return

            if args.shard_scan:
                scan = shard_scan(bucket, assets, s3_env)
                print("\nstore calls per extra shard of rollout + score-teacher (storage layer):")
                for k, v in sorted(scan["calls_per_shard"].items(), key=lambda kv: -kv[1]):
                    print(f"  {k:16s} {v:8.2f}")
                print(f"  {'total':16s} {sum(scan['calls_per_shard'].values()):8.2f}")
                print("S3 requests per extra shard (count, kB sent, kB received):")
                for k, (n, up, down) in sorted(scan["requests_per_shard"].items(), key=lambda kv: -kv[1][0]):
                    print(f"  {k:34s} {n:8.2f} {up / 1e3:9.2f} {down / 1e3:9.2f}")
                tot = [sum(v[i] for v in scan["requests_per_shard"].values()) for i in range(3)]
                print(f"  {'total':34s} {tot[0]:8.2f} {tot[1] / 1e3:9.2f} {tot[2] / 1e3:9.2f}")
                print(f"by method: {method_line(scan['requests_per_shard'])}")
                print(f"manifest.json bytes per shard record: {scan['manifest_bytes_per_record']}")
                if args.json:
                    args.json.write_text(json.dumps(scan, indent=1))
                return

            # 1. the fixed part of the store calls: a 1-round run (start-up, config, report), not timed
            t0 = time.time()
            url1 = f"s3://{bucket}/run-1round"
            res = subprocess.run(run_cmd(url1, assets, 1), cwd=REPO, env=s3_env("1round"), capture_output=True, text=True)
            if failed(res.returncode, res.stderr, "1-round"):
                sys.exit(f"the 1-round run on {url1} failed:\n{res.stderr[-3000:]}")
            print(f"1-round run on the bucket (for the fixed store calls): {time.time() - t0:.0f} s", flush=True)

            # 2. both sides, time-sliced
            local_dir, url = str(tmp / "run-local"), f"s3://{bucket}/run"
            sides = [Side("s3", url, run_cmd(url, assets, args.rounds), s3_env("full"), tmp / "s3.log"),
                     Side("local", local_dir, run_cmd(local_dir, assets, args.rounds),
                          {**base_env, "EOPD_CACHE_DIR": str(tmp / "cache-local")}, tmp / "local.log")]
            t0, server_cpu0 = time.time(), cpu_seconds(server.proc.pid)
            time_sliced(sides, args.slice)
            # The server shares this machine's cores with the run it serves: its CPU is part of the cost here
            server_cpu = cpu_seconds(server.proc.pid) - server_cpu0
            print(f"both runs: {time.time() - t0:.0f} s of wall clock", flush=True)
            walls = {s.name: round_walls(s, args.rounds) for s in sides}
            stages = {s.name: stage_sums(s, args.rounds) for s in sides}
            totals = {s.name: s.active(s.exit_time) for s in sides}
            same = students(local_dir, args.rounds) == students(url, args.rounds)

            # 3. throughput of real shard bytes (and a student's weights)
            lroot, sroot = storage.location(local_dir), storage.location(url)
            blobs = {"shards": [storage.read_bytes(lroot / f"round-{r:04d}" / stage / name)
                                for r in range(args.rounds) for stage in ("rollouts", "teacher")
                                for name in storage.names(lroot / f"round-{r:04d}" / stage, "part-*.parquet")],
                     "student": [storage.read_bytes(lroot / "round-0000" / "student" / "model.safetensors")]}
            tput = throughput({"local": storage.location(str(tmp / "tput-local")), "s3": sroot.parent / "tput"},
                              blobs, args.repeats)

            calls = per_round(sum_jsonl(tmp / "calls-full.jsonl", "calls"), sum_jsonl(tmp / "calls-1round.jsonl", "calls"),
                              args.rounds)
            reqs = per_round(sum_jsonl(tmp / "requests-full.jsonl", "requests"),
                             sum_jsonl(tmp / "requests-1round.jsonl", "requests"), args.rounds)
            waited = per_round(waits(tmp / "requests-full.jsonl", sides[0]), waits(tmp / "requests-1round.jsonl"),
                               args.rounds)
            fixed_calls = sum(sum_jsonl(tmp / "calls-1round.jsonl", "calls").values())
            manifests = manifest_sizes(url, args.rounds)
        finally:
            server.stop()

    steady = {k: v[1:] for k, v in walls.items()}
    rows = [("round 0 (start-up + round)", walls["local"][0], walls["s3"][0]),
            (f"rounds 1-{args.rounds - 1}: mean", statistics.mean(steady["local"]), statistics.mean(steady["s3"])),
            (f"rounds 1-{args.rounds - 1}: median", statistics.median(steady["local"]), statistics.median(steady["s3"])),
            (f"rounds 1-{args.rounds - 1}: sum", sum(steady["local"]), sum(steady["s3"])),
            ("whole command", totals["local"], totals["s3"])]
    print(f"\n{args.rounds} rounds of the embedded default (eval off), time-sliced {args.slice:g} s; students identical: {same}")
    print(f"{'per-round wall (s, active)':34s} {'local':>9s} {'s3':>9s} {'s3/local':>9s}")
    for label, a, b in rows:
        print(f"{label:34s} {a:9.2f} {b:9.2f} {b / a:9.3f}x")
    per = [b / a for a, b in zip(steady["local"], steady["s3"])]
    print(f"per-round ratio over rounds 1-{args.rounds - 1}: min {min(per):.3f}, median {statistics.median(per):.3f}, "
          f"max {max(per):.3f}")
    print(f"the S3 server's CPU over both runs (it idles in the local side's slices): {server_cpu:.1f} s, "
          f"{server_cpu / args.rounds:.3f} s per round of the bucket run, {server_cpu / totals['s3']:.2f} of a core per "
          f"second of it")
    print(f"per stage, active seconds summed over rounds 1-{args.rounds - 1} (rollouts and teacher overlap):")
    for stage in sorted(stages["local"]):
        a, b = stages["local"][stage], stages["s3"].get(stage, float("nan"))
        print(f"  {stage:30s}   {a:9.2f} {b:9.2f} {b / a:9.3f}x")

    print(f"\n{'throughput (storage.write/read_bytes)':38s} {'local':>10s} {'s3':>10s} {'s3/local':>9s}")
    for kind in blobs:
        loc, s3 = tput["local"][kind], tput["s3"][kind]
        print(f"{kind} ({len(blobs[kind])} x {loc['mean_bytes'] / 1e3:.0f} kB), write MB/s"
              f"{'':3s} {loc['write_MBps']:10.1f} {s3['write_MBps']:10.1f} {s3['write_MBps'] / loc['write_MBps']:9.3f}")
        print(f"{kind}, read MB/s{'':28s} {loc['read_MBps']:10.1f} {s3['read_MBps']:10.1f} {s3['read_MBps'] / loc['read_MBps']:9.3f}")
        print(f"{kind}, ms per write / read{'':16s} {loc['write_ms']:5.1f}/{loc['read_ms']:4.1f} "
              f"{s3['write_ms']:5.1f}/{s3['read_ms']:4.1f}")

    print(f"\nstore calls per round (storage layer, EOPD_STORAGE_STATS; start-up: {fixed_calls} calls once):")
    for k, v in sorted(calls.items(), key=lambda kv: -kv[1]):
        print(f"  {k:16s} {v:8.1f}")
    print(f"  {'total':16s} {sum(calls.values()):8.1f}")
    print("S3 requests per round by operation and object (count, kB sent, kB received):")
    for k, (n, up, down) in sorted(reqs.items(), key=lambda kv: -kv[1][0]):
        print(f"  {k:34s} {n:8.1f} {up / 1e3:9.1f} {down / 1e3:9.1f}")
    print(f"  {'total':34s} {sum(v[0] for v in reqs.values()):8.1f} {sum(v[1] for v in reqs.values()) / 1e3:9.1f} "
          f"{sum(v[2] for v in reqs.values()) / 1e3:9.1f}")
    print(f"S3 requests per round by method: {method_line(reqs)}")
    print_waits(waited)
    for stage, m in manifests.items():
        print(f"{stage}/manifest.json: {statistics.mean(m['shards']):.1f} shards per round, "
              f"{statistics.mean(m['bytes']) / 1e3:.1f} kB at the end of a round")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "slice_s": args.slice, "walls": walls, "stages": stages,
                                    "server_cpu_s": server_cpu, "totals": totals,
                                         "students_identical": same, "throughput": tput, "calls_per_round": calls,
                                         "requests_per_round": reqs, "fixed_calls": fixed_calls,
                                         "manifests": manifests, "request_waits_per_round": waited}, indent=1))


if __name__ == "__main__":
    main()
