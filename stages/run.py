"""`eopd-pipe run`: rounds 0..R-1 of rollout -> score-teacher -> train, then eval and report.

Recipe:
  1. check the config's models, freeze the config into RUN_DIR
  2. per round, each stage whose output is not complete, with each role's model loaded ONCE per
     run (`Roles`): the rollout sampler (vLLM) takes each new student's weights in place, the
     teacher stays loaded, the trainer keeps model, optimiser and RNG in memory. The stages are
     the same functions the stage commands call, so the run directory gets exactly what
     `eopd-pipe rollout/score-teacher/train` write one by one (tests/test_run.py checks rows,
     students and per-step losses). `--per-stage-processes` (and multi-rank training) runs each
     stage as its own process instead, as before.
     With `score_teacher.overlap_rollouts` (default) the round's rollouts run in a thread of this
     process (mostly waiting on vLLM's engine process) while this thread scores each rollout shard
     as soon as it is recorded (`Follow`): the rollouts still come from round r-1's student, so
     nothing is staler and every row is as in the sequential order.
     With train.data_order "shards" training also starts on the round's first teacher shards
     (`round_streamed`): rollouts and scoring in threads, each optimiser step taken as soon as the
     shards it draws from are recorded; still strictly on-policy.
  3. eval of cfg.eval.models that have no result yet, then the report plots: with the rollout
     engine, the model's weights loaded in place, where it has the student's architecture and
     tokenizer and eval.vllm is rollout.vllm (no engine start per model); else an own process
The same command resumes after preemption at any point: finished stages are skipped, an
interrupted one resumes from its shards or checkpoints.

Why vLLM runs out of this process here: its CPU worker pins OpenMP threads and replaces
`torch.set_num_threads` with a no-op in the process that hosts it, which would leave the
teacher and trainer on one core. In its own process it keeps to itself, and `collective_rpc`
reaches it there for the weight swap.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# The persistent run puts more OpenMP threads than cores to work (the trainer's and the teacher's
# beside vLLM's engine process, which inherits this): threads that spin at every barrier while
# their partner is descheduled then burn the time it needs. Waiting passively changes no number
# (round 14 of the demo trained alone: the same student bytes, 14 s instead of 95 s with other jobs
# on the machine; bench/RESULTS.md). Read when torch loads its OpenMP runtime: before any import of it.
if "torch" not in sys.modules:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from pipeline.config import Config
from pipeline.errors import Preempted, UserError
from pipeline import storage
from pipeline.models import check_model_dir
from pipeline.logs import terminal_stderr
from pipeline.progress import stage_output_to_log
from pipeline.rundir import RunDir, freeze_config
from pipeline.shards import Manifest
from pipeline.signals import PREEMPTION
from pipeline.work import Follow, test_pause

if TYPE_CHECKING:
    from stages.train import StudentUpload, TrainSummary


def _die_with_parent() -> None:
    # A stage must not outlive a killed `run` (it would race the resumed one): PR_SET_PDEATHSIG.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def run_stage(args: list[str], launcher: list[str] | None = None, say: Callable[[str], None] | None = None) -> None:
    """Run `eopd-pipe ARGS` as a child process; SIGTERM is passed on and reported as preemption.
    Inside `run`'s quiet terminal (pipeline/progress.py) the child's own output (bars, summary
    lines, an error message) goes to run's log, and a failure quotes its error lines."""
    import os

    from pipeline import logs

    cmd = (launcher or [sys.executable]) + ["-m", "pipeline.cli", *args]
    if say is not None:
        say(f"$ eopd-pipe {' '.join(args)}")
    else:
        click.secho(f"$ eopd-pipe {' '.join(args)}", fg="cyan", err=True)
    from pipeline.progress import stages_to_log

    log = logs.current_log() if stages_to_log() else None
    env = None
    if log is not None:  # the child's "terminal" is then its stdout/stderr: this process's log
        env = {k: v for k, v in os.environ.items() if k not in logs.TERMINAL_ENV}
    start = log.stat().st_size if log is not None and log.is_file() else 0
    sys.stdout.flush()
    sys.stderr.flush()
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=env)
    try:
        code = child.wait()
    except Preempted:
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise
    if code == Preempted.exit_code:
        raise Preempted()
    if code != 0:
        where = "its message is above"
        if log is not None:
            try:
                with open(log, "rb") as f:
                    f.seek(start)
                    lines = f.read().decode(errors="replace").replace("\r", "\n").splitlines()
            except OSError:
                lines = []
            said = [l for l in lines if l.startswith("error:")] or [l for l in lines if l.strip()][-5:]
            where = "it said:\n  " + "\n  ".join(said) + f"\n(all of it: {log})" if said else f"see {log}"
        raise UserError(f"`eopd-pipe {' '.join(args)}` failed (exit {code}); {where}\n"
                        f"Fix it and run the same `eopd-pipe run` again: finished work is kept")


