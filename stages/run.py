"""`eopd-pipe run`: rounds 0..R-1 of rollout -> score-teacher -> train, then eval and report.

Recipe:
  1. check the config's models, freeze the config into RUN_DIR
  2. per round: each stage whose output is not complete runs as its own process (so vLLM, the
     teacher and the trainer each get the machine's whole memory, and free it when done)
  3. eval of cfg.eval.models that have no result yet, then the report plots
The same command resumes after preemption at any point: finished stages are skipped, an
interrupted one resumes from its shards or checkpoints.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

import click

from pipeline.config import Config
from pipeline.errors import Preempted, UserError
from pipeline.models import check_model_dir
from pipeline.rundir import RunDir, freeze_config
from pipeline.shards import Manifest


def _die_with_parent() -> None:
    # A stage must not outlive a killed `run` (it would race the resumed one): PR_SET_PDEATHSIG.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def run_stage(args: list[str], launcher: list[str] | None = None) -> None:
    """Run `eopd-pipe ARGS` as a child process; SIGTERM is passed on and reported as preemption."""
    cmd = (launcher or [sys.executable]) + ["-m", "pipeline.cli", *args]
    click.secho(f"$ eopd-pipe {' '.join(args)}", fg="cyan", err=True)
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    try:
        code = child.wait()
    except Preempted:
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise
    if code == Preempted.exit_code:
        raise Preempted()
    if code != 0:
        raise UserError(f"`eopd-pipe {' '.join(args)}` failed (exit {code}); its message is above. "
                        f"Fix it and run the same `eopd-pipe run` again: finished work is kept")


def train_launcher(cfg: Config) -> list[str] | None:
    if cfg.train.processes <= 1:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.train.processes)]


def run_all(run: RunDir, cfg: Config, allow_config_change: bool = False) -> list[str]:
    """Everything the config asks for, skipping what is done. Returns the evaluated model names."""
    check_model_dir(cfg.student.path, "student")
    check_model_dir(cfg.teacher.path, "teacher")
    freeze_config(run, cfg, allow_config_change)
    root = str(run.root)
    for r in range(cfg.rounds):
        if not Manifest(run.stage_dir(r, "rollouts")).is_complete():
            run_stage(["rollout", root, "--round", str(r)])
        if not Manifest(run.stage_dir(r, "teacher")).is_complete():
            run_stage(["score-teacher", root, "--round", str(r)])
        if not (run.student_dir(r) / "config.json").is_file():
            run_stage(["train", root, "--round", str(r)], train_launcher(cfg))
    evaluated = []
    if cfg.eval.prompts is not None:
        for model in cfg.eval.models:
            if not (run.root / "eval" / f"{model}.json").is_file():
                run_stage(["eval", root, "--model", model])
            evaluated.append(model)
    return evaluated
