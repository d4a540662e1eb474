"""Shared fixtures: tiny local models (built once per session), configs, and CLI processes.

Marker `slow`: the test starts a vLLM engine, trains, or launches the CLI's model processes.
`python3 -m pytest -q -m "not slow"` is the fast loop while editing. A test that uses a fixture
in ENGINE_FIXTURES (it starts an engine) is marked slow here, wherever it lives."""

from __future__ import annotations

import os
import queue
import signal
import threading
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# Tiny models on a 2-core machine: keep vLLM's CPU KV cache small and its logging quiet, and one torch
# thread per process. Two xdist workers already keep both cores busy, and the tiny models' second
# thread waits more than it computes (configs/default.yaml's `cpu_threads: 1`, bench/RESULTS.md); the
# bytes are the same on any thread count (tests/test_train.py checks a resume on another count).
CLI_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers' own torch too (read when torch loads, after this)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """Untrained tiny teacher/student sharing one tokenizer, plus prompt files (seconds to build)."""
    from pipeline.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "assets", seed=0, quick=True)


def write_config(path: Path, toy, **sections) -> Path:
    """A config for the tiny models; keyword sections are merged over the base."""
    cfg = {
        "seed": 7,
        "student": {"path": str(toy.student)},
        "teacher": {"path": str(toy.teacher)},
        "prompts": {"path": str(toy.train_prompts), "limit": 24},
        "rollout": {"n": 2, "max_tokens": 12, "prompts_per_shard": 6},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


# Fixtures whose set-up starts a vLLM engine or trains: their users are slow (pytest_collection_modifyitems).
ENGINE_FIXTURES = {"scored", "trained", "three_rounds", "killed_checkpoint"}


# Seconds per module on an idle 2-core machine (2026-12 fresh-clone runs), to start the longest first:
# with `-n 2 --dist loadfile` (pyproject's addopts) each module runs whole on one worker, so the suite's
# wall is near its CPU time / 2 only where the long modules do not come last. A new module counts 0.
MODULE_SECONDS = {"test_run.py": 600, "test_s3.py": 450, "test_slurm.py": 440, "test_train.py": 260,
                  "test_ray.py": 200, "test_sampler.py": 150, "test_gcs.py": 90, "test_trackers.py": 90,
                  "test_real_shape.py": 80, "test_rollout.py": 80, "test_status.py": 60, "test_score_teacher.py": 60}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))  # stable: a module's own order is kept


_SPAWNED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_orphans():
    """A failed test must not leave a paused or vLLM process behind."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def spawn(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """A process in its own process group, so a kill reaches its children too (as on a lost machine)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **CLI_ENV, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _SPAWNED.append(proc)
    return proc


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def run_cli(*args: str, env: dict | None = None, timeout: float = 2400) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), cwd=REPO, env={**os.environ, **CLI_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def spawn_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return spawn(cli_cmd(*args), env)


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 1200) -> list[str]:
    """Read the process's stderr until a line containing `marker`; fail if it exits or times out first.

    A background thread keeps draining stderr afterwards (into proc.stderr_lines), so the child
    never blocks on a full pipe."""
    if not hasattr(proc, "stderr_lines"):
        proc.stderr_lines = queue.Queue()

        def pump() -> None:
            for line in proc.stderr:
                proc.stderr_lines.put(line.rstrip("\n"))
            proc.stderr_lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = proc.stderr_lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            proc.wait()
            raise AssertionError(f"process exited ({proc.returncode}) before {marker!r}:\n" + "\n".join(seen[-40:]))
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"timeout waiting for {marker!r}:\n" + "\n".join(seen[-40:]))


def rest_of_stderr(proc: subprocess.Popen) -> str:
    """After wait_for_line: everything the (exited) process wrote to stderr since."""
    lines = []
    while (line := proc.stderr_lines.get(timeout=60)) is not None:
        lines.append(line)
    return "\n".join(lines)


def kill_group(proc: subprocess.Popen, sig: int) -> int:
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=600)
    finally:
        if sig != signal.SIGKILL:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # vLLM children that outlived the main process
            except ProcessLookupError:
                pass


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (for 'the run dir is unchanged' checks)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


TRAIN = {"lr": 3e-3, "gate_quantile": 0.5, "batch_rows": 8, "micro_batch_tokens": 256, "checkpoint_every": 2, "lr_schedule": "constant",
         "probe_tokens": 64}


@pytest.fixture(scope="session")
def scored(toy, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run dir) with round 0's rollouts (real vLLM) and teacher shards done."""
    tmp = tmp_path_factory.mktemp("scored")
    cfg = write_config(tmp / "cfg.yaml", toy, rollout={"n": 2, "max_tokens": 16, "prompts_per_shard": 12,
                                                        "vllm": {"enforce_eager": True, "dtype": "float32"}},
                       score_teacher={"top_k": 8, "token_budget": 256, "token_chunk": 64}, train=TRAIN, rounds=2)
    run = tmp / "run"
    for stage in ("rollout", "score-teacher"):
        res = run_cli(stage, run, "--config", cfg)
        assert res.returncode == 0, res.stderr[-3000:]
    return cfg, run


@pytest.fixture(scope="session")
def killed_checkpoint(scored, tmp_path_factory):
    """A copy of `scored` whose round-0 `train` was paused after logging step 3 (checkpoint every 2
    steps), looked at by `status` while paused, SIGKILLed there (a lost machine), and looked at
    again: `.run`, `.pid` (of the killed train), `.status_paused`, `.status_killed` (status
    outputs). Tests copy `.run` before they resume or corrupt it; one paused process serves them all."""
    import shutil
    from types import SimpleNamespace

    run = tmp_path_factory.mktemp("killed") / "run"
    shutil.copytree(scored[1], run, ignore=shutil.ignore_patterns("train", "student"))
    proc = spawn_cli("train", run, env={"EOPD_TEST_PAUSE": "train_step:3"})
    try:
        wait_for_line(proc, "EOPD_TEST_PAUSE reached train_step:3")
        paused = run_cli("status", run)
    finally:
        kill_group(proc, signal.SIGKILL)
    killed = run_cli("status", run)
    assert paused.returncode == 0 and killed.returncode == 0, (paused.stderr, killed.stderr)
    assert (run / "round-0000" / "train" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    return SimpleNamespace(run=run, pid=proc.pid, status_paused=paused.stdout, status_killed=killed.stdout)
