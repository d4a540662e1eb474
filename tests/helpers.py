"""Helpers for tests that overlap independent work: on a 2-core machine most of a CLI command's
wall time is one busy core (imports, vLLM's start-up, a tiny model's Python overhead), so a second
command beside it nearly halves the time of the pair. Only work that reads nothing the other
writes is overlapped; tests that kill a process at a chosen point still run it in the foreground."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

from conftest import CLI_ENV, REPO, cli_cmd


class Background:
    """Commands run one after another in one thread beside the test (one more busy core, not
    more). `submit` returns a Future of the CompletedProcess list; `close` ends what still runs."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tests-background")
        self._lock = threading.Lock()
        self._current: subprocess.Popen | None = None
        self._closed = False

    def submit(self, *commands: list[str], env: dict | None = None, timeout: float = 1800) -> Future:
        """Each command a full argv (see `cli`); the chain stops at the first non-zero exit."""
        return self._pool.submit(self._run_chain, commands, env or {}, timeout)

    def _run_chain(self, commands, env, timeout) -> list[subprocess.CompletedProcess]:
        done = []
        for cmd in commands:
            with self._lock:
                if self._closed:
                    raise RuntimeError("background closed")
                proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **CLI_ENV, "PYTHONPATH": str(REPO), **env},
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
                self._current = proc
            try:
                out, err = proc.communicate(timeout=timeout)
            finally:
                with self._lock:
                    self._current = None
                if proc.poll() is None:  # timed out, or closed meanwhile: nothing of it may outlive the chain
                    _kill_group(proc)
            done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
            if proc.returncode != 0:
                break
        return done

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._current is not None:
                _kill_group(self._current)
        self._pool.shutdown(wait=True, cancel_futures=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cli(*args) -> list[str]:
    """argv of `eopd-pipe ARGS` (for Background.submit)."""
    return cli_cmd(*args)


def all_ok(results: list[subprocess.CompletedProcess], count: int) -> list[subprocess.CompletedProcess]:
    """Assert a finished chain ran `count` commands, each exiting 0; name the first that did not."""
    for res in results:
        assert res.returncode == 0, (" ".join(map(str, res.args[2:])), failure_text(res.stderr))
    assert len(results) == count, [r.args for r in results]
    return results


def failure_text(stderr: str, tail: int = 3000) -> str:
    """What a failed command printed, for an assertion message: the first error block of any of its
    processes (vLLM's engine prints its root cause there, far above the caller's traceback) and the tail."""
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if "Traceback" in line or " ERROR " in line), None)
    head = "\n".join(lines[first:first + 40]) + "\n...\n" if first is not None else ""
    return head + stderr[-tail:]


def race(n: int, fn: Callable[[int], Any]) -> list:
    """fn(0) .. fn(n-1) in n threads released together by a barrier; their results in order."""
    out, barrier = [None] * n, threading.Barrier(n)

    def run(i):
        barrier.wait()
        out[i] = fn(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` set (a test server's endpoint and keys), restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_LEASE_HOLDER = """
import sys, time
from pipeline import storage
c = storage.claim(storage.location(sys.argv[1]))
print("held" if c is not None else "refused", flush=True)
sys.stdin.readline()  # the test says when to look again
time.sleep(2 * storage.lease_seconds() / 3)  # a renewal tries, and finds the lease taken over
print("lost" if c.lost else "kept", flush=True)
c.release()
print("released", flush=True)
"""


def check_lease_takeover(lock_url: Callable[[str], str]) -> None:
    """A bucket lease (`lock_url(name)`, a URL under a run's .locks/) with a 2-s life, held by another
    process: renewed while its holder lives (held past several lifetimes). Frozen (SIGSTOP: alive, as
    one cut off from the store), it is taken over only once its last renewal has expired; thawed, the
    holder learns it lost the lease and its release leaves the new holder's lease alone. A holder
    killed on this machine frees it at once (its pid is seen gone)."""
    import sys
    import time

    from pipeline import storage

    with environment({"EOPD_LEASE_SECONDS": "2"}):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for ending in ("freeze", "kill"):
            url = lock_url(f"part-{ending}.parquet.lock")
            holder = subprocess.Popen([sys.executable, "-c", _LEASE_HOLDER, url], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout.readline().strip() == "held"
                time.sleep(5)  # 2.5 lifetimes: alive only through its renewals
                assert storage.claim(storage.location(url)) is None
                lease = storage.leases(storage.location(url).parent)
                assert len(lease) == 1 and lease[0]["worker"]["pid"] == holder.pid and not lease[0]["expired"]
                if ending == "freeze":
                    holder.send_signal(signal.SIGSTOP)
                else:
                    holder.kill()
                    holder.wait()
                t0 = time.monotonic()
                while (c := storage.claim(storage.location(url))) is None:
                    assert time.monotonic() - t0 < 15
                    time.sleep(0.2)
                waited = time.monotonic() - t0
                if ending == "freeze":
                    assert waited > 0.5  # not at once: its last renewal had to age past 2 s
                    holder.send_signal(signal.SIGCONT)
                    holder.stdin.write("go\n")
                    holder.stdin.flush()
                    assert holder.stdout.readline().strip() == "lost"
                    assert holder.stdout.readline().strip() == "released"
                    mine = storage.leases(storage.location(url).parent)
                    assert len(mine) == 1 and mine[0]["worker"]["pid"] == os.getpid()  # not deleted by the loser
                else:
                    assert waited < 0.5  # the first try: its holder is seen gone
                c.release()
                assert storage.leases(storage.location(url).parent) == []
            finally:
                holder.kill()
                holder.wait()
