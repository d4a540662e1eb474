"""`eopd-pipe run` (persistent: each role's model loaded once per run) across three rounds, killed
with SIGKILL at random points and resumed by the same command each time: every shard, student and
per-step loss equals those of an uninterrupted run, and of the stage commands run one by one. Its
default scores each rollout shard while vLLM samples the next (`score_teacher.overlap_rollouts`):
the same rows as with the stages one after another, also when killed in the middle of that.

One reference run (`three_rounds`, built once per module) serves every comparison; runs that do
not check eval use the same config without its eval section (`plain`), which changes no shard,
manifest, student or loss."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import TRAIN, kill_group, run_cli, spawn_cli, wait_for_line, write_config
from helpers import Background, all_ok, cli, failure_text

from pipeline.shards import sha256_file

pytestmark = pytest.mark.slow


def digests(run: Path) -> dict[str, str]:
    files = sorted(run.glob("round-*/rollouts/part-*.parquet")) + sorted(run.glob("round-*/teacher/part-*.parquet"))
    files += sorted(run.glob("round-*/student/model.safetensors"))
    return {str(p.relative_to(run)): sha256_file(p) for p in files}


def manifest(run: Path, r: int, stage: str) -> dict:
    return json.loads((run / f"round-{r:04d}" / stage / "manifest.json").read_text())


def manifests(run: Path, tokens: bool = True) -> dict[str, dict]:
    """Every stage manifest (plan and shard records). `tokens=False` leaves out the shards' token
    counts: a shard renamed but not recorded when its writer was killed is adopted with 0."""
    out = {}
    for path in sorted(run.glob("round-*/*/manifest.json")):
        data = json.loads(path.read_text())
        if not tokens:
            data["shards"] = {n: {k: v for k, v in rec.items() if k != "tokens"} for n, rec in data["shards"].items()}
        out[str(path.relative_to(run))] = data
    return out


def wait_until(done, what: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not done():
        assert time.time() < deadline, f"timeout waiting for {what}"
        time.sleep(0.1)


def recorded(run: Path, r: int, stage: str) -> set[str]:
    path = run / f"round-{r:04d}" / stage / "manifest.json"
    return set(json.loads(path.read_text())["shards"]) if path.is_file() else set()


def test_run_killed_at_random_points_resumes_to_identical_results(three_rounds, tmp_path):
    """First two stops in the middle of round 0's overlapped rollouts and scoring (a SIGKILL while
    teacher shard 0 is recorded and rollout shard 1 only renamed; then a SIGTERM while the teacher
    waits for rollout shard 2), then a preemption notice to the whole process group (vLLM's engine
    process included) during round 0's training (exit 143, a checkpoint at the step boundary), then
    SIGKILLs at random moments; the same command then finishes with the uninterrupted run's shards,
    manifests, students and per-step losses (the reference: `three_rounds`, one uninterrupted run)."""
    cfg, ref = three_rounds.cfg, three_rounds.run
    expected = digests(ref)
    assert len([k for k in expected if k.endswith("model.safetensors")]) == 3

    run = tmp_path / "run"
    # SIGKILL: rollout shard 1 of round 0 renamed, not recorded (its writer paused); the teacher
    # has scored and recorded shard 0 meanwhile, its plan naming only the rollout shard it read.
    proc = spawn_cli("run", run, "--config", plain(cfg), env={"EOPD_TEST_PAUSE": "shard_record:1"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached shard_record:1")
    wait_until(lambda: "part-00000.parquet" in recorded(run, 0, "teacher"), "teacher shard 0")
    assert recorded(run, 0, "rollouts") == {"part-00000.parquet"}
    assert list(manifest(run, 0, "teacher")["plan"]["rollout_shards"]) == ["part-00000.parquet"]
    kill_group(proc, signal.SIGKILL)
    # SIGTERM: rollout shard 1 adopted, shard 2 in its writer (paused 45 s: long enough for a loaded
    # machine to load the teacher and score shard 1 first), teacher shard 1 done and the teacher
    # waiting for shard 2: exit 143 once the shard in the rollout writer is recorded.
    proc = spawn_cli("run", run, "--config", plain(cfg), env={"EOPD_TEST_PAUSE": "shard_record:2:45"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached shard_record:2")
    wait_until(lambda: "part-00001.parquet" in recorded(run, 0, "teacher"), "teacher shard 1")
    assert "part-00002.parquet" not in recorded(run, 0, "teacher")
    assert kill_group(proc, signal.SIGTERM) == 143
    assert len(recorded(run, 0, "rollouts")) == 3 and len(recorded(run, 0, "teacher")) == 2
    # SIGTERM to the process group during round 0's training: exit 143, a checkpoint at the step
    # boundary (was test_sigterm_stops_the_persistent_run_cleanly_and_it_resumes).
    proc = spawn_cli("run", run, "--config", plain(cfg), env={"EOPD_TEST_PAUSE": "train_step:2:3"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")
    assert kill_group(proc, signal.SIGTERM) == 143
    assert (run / "round-0000" / "train" / "checkpoints" / "step-000002" / "COMPLETE").is_file()

    # Random kill points by progress, not by time (a reference timed under one load says little
    # about a resumed run under another): after a random number of the run's shards and students
    # exist, plus a random fraction of a second (so that kills also land inside training steps).
    rng = random.Random(20261123)
    kills, total = 0, len(expected)
    for trial in range(4):
        done = len(digests(run))
        if done >= total - 2:
            break
        target = rng.randint(done + 1, total - 2)
        proc = spawn_cli("run", run, "--config", plain(cfg))
        while len(digests(run)) < target and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break
        kill_group(proc, signal.SIGKILL)
        kills += 1
    assert kills >= 1
    res = run_cli("run", run, "--config", plain(cfg))
    assert res.returncode == 0, failure_text(res.stderr)
    assert digests(run) == expected
    assert round_metrics(run) == round_metrics(ref)
    assert manifests(run, tokens=False) == manifests(ref, tokens=False)
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or p.name.startswith(".incoming")]


def round_metrics(run: Path) -> list[dict]:
    keys = ("round", "step", "global_step", "lr", "loss", "rkl", "fkl", "grad_norm", "gate_fraction")
    out = []
    for path in sorted(run.glob("round-*/train/metrics.jsonl")):
        out += [{k: json.loads(line)[k] for k in keys} for line in path.read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def background():
    bg = Background()
    yield bg
    bg.close()


@pytest.fixture(scope="module")
def three_rounds(toy, tmp_path_factory, background):
    """A persistent `run` of three rounds (one process, each model loaded once): `.cfg`, `.run`.
    Started beside it, in the background, what later tests compare it with and which reads nothing
    of it: `.staged` (the stage commands one by one, then eval of base and final) and `.sequential`
    (the same `run` with score_teacher.overlap_rollouts off), each a Future of its processes.
    Three rollout shards per round, scored while the next are sampled (the default); the rollout
    writer pauses 3 s before recording shard 1, time for the teacher to score shard 0 meanwhile."""
    tmp = tmp_path_factory.mktemp("three")
    cfg = write_config(tmp / "cfg.yaml", toy, rounds=3,
                       prompts={"path": str(toy.train_prompts), "limit": 12, "prompts_per_round": 8},
                       rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 3,
                                "vllm": {"enforce_eager": True, "dtype": "float32"}},
                       score_teacher={"top_k": 8},
                       train={**TRAIN, "lr_schedule": "cosine", "warmup_steps": 3, "checkpoint_every": 1},
                       eval={"prompts": {"path": str(toy.eval_prompts), "limit": 4}, "verifier": "toy", "samples": 3,
                             "max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "models": ["base", "teacher", "final"],
                             "vllm": {"enforce_eager": True, "dtype": "float32"}})
    without_eval = yaml.safe_load(cfg.read_text())
    del without_eval["eval"]
    (tmp / "plain.yaml").write_text(yaml.safe_dump(without_eval))
    staged = tmp / "staged"
    stage_commands = [cli(stage, staged, "--config", cfg, "--round", r) for r in range(3)
                      for stage in ("rollout", "score-teacher", "train")]
    evals = [cli("eval", staged, "--config", cfg, "--model", model) for model in ("base", "final")]
    later = SimpleNamespace(cfg=cfg, staged_dir=staged, staged=background.submit(*stage_commands, *evals),
                            sequential_dir=tmp / "sequential")
    later.sequential = background.submit(cli("run", later.sequential_dir, "--config", plain(cfg), "--set",
                                             "score_teacher.overlap_rollouts=false"))
    run = tmp / "persistent"
    res = run_cli("run", run, "--config", cfg, env={"EOPD_TEST_PAUSE": "shard_compute:1:3"})
    assert res.returncode == 0, failure_text(res.stderr)
    # base and final are evaluated with the rollout engine (weights loaded in place); the quick toy's
    # teacher has another architecture than its student, so it gets its own eval process and engine.
    assert "$ eopd-pipe eval" in res.stderr and "--model teacher" in res.stderr
    assert "--model base" not in res.stderr and "--model final" not in res.stderr
    # The barely trained toy student rarely ends within 12 tokens: `run` says so after each round.
    from pipeline.health import round_health

    assert round_health(run, 0).length_fraction > 0.5
    assert "warning: round 0: " in res.stderr and "ended at rollout.max_tokens=12" in res.stderr, res.stderr[-3000:]
    later.run = run
    return later


def plain(cfg: Path) -> Path:
    """The fixture's config without its eval section (written beside it)."""
    return cfg.parent / "plain.yaml"