def train_launcher(cfg: Config) -> list[str] | None:
    if cfg.train.processes <= 1:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.train.processes)]


class Roles:
    """The three roles' models, each loaded on first use and then kept for the whole run."""

    def __init__(self, run: RunDir, cfg: Config) -> None:
        self.run, self.cfg = run, cfg
        self._sampler = self._teacher = self._trainer = None

    def sampler(self, policy: Path | Callable[[], Path]):
        """`policy`: the model to start the engine from, or a function giving it (asked only when the
        engine is started: on a bucket, finding a round's policy is a request)."""
        if self._sampler is None:
            policy = policy() if callable(policy) else policy
            from pipeline.sampler import Sampler
            from pipeline.work import derive_seed

            _warn_if_sharing_a_gpu(self.cfg)
            self._sampler = Sampler(check_model_dir(policy, "student"), self.cfg.rollout.vllm, seed=derive_seed(self.cfg.seed, "rollouts"),
                                    in_process=False)
        return self._sampler

    def teacher(self):
        if self._teacher is None:
            from stages.score_teacher import load_teacher

            self._teacher = load_teacher(check_model_dir(self.cfg.teacher.path, "teacher"), self.cfg.score_teacher)
        return self._teacher

    def trainer(self):
        if self._trainer is None:
            from stages.train import Trainer

            self._trainer = Trainer(self.run, self.cfg)
        return self._trainer

    def eval_sampler(self, model: Path):
        """The rollout engine, to evaluate `model` in place of a new engine (an eval process and an
        engine start saved per model), when eval asks for the same engine settings and the model
        has the student's architecture and tokenizer (base, final, round-N; the teacher where it
        is the student's kind, as in the toy). None: evaluate in an own process."""
        if self.cfg.eval.vllm != self.cfg.rollout.vllm:
            return None
        sampler = self.sampler(self.cfg.student.path)
        return sampler if sampler.can_load(model) else None

    def close(self) -> None:
        """Free the models before eval starts its own engines (GPU memory)."""
        if self._sampler is not None:
            self._sampler.close()
        self._sampler = self._teacher = self._trainer = None
        gc.collect()


def _warn_if_sharing_a_gpu(cfg: Config) -> None:
    """vLLM takes `gpu_memory_utilization` of its GPU for weights and KV cache; in one process with the
    teacher and the trainer on the same GPU, a high fraction leaves them nothing."""
    import torch

    vc = cfg.rollout.vllm
    shared = {vc.device or "cuda:0"} & {cfg.score_teacher.device or "cuda:0", cfg.train.device or "cuda:0"}
    if torch.cuda.is_available() and shared and vc.gpu_memory_utilization > 0.5:
        click.secho(f"warning: vLLM will take {vc.gpu_memory_utilization:.0%} of {shared.pop()}, which the teacher or "
                    f"the trainer also use in this run; lower rollout.vllm.gpu_memory_utilization (e.g. 0.3), put the "
                    f"roles on different GPUs (rollout.vllm.device, score_teacher.device, train.device), or run "
                    f"with --per-stage-processes", fg="yellow", err=True)


