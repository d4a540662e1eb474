"""Experiment trackers: `logging.report_to: [tensorboard, wandb, trackio, mlflow]` (any subset).

What each tracker gets, from the files the run directory already holds (the only truth):
- every training metric of every step, `train/KEY` at its global step, read from round R's
  `train/metrics.jsonl` once round R's student is written (so a tracker never holds a step that a
  resume redoes: what it has equals metrics.jsonl's, also after a kill; a round's curves arrive
  when the round ends);
- the learning curve (eval.every_rounds, RUN_DIR/eval/curve/*.json): `curve/pass_at_K` at the step it
  was taken, base and teacher as `curve/base_pass_at_K`, `curve/teacher_pass_at_K` (mlflow allows no "@");
  wandb keeps only rising steps, so what comes after the last training step (the teacher's point, the
  final eval's scalars) goes to its run summary;
- the resolved config once, when the tracker run is created;
- the final eval (RUN_DIR/eval/*.json) as one table at the end, and `eval/MODEL/pass_at_K` scalars.

RUN_DIR/trackers/state.json keeps, per tracker, its run's id and how far it has been sent (the
last global step, the curve points, whether the table went): a resumed `run` continues the same
tracker run from there, and a tracker added later catches up on everything. A tracker that cannot
start (not installed, no login, a bad URI) or fails later says so once on the terminal; the run
goes on without it.

Where each writes by default (the usual environment variables override):
  tensorboard  RUN_DIR/trackers/tensorboard/       (`tensorboard --logdir RUN_DIR/trackers/tensorboard`)
  wandb        RUN_DIR/trackers/wandb/ + the wandb server (WANDB_MODE=offline: local only; `wandb sync`)
  trackio      trackio's local store (TRACKIO_DIR; `trackio show`)
  mlflow       MLFLOW_TRACKING_URI, else the file store RUN_DIR/trackers/mlruns (`mlflow ui --backend-store-uri ...`)

A kill between a tracker's write and the state file's update (a few milliseconds per round) makes
the next `run` send that round again: the same values at the same steps, twice in stores that keep
duplicates (mlflow, tensorboard).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Callable, Sequence

from pipeline import storage
from pipeline.rundir import RunDir, atomic_write_text

NAMES = ("tensorboard", "wandb", "trackio", "mlflow")
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
SKIP_KEYS = {"round", "step", "global_step"}  # the step itself, not a metric


def train_values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record -> {train/KEY: value} of its numbers (NaN kept: it is what was logged)."""
    return {f"train/{k}": float(v) for k, v in record.items()
            if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- one tracker each


class Tracker:
    name = ""
    lag = 0.0  # seconds until what it was given is in its store for sure (a kill before loses it)

    def start(self, run: RunDir, project: str, run_name: str, config: dict, state: dict) -> dict:
        """Open (or resume, from `state`) the tracker run; returns what to keep in state.json."""
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, run, project, run_name, config, state):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run.local_dir("trackers") / "tensorboard"
        self.writer = SummaryWriter(str(self.dir))
        if not state.get("config_sent"):
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
        return {"dir": str(self.dir), "config_sent": True}

    def log(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def table(self, name, columns, rows):
        md = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        md += "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in rows)
        self.writer.add_text(name, md, 0)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"
    FLUSH = 1.0  # seconds between wandb's writes to the run's .wandb file (its default: 15)
    lag = FLUSH + 1.0

    def start(self, run, project, run_name, config, state):
        import wandb

        run_id = state.get("id") or uuid.uuid4().hex[:8]
        directory = run.local_dir("trackers")
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(directory),
                              config=config, settings=wandb.Settings(silent=True, console="off",
                                                                     x_transaction_log_flush_interval=self.FLUSH))
        self.wandb = wandb
        self.last = state.get("step", -1)  # wandb drops a row whose step is not above the last one
        return {"id": run_id}

    def log(self, values, step):
        if step > self.last:
            self.run.log(values, step=step, commit=True)
            self.last = step
        else:  # after training (the teacher's curve point, the final eval): the run's summary
            self.run.summary.update(values)

    def table(self, name, columns, rows):
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)})

    def close(self):
        self.run.finish()