def test_persistent_run_writes_exactly_what_the_stage_commands_write(three_rounds, tmp_path):
    """Rows, students and per-step losses of the persistent run equal those of rollout,
    score-teacher and train run one by one as separate processes (optimiser carried by checkpoint)."""
    persistent, staged = three_rounds.run, three_rounds.staged_dir
    all_ok(three_rounds.staged.result(timeout=7200), 9 + 2)  # started beside the fixture's run
    assert digests(staged) == digests(persistent)
    assert len([k for k in digests(staged) if k.endswith("model.safetensors")]) == 3
    assert round_metrics(staged) == round_metrics(persistent)
    # Eval with the rollout engine, its weights swapped in place, samples what a new engine samples.
    for model in ("base", "final"):
        fresh, reused = (json.loads((r / "eval" / f"{model}.json").read_text()) for r in (staged, persistent))
        for result in (fresh, reused):
            del result["sample_seconds"], result["model_path"]
        assert fresh == reused and fresh["problems"] == 4


def test_one_optimisation_across_rounds(three_rounds, tmp_path):
    """Warm-up once, one cosine over all rounds; and the optimiser state matters: the same round
    trained with a fresh AdamW (its predecessor's checkpoints deleted) takes other steps, with a warning."""
    from pipeline.config import load_config
    from pipeline.training import lr_factor

    cfg, persistent = three_rounds.cfg, three_rounds.run
    m = round_metrics(persistent)
    tc = load_config(cfg, ()).train
    total = len(m)
    assert [x["global_step"] for x in m] == list(range(1, total + 1)) and {x["round"] for x in m} == {0, 1, 2}
    for x in m:  # the lr logged at a step is the one its update used
        assert x["lr"] == pytest.approx(tc.lr * lr_factor(x["global_step"] - 1, total, tc), rel=1e-9)
    assert m[0]["lr"] < m[2]["lr"]  # warm-up, in round 0 only
    run = tmp_path / "fresh-optimiser"
    shutil.copytree(persistent, run, ignore=shutil.ignore_patterns("round-0002"))
    shutil.rmtree(run / "round-0001" / "train" / "checkpoints")
    for stage in ("rollout", "score-teacher", "train"):
        res = run_cli(stage, run, "--round", "2")
        assert res.returncode == 0, failure_text(res.stderr)
    assert "round 1 has no complete checkpoint" in res.stdout + res.stderr
    fresh = [x for x in round_metrics(run) if x["round"] == 2]
    carried = [x for x in m if x["round"] == 2]
    assert [x["lr"] for x in fresh] == pytest.approx([x["lr"] for x in carried])  # the schedule stays global
    assert fresh[0]["loss"] == carried[0]["loss"]  # same weights, same rows: same first loss
    assert fresh[1]["loss"] != carried[1]["loss"]  # ... but Adam's state moved the first step differently