def run_rounds_persistent(run: RunDir, cfg: Config, watch: "Watch | None" = None) -> Roles:
    """All rounds in this process, each role's model loaded once (see the module docstring).
    Returns the roles still loaded (eval may sample with the rollout engine); the caller closes them.
    `watch`: the run's progress line, learning curve and trackers (what a person watching sees)."""
    from stages.rollout import run_rollout
    from stages.score_teacher import run_score_teacher

    roles = Roles(run, cfg)
    watch = watch if watch is not None else Watch(run, cfg, bar=False)
    health = HealthWatch(run, watch.say)
    # On a bucket the last round's student uploads while this round samples from its local copy
    # (stages/train.py: StudentUpload); this round records nothing before that upload is complete.
    uploading = None

    def released() -> None:
        nonlocal uploading
        if uploading is not None:
            uploading.release()
            uploading = None
    try:
        watch.curve_point(roles, "base")
        for r in range(cfg.rounds):
            ran = not run.student_done(r)
            if ran:
                watch.start_round(r)
            if cfg.train.data_order == "shards" and not run.student_done(r) \
                    and not Manifest(run.stage_dir(r, "teacher")).is_complete():
                trained = round_streamed(run, cfg, r, roles, uploading)
                released()
                uploading = trained.student_upload
                if watch.curve_due(r):
                    released()
                watch.end_round(r, health.after_round(r), ran, roles)
                continue
            rollouts_done = Manifest(run.stage_dir(r, "rollouts")).is_complete()
            teacher_done = False  # known complete (each check is a request or two on a bucket)
            if not rollouts_done and cfg.score_teacher.overlap_rollouts \
                    and not Manifest(run.stage_dir(r, "teacher")).is_complete():
                rollouts_and_teacher_overlapped(run, cfg, r, roles, uploading)
                teacher_done = True
            elif not rollouts_done:
                summary = run_rollout(run, cfg, r, sampler=roles.sampler(_policy(run, cfg, r, uploading)),
                                      uploading=uploading)
                _require_complete(summary, "rollout", r)
            released()
            if not teacher_done and not Manifest(run.stage_dir(r, "teacher")).is_complete():
                summary = run_score_teacher(run, cfg, r, teacher=roles.teacher())
                _require_complete(summary, "score-teacher", r)
            if ran:  # (train_round looks again: another process may have trained it meanwhile)
                uploading = roles.trainer().train_round(r, upload_in_background=True).student_upload
                if watch.curve_due(r):  # the curve's point evaluates round r's student from the bucket
                    released()
            watch.end_round(r, health.after_round(r), ran, roles)
        released()
        watch.curve_point(roles, "teacher")
    except BaseException:
        if uploading is not None:  # a stop leaves the student whole where it can (a kill would not)
            with contextlib.suppress(Exception):
                uploading.release()
        roles.close()
        raise
    return roles


def _policy(run: RunDir, cfg: Config, r: int, uploading: StudentUpload | None) -> Callable[[], Path]:
    """Round r's policy for starting the rollout engine: the local copy of a student still uploading."""
    return lambda: uploading.local if uploading is not None else run.policy_for_round(cfg, r)