class TrackioTracker(Tracker):
    name = "trackio"

    def start(self, run, project, run_name, config, state):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_name, config=config, resume="allow", auto_log_cpu=False)
        return {"name": run_name, "project": project}

    def log(self, values, step):
        self.trackio.log(values, step=step)

    def table(self, name, columns, rows):
        import pandas as pd

        self.trackio.log({name: self.trackio.Table(dataframe=pd.DataFrame(rows, columns=columns))})

    def flush(self):
        # trackio writes its queue from a thread every few seconds and has no public flush: a kill
        # after state.json moved on would lose that queue for good (seen in tests/test_trackers.py).
        write = getattr(self.run, "_flush_queues_inline", None)
        lock = getattr(self.run, "_client_lock", None)
        if write is not None and lock is not None:
            with lock:
                write()

    def close(self):
        self.trackio.finish()


class MlflowTracker(Tracker):
    name = "mlflow"

    def start(self, run, project, run_name, config, state):
        import os

        uri = os.environ.get("MLFLOW_TRACKING_URI") or state.get("uri")
        if not uri:
            uri = (run.local_dir("trackers") / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps it for local use
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        run_id = state.get("id")
        if run_id is None:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            from mlflow.entities import Param

            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                      for k, v in flat_config(config).items()]
            for i in range(0, len(params), 100):  # mlflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id = run_id
        return {"id": run_id, "uri": uri}

    def log(self, values, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def table(self, name, columns, rows):
        self.client.log_table(self.run_id, {c: [row[i] for row in rows] for i, c in enumerate(columns)},
                              f"{name}.json")

    def close(self):
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, WandbTracker, TrackioTracker,
                                                           MlflowTracker)}


# ----------------------------------------------------------------------------- the set of them


def curve_due(cfg, r: int) -> bool:
    """Whether round r's end evaluates round r's student (a point of the learning curve)."""
    every = cfg.eval.every_rounds
    return bool(every) and cfg.eval.prompts is not None and ((r + 1) % every == 0 or r + 1 == cfg.rounds)


