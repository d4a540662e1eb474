"""Bad inputs: one clear message (no traceback), exit code 2, and the run directory unchanged."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from conftest import run_cli, tree_snapshot, write_config
from pipeline.work import ShardResult, run_shards


def assert_refused(res, *fragments: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    err = res.stderr[res.stderr.find("error: "):]  # the message is the last thing printed
    assert "error: " in res.stderr and err.count("error: ") == 1, res.stderr
    for f in fragments:
        assert f in err, (f, err)


@pytest.fixture
def run(tmp_path) -> Path:
    return tmp_path / "run"


def test_unknown_config_key(toy, tmp_path, run):
    cfg = write_config(tmp_path / "c.yaml", toy, rollout={"temprature": 0.7})
    assert_refused(run_cli("rollout", run, "--config", cfg), str(cfg), "rollout.temprature: unknown key", "temperature")
    assert not run.exists()


def test_wrong_type(toy, tmp_path, run):
    cfg = write_config(tmp_path / "c.yaml", toy)
    assert_refused(run_cli("rollout", run, "--config", cfg, "--set", "rollout.max_tokens=many"),
                   "rollout.max_tokens", "valid integer", "'many'")
    assert not run.exists()


def test_missing_model_dir(toy, tmp_path, run):
    cfg = write_config(tmp_path / "c.yaml", toy, student={"path": str(tmp_path / "no-such-model")})
    assert_refused(run_cli("rollout", run, "--config", cfg), "student model directory", "no-such-model", "does not exist")
    assert not run.exists()


def test_missing_prompt_field(toy, tmp_path, run):
    cfg = write_config(tmp_path / "c.yaml", toy, prompts={"path": str(toy.train_prompts), "prompt_field": "question"})
    assert_refused(run_cli("rollout", run, "--config", cfg), str(toy.train_prompts), "['question'] not found",
                   "prompts.prompt_field")
    assert not run.exists()


def test_conflicting_frozen_config(toy, tmp_path, run):
    cfg = write_config(tmp_path / "c.yaml", toy)
    # Freeze a config by a call that fails later (round 1 has no student): the config is valid.
    from pipeline.config import load_config
    from pipeline.rundir import RunDir, freeze_config

    freeze_config(RunDir(run), load_config(cfg))
    before = tree_snapshot(run)
    assert_refused(run_cli("rollout", run, "--set", "rollout.n=5"), "config.yaml was frozen", "rollout.n: 2 -> 5",
                   "--allow-config-change")
    assert tree_snapshot(run) == before


def test_corrupted_shard_is_named(tmp_path, run):
    stage = run / "round-0000" / "rollouts"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({}))
    run_shards(stage, 2, {}, lambda: (lambda i: ShardResult(pa.table({"x": list(range(100))}), 100)), {"stage": "rollouts"})
    assert run_cli("status", run, "--verify").returncode == 0
    victim = stage / "part-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[40] ^= 0x01
    victim.write_bytes(bytes(data))
    before = tree_snapshot(run)
    assert_refused(run_cli("status", run, "--verify"), "part-00001.parquet: corrupted", "delete it and rerun")
    assert tree_snapshot(run) == before