def rollouts_and_teacher_overlapped(run: RunDir, cfg: Config, r: int, roles: Roles,
                                    uploading: StudentUpload | None = None) -> None:
    """Round r's rollouts in a thread, scored shard by shard in this one as they are recorded.

    Only this thread sees SIGTERM (Preempted) and stops first on any error; the rollout thread is
    then asked to stop before its next shard, and waited for: a SIGTERM to the process group has
    also ended vLLM's engine, which ends its wait at once; otherwise the shard being generated is
    finished first (the engine is closed only once no thread uses it). Either way the run directory
    holds what a kill at that point would leave."""
    from stages.rollout import run_rollout
    from stages.score_teacher import run_score_teacher

    sampler, stop = roles.sampler(_policy(run, cfg, r, uploading)), threading.Event()
    rollouts = StageThread(lambda: run_rollout(run, cfg, r, sampler=sampler, stop=stop, uploading=uploading), "rollout", r)
    try:
        teacher = roles.teacher()  # round 0: loaded while the first shards are sampled
        summary = run_score_teacher(run, cfg, r, teacher=teacher,
                                    follow=InProcessFollow(run.stage_dir(r, "rollouts"), rollouts.check))
        _require_complete(summary, "score-teacher", r)
        rollouts.join()
        rollouts.check()
    finally:
        if rollouts.is_alive():
            stop.set()
            rollouts.join(timeout=10)
            if rollouts.is_alive():
                click.secho(f"stopping: waiting for round {r}'s rollout thread to finish the shard vLLM is generating",
                            err=True)
                rollouts.join()


def round_streamed(run: RunDir, cfg: Config, r: int, roles: Roles,
                   uploading: StudentUpload | None = None) -> TrainSummary:
    """Round r with train.data_order "shards": rollouts (overlapped, as above) and teacher scoring in
    threads, training in this thread, each optimiser step as soon as the teacher shards it draws
    from are recorded. Every row still comes from round r-1's student; the rows, students and losses
    are those of the same config run stage after stage. This thread alone sees SIGTERM: the trainer
    checkpoints at its next step boundary (or while it waits for a shard), then the threads are
    stopped before their next shard and waited for, as in `rollouts_and_teacher_overlapped`.
    `uploading`: round r-1's student, still uploading (see run_rounds_persistent)."""
    from stages.rollout import run_rollout
    from stages.score_teacher import run_score_teacher

    stop, threads, follow_rollouts = threading.Event(), [], None
    if not Manifest(run.stage_dir(r, "rollouts")).is_complete():
        sampler = roles.sampler(_policy(run, cfg, r, uploading))
        if cfg.score_teacher.overlap_rollouts:
            rollouts = StageThread(lambda: run_rollout(run, cfg, r, sampler=sampler, stop=stop, uploading=uploading),
                                   "rollout", r)
            threads.append(rollouts)
            follow_rollouts = InProcessFollow(run.stage_dir(r, "rollouts"), rollouts.check)
        else:
            _require_complete(run_rollout(run, cfg, r, sampler=sampler, uploading=uploading), "rollout", r)
    try:
        # Both models load here, one after the other: transformers' from_pretrained builds on the meta
        # device through process-wide state, and two loads at once in two threads break each other
        # ("Cannot copy out of meta tensor").
        teacher_model, trainer = roles.teacher(), roles.trainer()
        trainer.prepare_round(r)
        teacher = StageThread(lambda: run_score_teacher(run, cfg, r, teacher=teacher_model, follow=follow_rollouts,
                                                        stop=stop), "score-teacher", r)
        threads.append(teacher)

        def upstream_ok() -> None:  # polled by the trainer while it waits for a teacher shard
            PREEMPTION.check()
            teacher.check()
        if uploading is not None:  # round r-1 whole on the bucket before round r's training writes
            uploading.wait()
        trained = trainer.train_round(r, follow=InProcessFollow(run.stage_dir(r, "teacher"), upstream_ok),
                                      upload_in_background=True)
        for thread in threads:
            thread.join()
            thread.check()
        return trained
    finally:
        if any(t.is_alive() for t in threads):
            stop.set()
            for t in threads:
                t.join(timeout=10)
            if any(t.is_alive() for t in threads):
                click.secho(f"stopping: waiting for round {r}'s rollout and teacher threads to finish their shards",
                            err=True)
                for t in threads:
                    t.join()