class Trackers:
    """The trackers of one `run`; each method sends what is not sent yet (see the module docstring)."""

    def __init__(self, run: RunDir, cfg, say: Callable[[str], None]) -> None:
        from pipeline.config import config_to_dict

        self.run, self.say, self.cfg = run, say, cfg
        self.path = run.root / "trackers" / "state.json"
        self.state: dict[str, dict] = json.loads(storage.read_text(self.path)) if storage.is_file(self.path) else {}
        self.open: dict[str, Tracker] = {}
        lc = cfg.logging
        run_name = lc.run_name or run.root.resolve().name
        config = config_to_dict(cfg)
        for name in lc.report_to:
            tracker = TRACKERS[name]()
            try:
                kept = tracker.start(run, lc.project, run_name, config, self.state.get(name, {}))
            except Exception as e:  # noqa: BLE001 -- a tracker must never stop training
                hint = (f"pip install 'eopd-pipe[{EXTRA[name]}]'" if isinstance(e, ImportError)
                        else "check its settings and login")
                self.say(f"warning: tracker {name} could not start ({type(e).__name__}: {_first_line(e)}); "
                         f"{hint}; the run goes on without it")
                continue
            self.state[name] = {**self.state.get(name, {}), **kept}
            self.open[name] = tracker
        # What this process has given each tracker; state.json holds what is surely in its store
        # (for wandb: what it was given `lag` seconds ago), so a resume after a kill sends the rest again.
        self.sent = {name: {"step": self.state[name].get("step", 0), "curve": sorted(self.state[name].get("curve", [])),
                            "eval_table": self.state[name].get("eval_table")} for name in self.open}
        self.given: dict[str, list[tuple[float, dict]]] = {name: [] for name in self.open}
        if self.open:
            self._save()

    def _given(self, name: str, tracker: Tracker) -> None:
        """The tracker got self.sent[name]: move state.json on as far as its store surely holds."""
        snapshot = json.loads(json.dumps(self.sent[name]))
        if tracker.lag <= 0:
            self.state[name].update(snapshot)
            return
        now = time.monotonic()
        history = self.given[name]
        history.append((now, snapshot))
        while history and history[0][0] <= now - tracker.lag:
            self.state[name].update(history.pop(0)[1])

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state, indent=1) + "\n")

    def _each(self, fn: Callable[[str, Tracker, dict], None]) -> None:
        for name, tracker in list(self.open.items()):
            try:
                fn(name, tracker, self.state[name])
            except Exception as e:  # noqa: BLE001
                self.say(f"warning: tracker {name} failed ({type(e).__name__}: {_first_line(e)}); "
                         f"the run goes on without it")
                self.open.pop(name, None)
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001
                    pass

    def send(self, rounds: Sequence[int] | None = None) -> None:
        """What is not sent yet: the training metrics of `rounds` (default: every round whose student is
        written), each step once, and the learning-curve points (RUN_DIR/eval/curve/*.json), merged
        by global step and sent in step order (wandb keeps only rising steps)."""
        if not self.open:
            return
        if rounds is None:  # a catch-up (a resumed run's start)
            rounds = [r for r in self.run.rounds_present() if self.run.student_done(r)]
            # A round whose curve point is due but not evaluated yet (killed during that eval) waits, and
            # every later round with it: its end sends the point with its steps (wandb drops a second row
            # at a step it already has).
            missing = [r for r in rounds if curve_due(self.cfg, r)
                       and not storage.is_file(self.run.root / "eval" / "curve" / f"round-{r}.json")]
            if missing:
                rounds = [r for r in rounds if r < missing[0]]
        records = [rec for r in rounds if self.run.student_done(r) for rec in _metrics(self.run, r)]
        points = curve_points(self.run)

        def send(name, tracker, st):
            mine = self.sent[name]
            sent, done = mine["step"], set(mine["curve"])
            rows: dict[int, dict[str, float]] = {}
            for rec in records:
                if rec["global_step"] > sent:
                    rows.setdefault(int(rec["global_step"]), {}).update(train_values(rec))
            through = max([sent] + [int(r["global_step"]) for r in records])
            for model, (step, result) in points.items():
                # a point joins the metrics of its step, so it waits for them (a catch-up sends both)
                if model not in done and (step <= through or model == "base"):
                    rows.setdefault(step, {}).update(curve_values(model, result))
                    done.add(model)
            for step in sorted(rows):
                tracker.log(rows[step], step)
            tracker.flush()
            mine["step"], mine["curve"] = through, sorted(done)
            self._given(name, tracker)
        self._each(send)
        self._save()

    def send_eval_table(self, results: Sequence[dict[str, Any]], step: int) -> None:
        """The final eval, once: a table and eval/MODEL/pass@k scalars at `step`."""
        if not self.open or not results:
            return
        ks = sorted({int(k) for r in results for k in r["pass_at_k"]})
        columns = ["model", "problems", "samples", *(f"pass@{k}" for k in ks), "mean_token_entropy",
                   "mean_distinct_correct"]
        rows = [[r["model"], r["problems"], r["samples"], *(r["pass_at_k"].get(str(k)) for k in ks),
                 r.get("mean_token_entropy"), r.get("mean_distinct_correct")] for r in results]
        sent_models = sorted(r["model"] for r in results)

        def send(name, tracker, st):
            if self.sent[name]["eval_table"] == sent_models:
                return
            tracker.log({f"eval/{r['model']}/pass_at_{k}": float(v) for r in results for k, v in r["pass_at_k"].items()},
                        step)
            tracker.table("eval", columns, rows)
            tracker.flush()
            self.sent[name]["eval_table"] = sent_models
            self._given(name, tracker)
        self._each(send)
        self._save()

    def close(self) -> None:
        def close(name, tracker, st):
            tracker.close()  # wandb's finish writes everything it was given
            st.update(self.sent[name])
        self._each(close)
        self.open = {}
        if self.state:
            self._save()


def curve_values(model: str, result: dict[str, Any]) -> dict[str, float]:
    """A curve point's tracker values: curve/pass_at_K (the student), curve/base_pass_at_K, curve/teacher_pass_at_K."""
    prefix = "curve/" if model not in ("base", "teacher") else f"curve/{model}_"
    return {f"{prefix}pass_at_{k}": float(v) for k, v in result["pass_at_k"].items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _metrics(run: RunDir, r: int) -> list[dict[str, Any]]:
    path = run.stage_dir(r, "train") / "metrics.jsonl"
    out = []
    if storage.is_file(path):
        for line in storage.read_text(path).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "global_step" in rec:
                out.append(rec)
    return out


def curve_points(run: RunDir) -> dict[str, tuple[int, dict[str, Any]]]:
    """model -> (global step, result) of the learning curve's evals, in step order (base first)."""
    out = {}
    d = run.root / "eval" / "curve"
    for path in (d / n for n in storage.names(d, "*.json")):
        try:
            result = json.loads(storage.read_text(path))
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and isinstance(result.get("pass_at_k"), dict):
            out[path.stem] = (int(result.get("global_step", 0)), result)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "teacher", kv[1][0])))


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
