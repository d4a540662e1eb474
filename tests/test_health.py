"""Training health said aloud: figures of a round from its shards and metrics, warnings in `status`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from conftest import run_cli
from pipeline.health import health_warnings, round_health, run_health
from pipeline.work import ShardResult, run_shards


def write_round(run: Path, r: int, behaviour: list[list[float]], teacher: list[list[float]], reasons: list[str],
                losses: list[float], entropy: float = 0.5, gate: float = 0.2) -> None:
    """Round r's rollouts and teacher shards (two shards each, health columns only) and metrics.jsonl."""
    rows = {"response_logprobs": pa.array(behaviour, pa.list_(pa.float32())),
            "teacher_token_logprob": pa.array(teacher, pa.list_(pa.float32())),
            "finish_reason": pa.array(reasons, pa.string())}
    half = len(reasons) // 2
    for stage in ("rollouts", "teacher"):
        table = pa.table(rows)
        run_shards(run / f"round-{r:04d}" / stage, 2, {}, lambda t=table: (
            lambda i: ShardResult(t.slice(i * half, half if i == 0 else None), 1)), {"stage": stage, "round": str(r)})
    train = run / f"round-{r:04d}" / "train"
    train.mkdir(parents=True)
    train.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "step": s + 1, "loss": loss, "student_entropy": entropy, "gate_fraction": gate}) + "\n"
        for s, loss in enumerate(losses)))


@pytest.fixture
def diverging(tmp_path) -> Path:
    """Round 0 healthy; round 1: KL tripled, 3 of 4 responses at max_tokens, a NaN loss at step 2."""
    run = tmp_path / "run"
    run.mkdir()
    config = {"rounds": 2, "train": {"lr": 1e-3}, "rollout": {"max_tokens": 48}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    # KL_t = behaviour - teacher: round 0 mean 0.5 over 6 tokens; round 1 mean 1.5 over 8 tokens.
    write_round(run, 0, [[-1.0, -1.0], [-0.5], [-0.2, -0.2, -0.1]], [[-1.5, -1.5], [-1.0], [-0.7, -0.7, -0.6]],
                ["stop", "stop", "length"], [1.0, 0.9])
    write_round(run, 1, [[-0.5] * 2, [-0.5] * 2, [-0.5] * 2, [-0.5] * 2], [[-2.0] * 2] * 4,
                ["length", "length", "stop", "length"], [0.8, float("nan"), float("inf")], entropy=0.1, gate=0.05)
    (run / "eval").mkdir()
    final = {"model": "final", "round": 1, "pass_at_k": {"1": 0.0, "2": 0.0}}
    (run / "eval" / "final.json").write_text(json.dumps(final))
    return run


def test_round_health_figures(diverging):
    h0, h1 = round_health(diverging, 0), round_health(diverging, 1)
    assert h0.kl_start == pytest.approx(0.5) and h0.kl_tokens == 6 and h0.kl_shards == "2/2"
    assert h0.length_fraction == pytest.approx(1 / 3) and h0.nonfinite_steps == 0 and h0.steps == 2
    assert h1.kl_start == pytest.approx(1.5) and h1.length_fraction == pytest.approx(0.75)
    assert (h1.nonfinite_steps, h1.first_nonfinite_step, h1.steps) == (2, 2, 3)
    assert h1.student_entropy == pytest.approx(0.1) and h1.gate_fraction == pytest.approx(0.05)
    assert h1.pass_at_k == {"final": {"1": 0.0, "2": 0.0}} and h0.pass_at_k == {}
    assert health_warnings(h0) == []
    warnings = health_warnings(h1, h0)
    assert len(warnings) == 3 and all(w.startswith("round 1: ") for w in warnings)
    nonfinite, kl, length = warnings
    assert "not finite" in nonfinite and "first at step 2" in nonfinite and "train.lr (now 0.001)" in nonfinite
    assert "1.500" in kl and "3.0x round 0's 0.500" in kl and "lower train.lr" in kl
    assert "75% of round 1's 4 responses ended at rollout.max_tokens=48" in length and "round 0: 33%" in length
    assert [w for _, w in run_health(diverging)] == [[], warnings]


def test_status_says_it(diverging):
    res = run_cli("status", diverging)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "health    KL at start 0.500 | at max_tokens 33% | H(student) 0.500 | gate 0.20" in out
    assert "KL at start 1.500 | at max_tokens 75%" in out and "final pass@1 0.0 pass@2 0.0" in out
    warnings = [l.strip() for l in out.splitlines() if l.strip().startswith("warning:")]
    assert len(warnings) == 3 and all(w.startswith("warning: round 1: ") for w in warnings), out
    res = run_cli("status", diverging, "--no-health")
    assert res.returncode == 0 and "warning" not in res.stdout and "health" not in res.stdout
