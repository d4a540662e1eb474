"""Bad inputs: one clear message (no traceback), exit code 2, and the run directory unchanged."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from conftest import REPO, run_cli, tree_snapshot, write_config
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


def test_missing_local_prompt_file_fails_at_once(toy, tmp_path, run):
    """A typo in a local file name is said at once, naming the file; the hub is not asked (it would
    retry for half a minute, then blame the hub). "Not asked" is checked, not timed (a loaded
    machine takes a minute to import): the hub endpoint is a local server that counts connections."""
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen(8)
    hub.settimeout(0.2)
    asked, stop = [], threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = hub.accept()
            except OSError:
                continue
            asked.append(1)
            conn.close()
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    cfg = write_config(tmp_path / "c.yaml", toy)
    try:
        res = run_cli("rollout", run, "--config", cfg, "--set", "prompts.path=nope.jsonl",
                      env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}"})
    finally:
        stop.set()
        server.join()
        hub.close()
    assert_refused(res, "prompts.path nope.jsonl: no such file or directory", str(REPO / "nope.jsonl"))
    assert "Hub" not in res.stderr and not asked  # datasets' "Couldn't reach 'nope.jsonl' on the Hub"
    assert not run.exists()


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_prompt_file(toy, tmp_path, run, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    cfg = write_config(tmp_path / "c.yaml", toy, prompts={"path": str(empty)})
    assert_refused(run_cli("rollout", run, "--config", cfg), f"prompts.path {empty}: the dataset is empty",
                   "one prompt per row")
    assert not run.exists()


def test_model_path_local_or_hub(toy, tmp_path, run):
    # Two parts, but the first is a local directory: a local path, so it fails at once, named.
    cfg = write_config(tmp_path / "c.yaml", toy, student={"path": "tests/no-such-model"})
    assert_refused(run_cli("rollout", run, "--config", cfg), "student model directory tests/no-such-model",
                   str(REPO / "tests" / "no-such-model"), "does not exist")
    # Only a hub name can be meant: the hub is asked (offline here), and the message says both.
    cfg = write_config(tmp_path / "c.yaml", toy, student={"path": "no-such-org/no-such-model"})
    assert_refused(run_cli("rollout", run, "--config", cfg), "student.path 'no-such-org/no-such-model'",
                   "no local directory", "offline")
    assert not run.exists()


def test_manifest_deleted_or_corrupted(scored, tmp_path):
    """Shards present but manifest.json deleted, or manifest.json corrupted: one message naming the
    stage directory, what is wrong, and the fix (status --repair, or delete the stage)."""
    run = tmp_path / "run"
    shutil.copytree(scored[1], run)
    rollouts, teacher = run / "round-0000" / "rollouts", run / "round-0000" / "teacher"
    (teacher / "manifest.json").unlink()
    before = tree_snapshot(run)
    for command in ("train", "score-teacher"):  # reading the stage / writing it again
        assert_refused(run_cli(command, run), f"{teacher} holds 2 shard file(s) but no manifest.json",
                       f"eopd-pipe status {run} --repair", f"or delete {teacher}")
        assert tree_snapshot(run) == before
    (rollouts / "manifest.json").write_text('{"num_shards": 2, "shards": {"part-00')
    before = tree_snapshot(run)
    assert_refused(run_cli("score-teacher", run), f"{rollouts / 'manifest.json'} is corrupted (not valid JSON",
                   f"eopd-pipe status {run} --repair")
    (rollouts / "manifest.json").write_text('{"num_shards": 2}')
    assert_refused(run_cli("score-teacher", run), "is corrupted (keys ['plan', 'shards', 'complete'] missing)")