class InProcessFollow(Follow):
    """`Follow` of a stage that a thread of this process writes: woken as soon as that thread
    updates the manifest, not at the next poll (every 0.25 s on a bucket: the persistent run's next
    stage would wait for it every round). Still polls for a writer elsewhere (another worker of
    the stage), on a bucket every second."""

    def __init__(self, stage_dir, check: Callable[[], None]) -> None:
        # the writer here wakes it: a poll only for a writer elsewhere, less often on a bucket (billed)
        super().__init__(stage_dir, check, 1.0 if storage.is_remote(stage_dir) else None)
        self._seen = storage.updates(self.manifest.path)

    def _pause(self) -> None:
        self.check()
        self._seen = storage.wait_for_update(self.manifest.path, self._seen, self.poll_seconds)


class StageThread(threading.Thread):
    """A stage run in a thread of this process; `check()`, from another thread, raises if it failed
    or ended with the stage incomplete."""

    def __init__(self, fn: Callable, stage: str, r: int) -> None:
        super().__init__(name=f"eopd-{stage}-round-{r}", daemon=True)  # never holds the process at exit
        self.fn, self.stage, self.round = fn, stage, r
        self.summary, self.error = None, None
        self.start()

    def run(self) -> None:
        try:
            self.summary = self.fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the thread that calls check()
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            if isinstance(self.error, (Preempted, UserError)):
                raise self.error
            raise RuntimeError(f"round {self.round} {self.stage}, run in a thread of `eopd-pipe run`, failed: "
                               f"{type(self.error).__name__}: {self.error}") from self.error
        if self.summary is not None:
            _require_complete(self.summary, self.stage, self.round)


class HealthWatch:
    """After each round: one line per sign of divergence (pipeline/health.py), said as it happens."""

    REPEATS = 3  # a warning of one kind said this often; later ones of that kind only in `status`

    def __init__(self, run: RunDir, say: Callable[[str], None] | None = None) -> None:
        self.run, self.previous = run, None
        self.say = say or (lambda line: click.secho(line, fg="yellow", err=True))
        self.said: dict[str, int] = {}

    def after_round(self, r: int):
        """Round r's figures (pipeline.health.RoundHealth), its warnings said."""
        from pipeline.health import health_warnings, round_health

        if self.previous is None and r > 0:
            self.previous = round_health(self.run.root, r - 1)
        current = round_health(self.run.root, r)
        for line in health_warnings(current, self.previous):
            kind = re.sub(r"[0-9.]+", "#", line)  # the same warning of another round
            n = self.said[kind] = self.said.get(kind, 0) + 1
            if n <= self.REPEATS:
                more = (f" (said {self.REPEATS} times now: later rounds' in `eopd-pipe status {self.run.root}`)"
                        if n == self.REPEATS else "")
                self.say(f"warning: {line}{more}")
        self.previous = current
        return current


def _require_complete(summary, stage: str, r: int) -> None:
    if not summary.complete:
        busy = f" (shards {summary.busy_elsewhere} are held by another worker)" if summary.busy_elsewhere else ""
        raise UserError(f"round {r} {stage} is not complete{busy}; run the same command again when that worker is done")


