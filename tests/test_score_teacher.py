"""`eopd-pipe score-teacher` on the tiny teacher: exact statistics, compact shards, resumable."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import kill_group, run_cli, spawn_cli, tree_snapshot, wait_for_line
from pipeline.codec import codec_from_metadata
from pipeline.shards import file_metadata, sha256_file

pytestmark = pytest.mark.slow


def teacher_digests(run: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((run / "round-0000" / "teacher").glob("part-*.parquet"))}


def without_teacher(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("teacher", "train", "student"))
    return dest


def test_stored_statistics_equal_a_naive_full_log_softmax(scored, toy):
    from transformers import AutoModelForCausalLM

    _, run = scored
    teacher = AutoModelForCausalLM.from_pretrained(toy.teacher, dtype=torch.float32).eval()
    path = run / "round-0000" / "teacher" / "part-00000.parquet"
    table = pq.read_table(path)
    meta = file_metadata(path)
    assert meta["k"] == "8" and meta["teacher"] == str(toy.teacher) and "tokenizer_fingerprint" in meta
    codec = codec_from_metadata(meta)
    ids, lps = codec.decode(table)
    start = 0
    for row in table.slice(0, 6).to_pylist():
        P, T = len(row["prompt_token_ids"]), len(row["response_token_ids"])
        seq = torch.tensor([row["prompt_token_ids"] + row["response_token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(seq).logits[0, P - 1 : P + T - 1].float(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
        assert torch.allclose(torch.tensor(row["teacher_entropy"]), entropy, atol=1e-5)
        target = logp.gather(-1, torch.tensor(row["response_token_ids"])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(row["teacher_token_logprob"]), target, atol=1e-5)
        top = logp.topk(8, -1)
        assert torch.equal(ids[start : start + T], top.indices)
        floor_ok = top.values > -20  # the codec's documented floor aside
        err = (lps[start : start + T] - top.values).abs()[floor_ok]
        assert err.max() <= codec.max_abs_error + 1e-6
        start += T


def test_shards_load_with_datasets_and_are_compact(scored):
    import datasets

    _, run = scored
    stage = run / "round-0000" / "teacher"
    ds = datasets.load_dataset("parquet", data_files=str(stage / "*.parquet"), split="train")
    rollouts = datasets.load_dataset("parquet", data_files=str(run / "round-0000" / "rollouts" / "*.parquet"), split="train")
    assert ds.num_rows == rollouts.num_rows
    assert {"teacher_topk_ids", "teacher_topk_logprobs", "teacher_entropy", "teacher_token_logprob"} <= set(ds.column_names)


def test_kill9_mid_stage_then_resume_is_identical(scored, tmp_path):
    _, run = scored
    fresh = without_teacher(run, tmp_path / "run")
    proc = spawn_cli("score-teacher", fresh, env={"EOPD_TEST_PAUSE": "shard_rename:0"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")
    kill_group(proc, signal.SIGKILL)
    res = run_cli("score-teacher", fresh)
    assert res.returncode == 0, res.stderr[-3000:]
    assert teacher_digests(fresh) == teacher_digests(run)
    assert not [p for p in fresh.rglob("*") if ".tmp" in p.name]


def without_logs(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    """A refused call appends its header to an existing RUN_DIR/logs/*.log (pipeline/logs.py); nothing else may change."""
    return {k: v for k, v in snapshot.items() if not k.startswith("logs/")}


def refused(res, *fragments):
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for f in fragments:
        assert f in res.stderr, (f, res.stderr)


def test_tokenizer_mismatch_stops_before_any_work(scored, toy, tmp_path):
    from transformers import AutoTokenizer

    _, run = scored
    fresh = without_teacher(run, tmp_path / "run")
    other = tmp_path / "other-teacher"
    shutil.copytree(toy.teacher, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_special_tokens({"additional_special_tokens": ["<|other|>"]})
    tok.save_pretrained(other)
    before = tree_snapshot(fresh)
    refused(run_cli("score-teacher", fresh, "--set", f"teacher.path={other}", "--allow-config-change"),
            "not the same vocabulary", "<|other|>")
    assert without_logs(tree_snapshot(fresh)) == without_logs(before)


def test_missing_and_corrupted_rollouts(scored, tmp_path):
    _, run = scored
    fresh = without_teacher(run, tmp_path / "run")
    victim = fresh / "round-0000" / "rollouts" / "part-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    # A worker checks only the shards it reads (a Ray actor enters the stage once per shard: checking
    # all would read S^2 shards per stage): worker 0 of 2 never reads shard 1 and does its own.
    res = run_cli("score-teacher", fresh, "--worker", "0/2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (fresh / "round-0000" / "teacher" / "part-00000.parquet").exists()
    refused(run_cli("score-teacher", fresh, "--worker", "1/2"), "part-00001.parquet is corrupted")
    refused(run_cli("score-teacher", fresh), "part-00001.parquet is corrupted")
    assert not (fresh / "round-0000" / "teacher" / "part-00001.parquet").exists()
    refused(run_cli("score-teacher", fresh, "--round", "1"), "no round 1 rollouts", "eopd-pipe rollout")


def test_outside_rows_against_a_full_log_softmax():
    """A teacher head with more rows than the student: stats over the shared rows, and what the
    left-out rows would have taken (top-k places, probability mass), against the full softmax."""
    from eopd.teacher_stats import chunked_token_stats, outside_rows

    g = torch.Generator().manual_seed(0)
    T, H, V, rows, k = 40, 16, 300, 280, 5
    hidden, w = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g)
    w[rows:] *= 1.5  # the left-out rows win often enough to be counted
    targets = torch.randint(0, rows, (T,), generator=g)
    stats = chunked_token_stats(hidden, w[:rows], targets, k, token_chunk=16)
    out = outside_rows(hidden, w, rows, stats)
    full = torch.log_softmax(hidden @ w.T, -1)
    kept = torch.log_softmax(hidden @ w[:rows].T, -1)
    assert torch.allclose(stats.topk_logprobs, kept.topk(k, -1).values, atol=1e-5)
    assert torch.equal(out.topk_outside, (full.topk(k, -1).indices >= rows).any(-1))
    assert torch.allclose(out.mass_outside, full[:, rows:].exp().sum(-1), atol=1e-5)
    assert 0 < int(out.topk_outside.sum()) < T
    none = outside_rows(hidden, w[:rows], rows, stats)
    assert not none.topk_outside.any() and not none.mass_outside.any()


def test_scored_rows_refuses_a_student_wider_than_its_teacher(tmp_path):
    from pipeline.errors import UserError
    from stages.score_teacher import scored_rows

    assert scored_rows(151_936, 152_064, 151_669, tmp_path / "s", tmp_path / "t") == 151_936
    assert scored_rows(151_936, 151_936, 151_669, tmp_path / "s", tmp_path / "t") == 151_936
    with pytest.raises(UserError, match="cannot score"):
        scored_rows(152_064, 151_936, 151_669, tmp_path / "s", tmp_path / "t")
    with pytest.raises(UserError, match="every token needs a row"):
        scored_rows(151_000, 152_064, 151_669, tmp_path / "s", tmp_path / "t")


def test_entropy_exact_at_qwen_vocabulary():
    """At V = 151,936 the streamed entropy matches a float64 reference to 2e-5 nats (a BLAS dot for
    sum p z over a whole row had lost ~1e-4 relative: summation order matters at this width)."""
    from eopd.teacher_stats import chunked_token_stats

    g = torch.Generator().manual_seed(1)
    T, H, V = 6, 64, 151_936
    hidden, w = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g) * 0.4
    stats = chunked_token_stats(hidden, w, torch.zeros(T, dtype=torch.long), 4, token_chunk=4)
    logp = torch.log_softmax((hidden @ w.T).double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert entropy.min() > 5  # high-entropy rows: the sum runs over many comparable terms
    assert torch.allclose(stats.entropy.double(), entropy, atol=2e-5, rtol=0)
