"""Experiment trackers (pipeline/trackers.py), each in its own offline mode, read back from its own store:
what they hold equals metrics.jsonl's, step for step, also after a SIGKILL and a resume; a tracker that
cannot start says so once and the run goes on."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
from pathlib import Path

import pytest

VLLM = {"enforce_eager": True, "dtype": "float32", "cpu_kvcache_gib": 1.0}  # rollout's = eval's: the curve uses its engine

from conftest import kill_group, run_cli, spawn_cli, wait_for_line, write_config

TRACKERS = ["tensorboard", "wandb", "trackio", "mlflow"]
for _name in TRACKERS:
    pytest.importorskip(_name if _name != "mlflow" else "mlflow.tracking")


def tracker_env(tmp_path: Path) -> dict[str, str]:
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
            "MLFLOW_TRACKING_URI": ""}


# ----------------------------------------------------------------------------- each store, read back


def wandb_history(run_dir: Path, summary: dict | None = None) -> dict[int, dict[str, float]]:
    """step -> {key: value} of every offline .wandb file of the run (leveldb-log records of protobufs);
    `summary`, when given, gets the run summary's values."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[int, dict[str, float]] = {}
    for path in sorted((run_dir / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        pos, block, chunks = 7, 32768, b""  # 7: the file header (ident, magic, version)
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # too little room for a record header: padding to the next block
                pos += block - pos % block
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pos += 7
            if length == 0 and kind == 0:
                pos += block - pos % block if pos % block else 0
                continue
            chunks += data[pos:pos + length]
            pos += length
            if kind in (1, 4):  # FULL or LAST
                rec = pb.Record()
                rec.ParseFromString(chunks)
                chunks = b""
                if rec.WhichOneof("record_type") == "summary" and summary is not None:
                    for i in rec.summary.update:
                        summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
                if rec.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                    step = int(items.pop("_step", rec.history.step.num))
                    out.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return out


def tensorboard_history(run_dir: Path) -> dict[int, dict[str, list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, dict[str, list[float]]] = {}
    for events in sorted((run_dir / "trackers" / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                out.setdefault(e.step, {}).setdefault(tag, []).append(e.value)
    return out


def mlflow_history(run_dir: Path) -> dict[int, dict[str, list[float]]]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "trackers" / "state.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["uri"])
    run = client.get_run(state["id"])
    out: dict[int, dict[str, list[float]]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(state["id"], key):
            out.setdefault(m.step, {}).setdefault(key, []).append(m.value)
    return out


def trackio_history(store: Path, project: str, name: str) -> dict[int, dict[str, list[float]]]:
    import sqlite3

    out: dict[int, dict[str, list[float]]] = {}
    db = next(store.glob(f"{project}.db"))
    with sqlite3.connect(db) as con:
        for step, metrics in con.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (name,)):
            for k, v in json.loads(metrics).items():
                if isinstance(v, (int, float)) or v is None or isinstance(v, str):
                    out.setdefault(int(step), {}).setdefault(k, []).append(v)
    return out


def expected(run_dir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for path in sorted(run_dir.glob("round-*/train/metrics.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[rec["global_step"]] = {f"train/{k}": float(v) for k, v in rec.items()
                                       if k not in ("round", "step", "global_step") and isinstance(v, (int, float))}
    return out


def same(a: float, b) -> bool:
    b = float("nan") if b in (None, "NaN", "nan") else float(b)
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def check_train(store: dict[int, dict], want: dict[int, dict[str, float]], name: str, single: bool) -> None:
    """Every metric of every step, once (`single`: the store gives one value; else a list that must hold one)."""
    for step, values in want.items():
        assert step in store, (name, step)
        for key, value in values.items():
            got = store[step].get(key)
            if not single:
                assert got is not None and len(got) == 1, (name, step, key, got)  # no step sent twice
                got = got[0]
            assert got is not None and same(value, got), (name, step, key, value, got)
    extra = sorted(s for s, v in store.items() if any(k.startswith("train/") for k in v) and s not in want)
    assert not extra, (name, extra)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_every_tracker_equals_metrics_after_kill_and_resume(toy, tmp_path):
    """A real `run` with all four trackers, killed with SIGKILL once round 1 is trained, then resumed: each
    store holds every metrics.jsonl value at its global step exactly once, the learning curve, the config
    and the final eval table; the resumed run continued the same tracker run (ids kept)."""
    cfg = write_config(tmp_path / "c.yaml", toy, rounds=4, rollout={"n": 1, "max_tokens": 12, "prompts_per_shard": 8, "vllm": VLLM},
                       prompts={"path": str(toy.train_prompts), "limit": 16},
                       train={"batch_rows": 8, "checkpoint_every": 1, "micro_batch_tokens": 4096},
                       eval={"prompts": {"path": str(toy.eval_prompts), "limit": 8}, "verifier": "toy", "samples": 2,
                             "max_tokens": 12, "top_p": 1.0, "models": ["base", "final"], "every_rounds": 2,
                             "curve_problems": 4, "vllm": VLLM},
                       logging={"report_to": TRACKERS, "project": "eopd-test"})
    run = tmp_path / "run"
    env = tracker_env(tmp_path)
    # Killed while round 1's curve point is evaluated (its student written, the point not yet): the
    # resumed run's catch-up must not send round 1's steps without it (wandb would drop the point).
    proc = spawn_cli("run", run, "--config", cfg, env={**env, "EOPD_TEST_PAUSE": "curve_point:4"})
    wait_for_line(proc, "EOPD_TEST_PAUSE reached curve_point:4")
    assert (run / "round-0001" / "student" / "config.json").is_file()
    kill_group(proc, signal.SIGKILL)
    state_before = json.loads((run / "trackers" / "state.json").read_text())
    res = run_cli("run", run, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "could not start" not in res.stdout + res.stderr and "failed" not in res.stdout + res.stderr
    state = json.loads((run / "trackers" / "state.json").read_text())
    for name in ("wandb", "mlflow"):
        assert state[name]["id"] == state_before[name]["id"]  # the same tracker run continued
    want = expected(run)
    assert len(want) == 4 * 2  # 4 rounds x 16 responses / 8 per step

    check_train(tensorboard_history(run), want, "tensorboard", single=False)
    check_train(mlflow_history(run), want, "mlflow", single=False)
    check_train(trackio_history(tmp_path / "trackio", "eopd-test", "run"), want, "trackio", single=False)
    wb_summary: dict = {}
    wb = wandb_history(run, wb_summary)
    check_train(wb, want, "wandb", single=True)

    curve = {p.stem: json.loads(p.read_text()) for p in (run / "eval" / "curve").glob("*.json")}
    assert {"base", "round-1", "round-3"} <= set(curve)
    ml = mlflow_history(run)
    for model, result in curve.items():
        key = "curve/pass_at_1" if model.startswith("round-") else f"curve/{model}_pass_at_1"
        assert same(result["pass_at_k"]["1"], ml[result["global_step"]][key][0]), (model, key)
        # wandb keeps rising steps only: the teacher's point, after the last step, is in the run summary
        got = wb_summary[key] if model == "teacher" else wb[result["global_step"]][key]
        assert same(result["pass_at_k"]["1"], got), (model, key)
    final = json.loads((run / "eval" / "final.json").read_text())
    assert same(final["pass_at_k"]["1"], ml[8]["eval/final/pass_at_1"][0])
    assert same(final["pass_at_k"]["1"], wb_summary["eval/final/pass_at_1"])
    assert any(p.name == "eval.json" for p in (run / "trackers" / "mlruns").rglob("eval.json"))


def test_tracker_that_cannot_start_says_so_once(tmp_path, capsys):
    """mlflow pointed at a server that is not there: one line naming it, the other trackers go on."""
    from pipeline.config import load_config
    from pipeline.rundir import RunDir
    from pipeline.trackers import Trackers

    run = RunDir(tmp_path / "run")
    rd = run.round_dir(0)
    (rd / "student").mkdir(parents=True)
    (rd / "student" / "config.json").write_text("{}")
    (rd / "train").mkdir()
    records = [{"round": 0, "step": s, "global_step": s, "loss": 1.0 / s, "top10_change": math.nan if s == 1 else 0.1}
               for s in (1, 2, 3)]
    (rd / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(None, ["logging.report_to=[tensorboard, mlflow]"])
    said: list[str] = []
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                          "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    try:
        trackers = Trackers(run, cfg, said.append)
        trackers.send()
        trackers.send()  # nothing twice
        trackers.close()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert len(said) == 1 and said[0].startswith("warning: tracker mlflow could not start (") and \
        said[0].endswith("the run goes on without it"), said
    tb = tensorboard_history(run.root)
    assert sorted(tb) == [1, 2, 3] and all(len(tb[s]["train/loss"]) == 1 for s in tb)
    assert math.isclose(tb[2]["train/loss"][0], 0.5)
    state = json.loads((run.root / "trackers" / "state.json").read_text())
    assert state["tensorboard"]["step"] == 3 and "mlflow" not in state