def run_all(run: RunDir, cfg: Config, allow_config_change: bool = False, per_stage_processes: bool = False) -> list[str]:
    """Everything the config asks for, skipping what is done. Returns the evaluated model names.
    The terminal gets one progress line and a summary every few rounds; what the stages print goes
    to RUN_DIR/logs/run.log (pipeline/progress.py)."""
    check_model_dir(cfg.student.path, "student")
    check_model_dir(cfg.teacher.path, "teacher")
    freeze_config(run, cfg, allow_config_change)
    root = str(run.root)
    persistent = not per_stage_processes and cfg.train.processes <= 1
    roles = watch = None

    def say(line: str) -> None:  # a stage's warning, above the progress line
        if watch is not None:
            watch.say(line)
        else:
            click.echo(line, file=terminal_stderr())
    try:
        # Everything inside, the trackers' own start and finish messages too, prints to the log.
        with stage_output_to_log(say):
            watch = Watch(run, cfg, bar=persistent)
            try:
                if persistent:
                    roles = _preemption_not_error(run_rounds_persistent, run, cfg, watch)
                elif cfg.eval.every_rounds:
                    watch.say("note: eval.every_rounds (the learning curve) is drawn by the persistent `run` only; "
                              "with --per-stage-processes evaluate a round with `eopd-pipe eval RUN_DIR --model round-N`")
                health = HealthWatch(run, watch.say)
                # (after the persistent run every round is done: nothing to look up, a request each on a bucket)
                for r in range(0 if persistent else cfg.rounds):
                    ran = not run.student_done(r)
                    if ran:
                        watch.start_round(r)
                    if not Manifest(run.stage_dir(r, "rollouts")).is_complete():
                        run_stage(["rollout", root, "--round", str(r)])
                    if not Manifest(run.stage_dir(r, "teacher")).is_complete():
                        run_stage(["score-teacher", root, "--round", str(r)])
                    if not run.student_done(r):
                        run_stage(["train", root, "--round", str(r)], train_launcher(cfg))
                        watch.end_round(r, health.after_round(r), ran, None)
                watch.close_bar()
                evaluated = []
                if cfg.eval.prompts is not None:
                    from stages.eval import resolve_model, run_eval

                    for model in cfg.eval.models:
                        if not storage.is_file(run.root / "eval" / f"{model}.json"):
                            watch.say(f"eval: {model} on {_problems(cfg)} problems x {cfg.eval.samples} samples ...")
                            sampler = roles.eval_sampler(resolve_model(run, cfg, model).path) if roles else None
                            if sampler is not None:
                                _preemption_not_error(run_eval, run, cfg, model, sampler=sampler)
                            else:
                                if roles is not None:
                                    roles.close()  # its engine's memory goes to the eval process's
                                run_stage(["eval", root, "--model", model], say=watch.say)
                        evaluated.append(model)
                watch.final_evals(evaluated)
            finally:
                watch.close()
    finally:
        if roles is not None:
            roles.close()
    return evaluated


def _problems(cfg: Config) -> str:
    limit = cfg.eval.prompts.limit if cfg.eval.prompts is not None else None
    return str(limit) if limit else "the"


