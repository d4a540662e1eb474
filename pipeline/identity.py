"""Who a worker is and where it runs, for claim/lease records and `eopd-pipe status`: host, pid,
the Slurm job and array task, the Ray node and actor, the SkyPilot task. Read from the environment
each engine sets (and Ray's runtime context, only where Ray is already imported): no engine is
imported here, none is asked over the network."""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

_SLURM = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
          "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_restart_count": "SLURM_RESTART_COUNT"}
_SKYPILOT = {"skypilot_task_id": "SKYPILOT_TASK_ID", "skypilot_node_rank": "SKYPILOT_NODE_RANK"}


def worker_identity() -> dict[str, Any]:
    """A small JSON-able dict; keys of engines the worker is not under are left out."""
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}
    ident.update(_pid_view())
    for key, var in {**_SLURM, **_SKYPILOT}.items():
        if os.environ.get(var):
            ident[key] = os.environ[var]
    ray = sys.modules.get("ray")  # only a worker that is already a Ray process has a node to name
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        ctx = ray.get_runtime_context()
        ident["ray_node_id"] = ctx.get_node_id()
        actor = ctx.get_actor_id()
        if actor:
            ident["ray_actor_id"] = actor
    return ident


def describe_worker(ident: dict[str, Any]) -> str:
    """One line for a status screen, e.g. "vm pid 4242, slurm 17_1 (restart 1)"."""
    parts = [f"{ident.get('host', '?')} pid {ident.get('pid', '?')}"]
    if "slurm_job_id" in ident:
        task = (f"{ident['slurm_array_job_id']}_{ident['slurm_array_task_id']}" if "slurm_array_job_id" in ident
                else ident["slurm_job_id"])
        restart = f" (restart {ident['slurm_restart_count']})" if ident.get("slurm_restart_count", "0") != "0" else ""
        parts.append(f"slurm {task}{restart}")
    if "ray_node_id" in ident:
        parts.append(f"ray node {ident['ray_node_id'][:12]}")
    if "skypilot_task_id" in ident:
        parts.append(f"skypilot {ident['skypilot_task_id']}")
    return ", ".join(parts)


def holder_gone(ident: dict[str, Any]) -> bool:
    """True when `ident` names a process that we can see is gone: it ran under this kernel boot and
    in this pid namespace (so its pid means the same process here), and that pid is no longer
    running, or now belongs to a process started at another time. False whenever we cannot tell
    (another machine or container): then only the lease's expiry frees its work. This is what lets
    a command restarted after a kill -9 on the same machine go on at once, as the OS frees an
    fcntl lock of a dead process on a local disk."""
    if not same_pid_view(ident) or not isinstance(ident.get("pid"), int):
        return False
    if not pid_alive(ident["pid"]):
        return True
    started = _process_start(ident["pid"], fallback=None)
    return started is not None and "started" in ident and abs(started - float(ident["started"])) > 0.05


def same_pid_view(ident: dict[str, Any]) -> bool:
    """Whether `ident`'s pid means a process of this machine as this process sees it: the same kernel
    boot and pid namespace (False where /proc cannot tell)."""
    view = _pid_view()
    return bool(view) and all(ident.get(k) == v for k, v in view.items())


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this machine (in this pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _pid_view() -> dict[str, str]:
    """The kernel boot and pid namespace this process sees pids in; {} where /proc cannot tell."""
    try:
        return {"boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
                "pid_ns": os.readlink("/proc/self/ns/pid")}
    except OSError:
        return {}


def _process_start(pid: int, fallback: float | None = -1.0) -> float | None:
    """A process's start time (epoch seconds); with the pid it tells a reused pid apart."""
    try:
        ticks = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return round(boot + ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError, StopIteration):
        return round(time.time(), 2) if fallback == -1.0 else fallback
