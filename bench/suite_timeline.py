"""Where the test suite's wall time goes (#23): a timeline of every test, and xdist's loadfile
scheduling replayed on it.

Record (a pytest plugin; each xdist worker appends its tests' starts and ends):

    SUITE_TIMELINE=/tmp/timeline.jsonl PYTHONPATH=bench python3 -m pytest -q -p suite_timeline

Replay (when each worker ended, and what other module orders and prefetch thresholds would give):

    python bench/suite_timeline.py /tmp/timeline.jsonl [--workers 2]

The replay takes the measured durations as fixed (a test under other contention would take longer
or shorter), so it tells whether the order of modules can shorten the wall, not by how much load does.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import time
from collections import OrderedDict


def _log(event: str, nodeid: str) -> None:
    path = os.environ.get("SUITE_TIMELINE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"t": time.time(), "ev": event, "w": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                                "id": nodeid}) + "\n")


def pytest_runtest_logstart(nodeid, location) -> None:
    _log("start", nodeid)


def pytest_runtest_logfinish(nodeid, location) -> None:
    _log("end", nodeid)


def module_durations(path: str) -> tuple[OrderedDict[str, list[float]], dict[str, float]]:
    """Per module (in the order tests started), its tests' durations; and each worker's end (s after the first start)."""
    rows = [json.loads(line) for line in open(path)]
    rows = [r for r in rows if r["w"] != "main"]  # the controller's own hooks echo the workers'
    started, modules = {}, OrderedDict()
    t0 = min(r["t"] for r in rows)
    ends: dict[str, float] = {}
    for r in rows:
        if r["ev"] == "start":
            started[r["id"]] = r["t"]
            modules.setdefault(r["id"].split("::")[0], [])
        else:
            modules[r["id"].split("::")[0]].append(r["t"] - started[r["id"]])
            ends[r["w"]] = max(ends.get(r["w"], 0.0), r["t"] - t0)
    return modules, ends


def replay(modules: OrderedDict[str, list[float]], order: list[str], workers: int, threshold: int) -> float:
    """xdist's LoadScopeScheduling: each worker takes whole modules from the queue's head, one at
    start and another whenever its tests not yet finished are `threshold` or fewer (xdist: 2)."""
    queue, pending = list(order), {w: [] for w in range(workers)}

    def refill(w: int) -> None:
        if queue and len(pending[w]) <= threshold:
            pending[w] += modules[queue.pop(0)]

    for w in range(workers):
        if queue:
            pending[w] += modules[queue.pop(0)]
    events, wall = [(0.0, w) for w in range(workers)], 0.0
    while events:
        now, w = heapq.heappop(events)  # worker w finished a test (or starts) at `now`
        refill(w)
        if pending[w]:
            heapq.heappush(events, (now + pending[w].pop(0), w))
        else:
            wall = max(wall, now)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("timeline")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    modules, ends = module_durations(args.timeline)
    totals = {m: sum(d) for m, d in modules.items()}
    print(f"sum of test durations {sum(totals.values()):.0f} s over {len(modules)} modules; "
          f"workers ended at " + ", ".join(f"{w} {t:.0f} s" for w, t in sorted(ends.items())))
    print("longest modules: " + ", ".join(f"{m.split('/')[-1]} {t:.0f} s" for m, t in
                                          sorted(totals.items(), key=lambda x: -x[1])[:6]))
    longest_first = sorted(modules, key=lambda m: -totals[m])
    for threshold in (2, 1):
        for name, order in (("as run", list(modules)), ("longest first", longest_first)):
            print(f"replay, {name}, prefetch at <= {threshold} tests: "
                  f"{replay(modules, order, args.workers, threshold):.0f} s")


if __name__ == "__main__":
    main()