class Watch:
    """What a person watching a run sees and keeps: the progress line (pipeline/progress.py), the
    learning curve (eval.every_rounds: the current student evaluated with the rollout engine,
    results in RUN_DIR/eval/curve/MODEL.json, never redone) and the experiment trackers
    (pipeline/trackers.py), all fed from what the run directory holds."""

    def __init__(self, run: RunDir, cfg: Config, bar: bool = True) -> None:
        from pipeline.progress import RunProgress, summary_every
        from pipeline.trackers import Trackers

        self.run, self.cfg = run, cfg
        done = [r for r in range(cfg.rounds) if run.student_done(r)]
        last = _last_record(run, done[-1]) if done else None
        self.progress = RunProgress(cfg.rounds, _steps_per_round(run, cfg), summary_every(cfg.rounds, cfg.logging.summary_every),
                                    rounds_done=len(done), global_step=last["global_step"] if last else 0,
                                    bar=None if bar else False)
        from pipeline import logs

        log = logs.log_path(run.root, "run") if logs.capturing() else None
        left = cfg.rounds - len(done)
        self.say(f"run {run.root}: " + (f"{left} of {cfg.rounds} rounds to go" if done else f"{cfg.rounds} rounds")
                 + (f", {self.progress.steps_per_round} optimiser steps each" if self.progress.steps_per_round else "")
                 + (f"; what the stages print: {log}" if log is not None and not logs.is_verbose() else ""))
        self.trackers = Trackers(run, cfg, self.say)
        self.trackers.send()  # whatever earlier calls (or stage commands) trained
        for model, (step, result) in _curve_points(run).items():
            self.progress.curve_point(model, result, step)

    def say(self, line: str) -> None:
        self.progress.echo(line)

    def start_round(self, r: int) -> None:
        self.progress.start_round(r, self.run.stage_dir(r, "train") / "metrics.jsonl")

    def curve_due(self, r: int) -> bool:
        """Whether round r's end evaluates round r's student (a point of the learning curve)."""
        from pipeline.trackers import curve_due

        return curve_due(self.cfg, r)

    def end_round(self, r: int, health, ran: bool, roles: Roles | None) -> None:
        last = _last_record(self.run, r)
        if roles is not None and self.curve_due(r):
            self.curve_point(roles, f"round-{r}", last["global_step"] if last else 0)
        self.trackers.send([r])
        self.progress.end_round(r, health, steps_per_round=last["step"] if last else None,
                                last_step=last["global_step"] if last else None, ran=ran)

    def curve_point(self, roles: Roles, model: str, step: int | None = None) -> None:
        """One point of the learning curve, with the rollout engine; skipped where it is done, off,
        or the engine cannot take the model (a teacher of another architecture)."""
        ec = self.cfg.eval
        if not ec.every_rounds or ec.prompts is None:
            return
        out = self.run.root / "eval" / "curve" / f"{model}.json"
        if storage.is_file(out):
            return
        from stages.eval import resolve_model, run_eval

        if step is None:
            step = 0 if model == "base" else self.progress.step
        test_pause("curve_point", step)  # the kill tests stop a run here
        sampler = roles.eval_sampler(resolve_model(self.run, self.cfg, model).path)
        if sampler is None:
            if model != "teacher":
                self.say(f"note: the learning curve needs eval.vllm equal to rollout.vllm (the rollout engine "
                         f"evaluates); {model} is left out")
            return
        t0 = time.perf_counter()
        result = _preemption_not_error(run_eval, self.run, self.cfg, model, sampler=sampler,
                                       problems=ec.curve_problems, out=out, extra={"global_step": step})
        storage.append_text(out.parent / "timings.jsonl",  # what the curve costs (bench/RESULTS.md)
                            json.dumps({"model": model, "global_step": step, "wall_s": round(time.perf_counter() - t0, 3),
                                        "sample_s": result["sample_seconds"]}) + "\n")
        self.progress.curve_point(model, result, step)
        if model in ("base", "teacher"):  # a round's point goes out with its metrics in end_round
            self.trackers.send([])
        if model in ("base", "teacher"):
            pk = result["pass_at_k"]
            top = max(pk, key=int)
            self.say(f"curve: {model} pass@1 {100 * pk['1']:.1f} pass@{top} {100 * pk[top]:.1f} "
                     f"({result['problems']} problems x {result['samples']})")

    def close_bar(self) -> None:
        self.progress.close()

    def final_evals(self, models: list[str]) -> None:
        results = []
        for m in models:
            try:
                results.append(json.loads(storage.read_text(self.run.root / "eval" / f"{m}.json")))
            except (OSError, ValueError):
                pass
        self.trackers.send_eval_table(results, self.progress.step)

    def close(self) -> None:
        self.progress.close()
        self.trackers.close()


def _last_record(run: RunDir, r: int) -> dict | None:
    path = run.stage_dir(r, "train") / "metrics.jsonl"
    try:
        lines = storage.read_text(path).splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _steps_per_round(run: RunDir, cfg: Config) -> int | None:
    """Optimiser steps per round: round 0's logged steps once it is done, else what the config gives."""
    last = _last_record(run, 0) if run.student_done(0) else None
    if last is not None:
        return int(last["step"])
    if cfg.prompts.prompts_per_round is None:
        return None
    rows = cfg.prompts.prompts_per_round * cfg.rollout.n
    return math.ceil(rows / cfg.train.batch_rows) * cfg.train.epochs


def _curve_points(run: RunDir) -> dict:
    from pipeline.trackers import curve_points

    return curve_points(run)


def _preemption_not_error(fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (Preempted, UserError):
        raise
    except Exception:
        # A SIGTERM to the process group also stops vLLM's engine process; what then fails in
        # this one is the preemption, not an error.
        if PREEMPTION.requested:
            raise Preempted() from None
        raise
