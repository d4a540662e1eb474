"""`eopd-pipe run` across two rounds, killed with SIGKILL at random points and resumed by the same
command each time: every shard and the final student equal those of an uninterrupted run."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from conftest import TRAIN, kill_group, run_cli, spawn_cli, write_config
from pipeline.shards import sha256_file

pytestmark = pytest.mark.slow


def digests(run: Path) -> dict[str, str]:
    files = sorted(run.glob("round-*/rollouts/part-*.parquet")) + sorted(run.glob("round-*/teacher/part-*.parquet"))
    files += sorted(run.glob("round-*/student/model.safetensors"))
    return {str(p.relative_to(run)): sha256_file(p) for p in files}


def test_run_killed_at_random_points_resumes_to_identical_results(toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", toy, rounds=2,
                       prompts={"path": str(toy.train_prompts), "limit": 12},
                       rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 6,
                                "vllm": {"enforce_eager": True, "dtype": "float32"}},
                       score_teacher={"top_k": 8}, train={**TRAIN, "checkpoint_every": 1})
    ref = tmp_path / "ref"
    t0 = time.time()
    res = run_cli("run", ref, "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    full = time.time() - t0
    expected = digests(ref)
    assert len([k for k in expected if k.endswith("model.safetensors")]) == 2

    run = tmp_path / "run"
    rng = random.Random(20261123)
    kills = 0
    for trial in range(3):
        proc = spawn_cli("run", run, "--config", cfg)
        deadline = time.time() + rng.uniform(2.0, 0.8 * full)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
        kill_group(proc, signal.SIGKILL)
        kills += 1
    assert kills >= 1
    res = run_cli("run", run, "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert digests(run) == expected
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith(".incoming")]