def test_overlapped_rounds_write_what_sequential_rounds_write(three_rounds, tmp_path):
    """`score_teacher.overlap_rollouts` (the fixture's default) scored teacher shard 0 before rollout
    shard 1 existed, in every round; with it off the rounds write the same rollout and teacher
    shards, manifests (plans included), students and per-step losses."""
    overlapped = three_rounds.run
    for r in range(3):
        rd = overlapped / f"round-{r:04d}"
        assert (rd / "teacher" / "part-00000.parquet").stat().st_mtime_ns \
            < (rd / "rollouts" / "part-00001.parquet").stat().st_mtime_ns, f"round {r} was not overlapped"
    run = three_rounds.sequential_dir
    all_ok(three_rounds.sequential.result(timeout=7200), 1)  # started beside the fixture's run
    assert len([k for k in digests(run) if "/teacher/" in k]) == 9
    assert digests(run) == digests(overlapped)
    assert manifests(run) == manifests(overlapped)
    assert round_metrics(run) == round_metrics(overlapped)


def test_training_streamed_on_the_first_teacher_shards(toy, three_rounds, background, tmp_path):
    """train.data_order=shards: round 0's first optimiser step is taken while the teacher has not yet
    written shard 2 (its scoring paused there until the SIGTERM, however slow the machine); a SIGTERM
    then, while the trainer waits for that shard, saves the step taken (exit 143); a SIGKILL in round
    1's streamed training; the same command then finishes with the rollout and teacher shards,
    manifests, students and per-step losses of the stage commands run one after another with the
    same config. Round 0's rollouts and teacher shards do not depend on the training config: the
    stage commands' reference starts from `three_rounds`' (equal to its stage commands' by
    test_persistent_run_writes_exactly_what_the_stage_commands_write) and runs the rest beside."""
    cfg = write_config(tmp_path / "cfg.yaml", toy, rounds=2,
                       prompts={"path": str(toy.train_prompts), "limit": 12, "prompts_per_round": 8},
                       rollout={"n": 2, "max_tokens": 12, "prompts_per_shard": 3,
                                "vllm": {"enforce_eager": True, "dtype": "float32"}},
                       score_teacher={"top_k": 8}, train={**TRAIN, "data_order": "shards"})
    staged = tmp_path / "staged"
    for stage in ("rollouts", "teacher"):
        shutil.copytree(three_rounds.run / "round-0000" / stage, staged / "round-0000" / stage)
    later = background.submit(cli("train", staged, "--config", cfg, "--round", 0),
                              *[cli(stage, staged, "--config", cfg, "--round", 1)
                                for stage in ("rollout", "score-teacher", "train")])
    # 8 prompts x 2 = shards of 6, 6, 4 responses; steps of 8: step 1 needs shards 0-1, step 2 shard 2.
    run = tmp_path / "run"
    proc = spawn_cli("run", run, "--config", cfg, env={"EOPD_TEST_PAUSE": "teacher.shard_compute:2"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached teacher.shard_compute:2")
    metrics = run / "round-0000" / "train" / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and metrics.read_text().strip(), "round 0's first optimiser step")
    assert not (run / "round-0000" / "teacher" / "part-00002.parquet").exists()
    assert "part-00002.parquet" not in recorded(run, 0, "teacher")
    assert kill_group(proc, signal.SIGTERM) == 143
    assert (run / "round-0000" / "train" / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    assert len(metrics.read_text().splitlines()) == 1

    proc = spawn_cli("run", run, "--config", cfg)
    wait_until(lambda: (run / "round-0001" / "train" / "metrics.jsonl").is_file() or proc.poll() is not None,
               "round 1's training")
    kill_group(proc, signal.SIGKILL)
    res = run_cli("run", run, "--config", cfg)
    assert res.returncode == 0, failure_text(res.stderr)

    all_ok(later.result(timeout=7200), 4)
    assert len([k for k in digests(staged) if k.endswith("model.safetensors")]) == 2
    assert digests(run) == digests(staged)
    assert round_metrics(run) == round_metrics(staged)
    assert manifests(run, tokens=False) == manifests(staged, tokens=False)
