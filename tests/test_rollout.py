"""`eopd-pipe rollout` through real vLLM on the tiny student, as a user runs it: real processes,
real Parquet, real kills; and its terminal (what test_logs.py checked with two more rollouts):
quiet by default, the libraries' lines in RUN_DIR/logs/rollout.log, all of them on the terminal with -v."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CLI_ENV, REPO, kill_group, run_cli, spawn_cli, tree_snapshot, wait_for_line, write_config
from pipeline.shards import sha256_file

pytestmark = pytest.mark.slow
NUM_SHARDS = 4  # 24 prompts, 6 per shard


def rollout_digests(run: Path) -> dict[str, str]:
    stage = run / "round-0000" / "rollouts"
    return {p.name: sha256_file(p) for p in sorted(stage.glob("part-*.parquet"))}


def no_leftovers(run: Path) -> bool:
    return not [p for p in run.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def cfg_path(toy, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "cfg.yaml", toy,
                        rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 6,
                                 "vllm": {"enforce_eager": True, "dtype": "float32"}})


def without_vllm_log_level() -> dict:
    """The environment a user has: vLLM's own INFO lines are on (CLI_ENV quiets them elsewhere)."""
    env = {**os.environ, **CLI_ENV}
    env.pop("VLLM_LOGGING_LEVEL", None)
    return env


@pytest.fixture(scope="module")
def reference_run(cfg_path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("ref") / "run"
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "rollout", str(run), "--config", str(cfg_path)],
                         cwd=REPO, env=without_vllm_log_level(), capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage complete" in res.stdout
    return run, res


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    return reference_run[0]


def test_terminal_is_quiet_and_the_log_has_vllm(reference_run):
    """A real vLLM rollout (the reference run): the terminal gets our progress bar and summary line,
    the log gets vLLM's INFO/WARNING lines (was test_logs.py::test_rollout_quiet_then_verbose, quiet half)."""
    run, res = reference_run
    terminal = res.stdout + res.stderr
    assert f"rollout: {NUM_SHARDS} shard(s) done now, 0 before" in res.stdout
    assert "INFO" not in terminal and "WARNING" not in terminal, terminal
    assert len([l for l in terminal.replace("\r", "\n").splitlines() if l.strip() and "rollout round 0" not in l]) <= 2
    log = (run / "logs" / "rollout.log").read_text()
    assert f"eopd-pipe rollout {run}" in log.splitlines()[0] and "INFO" in log and "vLLM" in log


def test_schema_and_readers(reference, toy):
    stage = reference / "round-0000" / "rollouts"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == NUM_SHARDS
    table = pa.concat_tables(pq.read_table(stage / name) for name in sorted(manifest["shards"]))
    expected = {
        "prompt_id": pa.string(), "sample_index": pa.int32(), "prompt_token_ids": pa.list_(pa.int32()),
        "response_token_ids": pa.list_(pa.int32()), "response_logprobs": pa.list_(pa.float32()),
        "finish_reason": pa.string(), "policy_round": pa.int32(),
    }
    for name, typ in expected.items():
        assert table.schema.field(name).type == typ, name
    assert "answer" in table.column_names  # the prompt row's own columns ride along
    rows = table.to_pylist()
    assert len(rows) == 24 * 2 == sum(r["rows"] for r in manifest["shards"].values())
    assert len({(r["prompt_id"], r["sample_index"]) for r in rows}) == len(rows)
    for r in rows:
        assert 1 <= len(r["response_token_ids"]) <= 12
        assert len(r["response_logprobs"]) == len(r["response_token_ids"])
        assert all(lp <= 0.0 for lp in r["response_logprobs"])
        assert r["finish_reason"] in {"stop", "length"} and r["policy_round"] == 0
    # Same rows through `datasets`, which globs *.parquet (temporary files are hidden dot-files).
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(stage / "*.parquet"), split="train")
    assert ds.num_rows == len(rows) and set(expected) <= set(ds.column_names)
    assert pq.read_schema(stage / "part-00000.parquet").metadata[b"eopd.stage"] == b"rollouts"


def test_kill9_then_sigterm_mid_stage_then_resume_is_identical(cfg_path, reference, tmp_path):
    """SIGKILL with shard 1 fully written under its temporary name; the same command again, SIGTERM
    while it computes shard 2: shard 2 abandoned, exit 143, shards 0-1 recorded, nothing temporary
    left; the same command again finishes the rest, equal to the uninterrupted run (was two tests,
    kill -9 then resume, and SIGTERM then resume, each starting its own engines)."""
    run = tmp_path / "run"
    proc = spawn_cli("rollout", run, "--config", cfg_path, env={"EOPD_TEST_PAUSE": "shard_rename:1"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")  # shard 1 fully written under its temporary name
    kill_group(proc, signal.SIGKILL)
    assert not no_leftovers(run)
    proc = spawn_cli("rollout", run, "--config", cfg_path, env={"EOPD_TEST_PAUSE": "shard_compute:2"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")
    assert kill_group(proc, signal.SIGTERM) == 143
    manifest = json.loads((run / "round-0000" / "rollouts" / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["part-00000.parquet", "part-00001.parquet"]
    assert no_leftovers(run)
    res = run_cli("rollout", run, "--config", cfg_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 shard(s) done now, 2 before" in res.stdout
    assert rollout_digests(run) == rollout_digests(reference)
    assert no_leftovers(run)


def test_two_workers_do_every_shard_once(cfg_path, reference, tmp_path):
    """Two workers, each with -v: every shard once, and the libraries' lines on the terminal, no log
    written (was test_logs.py::test_rollout_quiet_then_verbose, verbose half)."""
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "-v", "rollout", str(run), "--config", str(cfg_path),
                               "--worker", f"{i}/2"], cwd=REPO, env=without_vllm_log_level(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=2400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "2 shard(s) done now" in outs[0][0] and "2 shard(s) done now" in outs[1][0]
    assert rollout_digests(run) == rollout_digests(reference)
    assert all("INFO" in out + err for out, err in outs)
    assert not (run / "logs").exists()


def test_round_one_needs_round_zero_student(cfg_path, reference):
    before = tree_snapshot(reference)
    res = run_cli("rollout", reference, "--round", "1")
    assert res.returncode == 2 and "round-0000/student does not exist yet" in res.stderr
    assert "Traceback" not in res.stderr and tree_snapshot(reference) == before
