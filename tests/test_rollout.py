"""`eopd-pipe rollout` through real vLLM on the tiny student, as a user runs it: real processes,
real Parquet, real kills."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import kill_group, run_cli, spawn_cli, tree_snapshot, wait_for_line, write_config
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


@pytest.fixture(scope="module")
def reference(cfg_path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli("rollout", run, "--config", cfg_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage complete" in res.stdout
    return run


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


def test_kill9_mid_stage_then_resume_is_identical(cfg_path, reference, tmp_path):
    run = tmp_path / "run"
    proc = spawn_cli("rollout", run, "--config", cfg_path, env={"EOPD_TEST_PAUSE": "shard_rename:1"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")  # shard 1 fully written under its temporary name
    kill_group(proc, signal.SIGKILL)
    assert not no_leftovers(run)
    res = run_cli("rollout", run, "--config", cfg_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 shard(s) done now, 1 before" in res.stdout
    assert rollout_digests(run) == rollout_digests(reference)
    assert no_leftovers(run)


def test_sigterm_abandons_shard_exits_nonzero_and_resumes(cfg_path, reference, tmp_path):
    run = tmp_path / "run"
    proc = spawn_cli("rollout", run, "--config", cfg_path, env={"EOPD_TEST_PAUSE": "shard_compute:2"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")
    assert kill_group(proc, signal.SIGTERM) == 143
    manifest = json.loads((run / "round-0000" / "rollouts" / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["part-00000.parquet", "part-00001.parquet"]
    assert no_leftovers(run)
    res = run_cli("rollout", run, "--config", cfg_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert rollout_digests(run) == rollout_digests(reference)


def test_two_workers_do_every_shard_once(cfg_path, reference, tmp_path):
    run = tmp_path / "run"
    procs = [spawn_cli("rollout", run, "--config", cfg_path, "--worker", f"{i}/2") for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "2 shard(s) done now" in outs[0][0] and "2 shard(s) done now" in outs[1][0]
    assert rollout_digests(run) == rollout_digests(reference)


def test_round_one_needs_round_zero_student(cfg_path, reference):
    before = tree_snapshot(reference)
    res = run_cli("rollout", reference, "--round", "1")
    assert res.returncode == 2 and "round-0000/student does not exist yet" in res.stderr
    assert "Traceback" not in res.stderr and tree_snapshot(reference) == before
