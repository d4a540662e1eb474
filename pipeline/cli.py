"""The `eopd-pipe` command line. Each stage command reads and writes only RUN_DIR."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import click

from pipeline import storage
from pipeline.config import Config, load_config
from pipeline.errors import Preempted, UserError
from pipeline.models import use_cpu_threads
from pipeline.logs import capture_logs, log_path, print_exception_to_terminal, set_verbose, terminal_stderr
from pipeline.rundir import RunDir
from pipeline.signals import PREEMPTION
from pipeline.work import StageSummary, WorkerSpec

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


def resolve_config(run: RunDir, config_path: Path | None, overrides: tuple[str, ...]) -> Config:
    """--config FILE if given, else the run's frozen config.yaml, else the embedded default."""
    if config_path is None and storage.is_file(run.config_path):
        config_path = run.config_path
    cfg = load_config(config_path, overrides)
    use_cpu_threads(cfg.cpu_threads)
    return cfg


class RunDirParam(click.ParamType):
    """RUN_DIR: a local directory or a bucket URL (s3://bucket/prefix). Kept as text: a `Path`
    would turn "s3://b/x" into the local folder "s3:/b/x". Schemes are checked by RunDir."""

    name = "RUN_DIR"

    def convert(self, value, param, ctx):
        text = str(value)
        if "://" not in text and Path(text).is_file():
            self.fail(f"{text} is a file; RUN_DIR is a directory (or s3://bucket/prefix)", param, ctx)
        return text


RUN_DIR = RunDirParam()


def stage_options(f):
    """Options every stage command shares."""
    f = click.argument("run_dir", type=RUN_DIR)(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="YAML config. Default: RUN_DIR/config.yaml if the run exists, else configs/default.yaml.")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key, e.g. --set rollout.n=8 (repeatable; value parsed as YAML).")(f)
    f = click.option("--allow-config-change", is_flag=True,
                     help="Replace a run's frozen config.yaml when this call's config differs (old one kept).")(f)
    return f


def sharded_options(f):
    f = click.option("--round", "round_index", type=int, default=0, show_default=True, help="Round to work on.")(f)
    f = click.option("--worker", "worker", metavar="I/N",
                     help="Do only shards i with i % N == I. Without it, processes sharing RUN_DIR split shards by lock files.")(f)
    return f


def handle_errors(f):
    """User errors: one message, exit 2. Preemption: exit 143 so schedulers see a terminated job.
    Messages go to the terminal even where stderr is a log (a stage process started by `run`)."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        PREEMPTION.install()
        try:
            return f(*args, **kwargs)
        except UserError as e:
            click.secho(f"error: {e}", fg="red", file=terminal_stderr())
            sys.exit(2)
        except Preempted:
            click.secho("preempted (SIGTERM): unfinished work abandoned cleanly; run the same command again to resume",
                        fg="yellow", file=terminal_stderr())
            sys.exit(Preempted.exit_code)
        except Exception as e:  # a bug or a library failure: the traceback, and where the library log is
            print_exception_to_terminal(e)
            sys.exit(1)
    return wrapper


VERBOSE_HELP = ("Show everything vLLM, transformers, DeepSpeed and torch print "
                "(default: only in RUN_DIR/logs/COMMAND.log).")


def quiet(name: str, dir_param: str = "run_dir"):
    """The command's library output goes to DIR/logs/NAME.log (pipeline/logs.py), DIR being the
    command's `dir_param` argument; adds -v/--verbose, which shows it instead."""
    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, verbose: bool = False, **kwargs):
            set_verbose(verbose)
            root = storage.location(kwargs[dir_param])
            if storage.is_remote(root):  # logs are written locally, then uploaded when the command ends
                local = storage.cache_root() / "logs" / hashlib.sha256(str(root).encode()).hexdigest()[:16]
                local.mkdir(parents=True, exist_ok=True)
                try:
                    with capture_logs(log_path(local, name), only_inside=local):
                        return f(*args, **kwargs)
                finally:
                    if log_path(local, name).is_file():
                        with contextlib.suppress(UserError):  # the command's own error is the one to report
                            storage.write_bytes(log_path(root, name), log_path(local, name).read_bytes())
            # only_inside: a call refused before it creates the directory must not leave it behind.
            with capture_logs(log_path(root, name), only_inside=root):
                return f(*args, **kwargs)
        return click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)(wrapper)
    return decorate


def report_stage(summary: StageSummary, name: str) -> None:
    s = summary
    rate = f", {s.tokens / s.seconds:,.0f} tokens/s" if s.seconds else ""
    click.echo(f"{name}: {len(s.done_now)} shard(s) done now, {len(s.done_before)} before{rate}; "
               f"stage {'complete' if s.complete else 'incomplete'} ({s.stage_dir})")
    if s.busy_elsewhere:
        click.echo(f"{name}: shards {s.busy_elsewhere} are being done by another worker")


@click.group(context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
def main(verbose: bool) -> None:
    """eopd-pipe: Entropy-Aware On-Policy Distillation as resumable stages.

    \b
    One round:  rollout -> score-teacher -> train   (or `run` for all rounds)
    Every stage resumes after kill -9 or SIGTERM: run the same command again.
    Everything lives in RUN_DIR; see `eopd-pipe status RUN_DIR`.
    What vLLM, transformers and DeepSpeed print goes to RUN_DIR/logs/COMMAND.log (-v: to the terminal).
    """
    set_verbose(verbose)


@main.command(context_settings=CONTEXT)
@stage_options
@sharded_options
@handle_errors
@quiet("rollout")
def rollout(run_dir, config_path, overrides, allow_config_change, round_index, worker):
    """Sample student responses with vLLM into RUN_DIR/round-R/rollouts/.

    Round 0 samples from the base student (student.path), round R>0 from round R-1's trained
    student. Stores sampled token ids and their behaviour log-probs in zstd Parquet shards.
    """
    from stages.rollout import run_rollout

    run = RunDir(run_dir)
    cfg = resolve_config(run, config_path, overrides)
    summary = run_rollout(run, cfg, round_index, WorkerSpec.parse(worker), allow_config_change)
    report_stage(summary, "rollout")


@main.command("score-teacher", context_settings=CONTEXT)
@stage_options
@sharded_options
@handle_errors
@quiet("score-teacher")
def score_teacher(run_dir, config_path, overrides, allow_config_change, round_index, worker):
    """Score round R's rollouts with the teacher into RUN_DIR/round-R/teacher/.

    One teacher forward pass per response; stores per token the teacher's top-k ids and
    log-probs (compressed), the exact full-vocabulary entropy and the sampled token's log-prob,
    so that training never needs the teacher in memory.
    """
    from stages.score_teacher import run_score_teacher

    run = RunDir(run_dir)
    cfg = resolve_config(run, config_path, overrides)
    report_stage(run_score_teacher(run, cfg, round_index, WorkerSpec.parse(worker), allow_config_change), "score-teacher")


@main.command(context_settings=CONTEXT)
@stage_options
@click.option("--round", "round_index", type=int, default=0, show_default=True, help="Round to train.")
@click.option("--local_rank", "--local-rank", type=int, hidden=True, help="Set by the deepspeed launcher.")
@handle_errors
@quiet("train")
def train(run_dir, config_path, overrides, allow_config_change, round_index, local_rank):
    """Train round R's student on RUN_DIR/round-R/teacher/ with the entropy-gated objective.

    Writes metrics to round-R/train/metrics.jsonl, checkpoints every train.checkpoint_every steps
    and on SIGTERM, resumes from the newest checkpoint, and ends by writing round-R/student/.
    Several GPUs: set train.deepspeed (configs/deepspeed/*.json) and launch with
    `deepspeed --num_gpus N $(which eopd-pipe) train RUN_DIR` or `torchrun --nproc_per_node N -m pipeline.cli train RUN_DIR`.
    """
    from stages.train import run_train

    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    run = RunDir(run_dir)
    cfg = resolve_config(run, config_path, overrides)
    s = run_train(run, cfg, round_index, allow_config_change)
    if s.total_steps == 0:
        click.echo(f"train: {s.student_dir} already written; nothing to do")
    else:
        last = s.last_metrics or {}
        click.echo(f"train: {s.steps_done_now} step(s) done now (resumed after step {s.resumed_from}), "
                   f"final loss {last.get('loss', float('nan')):.4f}; student written to {s.student_dir}")


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=RUN_DIR)
@click.option("--verify", is_flag=True, help="Also check every shard's sha256 against its manifest.")
@click.option("--repair", is_flag=True,
              help="Rebuild a deleted or corrupted manifest.json from the shards that read back whole with the "
                   "stage's columns (others are renamed *.bad and redone by the stage).")
@click.option("--no-health", is_flag=True, help="Skip the health figures (they read two columns of every shard).")
@click.option("--round", "round_index", type=int, default=None, help="Show round R in full (stages, checkpoint, health, warnings).")
@click.option("--all", "show_all", is_flag=True, help="Show every round in full (the compact screen collapses finished rounds).")
@handle_errors
def status(run_dir, verify, repair, no_health, round_index, show_all):
    """One screen for any run length: finished rounds collapsed, health as a trend, in full the
    rounds in progress or with a warning (--round R, --all). Per round: what is done, what is in
    progress and by which worker (host, pid, Slurm task, Ray node; a bucket lease's age), the last
    checkpoint, the health figures (on-policy KL at the start of the round, responses at max_tokens,
    student entropy, gate fraction, pass@k) and warnings when a round looks divergent."""
    from stages.status import repair_run, status_text, verify_run

    run = RunDir(run_dir)
    if repair:
        for line in repair_run(run):
            click.echo(f"repair: {line}")
    text = status_text(run, health=not no_health, round_index=round_index, show_all=show_all)
    for line in text.splitlines():
        click.secho(line, fg="yellow" if line.lstrip().startswith("warning:") else None)
    if verify:
        problems = verify_run(run)
        if problems:
            raise UserError("shard check failed:\n  " + "\n  ".join(problems))
        click.echo("all shards match their manifests")


@main.command("run", context_settings=CONTEXT)
@stage_options
@click.option("--per-stage-processes", is_flag=True,
              help="Run every stage of every round as its own process (models loaded per stage) instead of "
                   "keeping each role's model loaded for the whole run. Same results; slower rounds.")
@handle_errors
@quiet("run")
def run_cmd(run_dir, config_path, overrides, allow_config_change, per_stage_processes):
    """All rounds: rollout -> score-teacher -> train, then eval and report.

    Each role's model is loaded once for the whole run: the vLLM sampler takes each new student's
    weights in place, the teacher stays loaded, the trainer keeps model and optimiser in memory.
    What is written to RUN_DIR is exactly what the stage commands write one by one, and finished
    stages are skipped, so the same command resumes after a kill or preemption at any point.
    Ends with the eval table and the plot paths.
    """
    from stages.eval import format_eval_table
    from stages.report import make_report
    from stages.run import run_all

    run = RunDir(run_dir)
    cfg = resolve_config(run, config_path, overrides)
    models = run_all(run, cfg, allow_config_change, per_stage_processes)
    if models:
        results = [json.loads(storage.read_text(run.root / "eval" / f"{m}.json")) for m in models]
        click.echo(format_eval_table(results))
    for path in make_report(run):
        click.echo(f"plot: {path}")


@main.command("eval", context_settings=CONTEXT)
@stage_options
@click.option("--model", default="final", show_default=True,
              help="base (student.path), teacher, final (the newest trained student) or round-N.")
@handle_errors
@quiet("eval")
def eval_cmd(run_dir, config_path, overrides, allow_config_change, model):
    """Sample eval.samples responses per eval problem with vLLM, verify the answers and report
    pass@1..pass@k (unbiased estimator), Avg@k, token entropy and answer diversity.

    Writes RUN_DIR/eval/MODEL.json and prints a table.
    """
    from stages.eval import format_eval_table, run_eval

    run = RunDir(run_dir)
    cfg = resolve_config(run, config_path, overrides)
    click.echo(format_eval_table([run_eval(run, cfg, model, allow_config_change)]))


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=RUN_DIR)
@handle_errors
@quiet("report")
def report(run_dir):
    """PNG plots of the training metrics across rounds and of eval pass@k, into RUN_DIR/report/."""
    from stages.report import make_report

    for path in make_report(RunDir(run_dir)):
        click.echo(f"plot: {path}")


@main.command(context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True, type=RUN_DIR)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("compare"),
              show_default=True, help="Where the comparison plot goes.")
@handle_errors
@quiet("compare", dir_param="out_dir")
def compare(run_dirs, out_dir):
    """Side by side: several runs of the same setup (e.g. train.objective rkl vs eopd):
    pass@k, student entropy, FKL on high-entropy teacher tokens."""
    from stages.report import compare_runs

    table, png = compare_runs([RunDir(d) for d in run_dirs], out_dir)
    click.echo(table)
    click.echo(f"plot: {png}")


LAUNCH_TARGETS = ("rollout", "score-teacher", "train", "run")


def launch_options(f):
    """What every `launch ENGINE` command shares: TARGET RUN_DIR, the config options, --round, --workers."""
    f = click.option("--workers", type=int, default=1, show_default=True,
                     help="Workers per sharded stage (rollout, score-teacher): worker i does shards i, i+N, ...")(f)
    f = click.option("--round", "round_index", type=int, default=0, show_default=True,
                     help="Round of a single-stage TARGET (ignored for `run`, which does every round).")(f)
    f = stage_options(f)  # RUN_DIR, --config, --set, --allow-config-change
    return click.argument("target", type=click.Choice(LAUNCH_TARGETS))(f)


def launch_plan(target, run_dir, config_path, overrides, allow_config_change, round_index, workers, freeze=True):
    """The run's config (checked, and frozen into RUN_DIR unless `freeze` is off) and the jobs of
    TARGET that RUN_DIR's records do not show as done."""
    from pipeline.executors import plan_jobs
    from pipeline.models import check_model_dir
    from pipeline.rundir import freeze_config

    run = RunDir(run_dir)
    cfg = resolve_config(run, config_path, overrides)
    check_model_dir(cfg.student.path, "student")
    check_model_dir(cfg.teacher.path, "teacher")
    if freeze:  # every worker then reads RUN_DIR/config.yaml: the jobs carry no --config of their own
        cfg = freeze_config(run, cfg, allow_config_change)
    return run, cfg, plan_jobs(run, cfg.rounds, target, round_index, workers)


@main.group(context_settings=CONTEXT)
def launch() -> None:
    """Hand stages to an engine that already schedules work: local processes, Slurm job arrays,
    Ray actors. eopd-pipe never schedules itself: each engine only decides which worker takes which
    shards and brings back a lost one; RUN_DIR's records say what is done, so any launch (or a
    plain stage command) resumes what another began.

    \b
    TARGET: rollout | score-teacher | train (one round, --round R) | run (every round, then eval
    and report; only the stages not yet done are launched).
    """


@launch.command("local", context_settings=CONTEXT)
@launch_options
@handle_errors
def launch_local(target, run_dir, config_path, overrides, allow_config_change, round_index, workers):
    """Worker i of N as a process on this machine (`STAGE --worker i/N`), the N side by side, one
    job after another. A lost worker: run the same command again."""
    from pipeline.executors.local import LocalExecutor

    run, cfg, jobs = launch_plan(target, run_dir, config_path, overrides, allow_config_change, round_index, workers)
    if not jobs:
        click.echo(f"{target}: already done in {run.root}")
    LocalExecutor(run, cfg).launch(jobs, echo=lambda line: click.secho(line, fg="cyan", err=True))


@launch.command("slurm", context_settings=CONTEXT)
@launch_options
@click.option("--array-parallelism", type=int, help="At most K tasks of an array at once (sbatch --array=0-N%K).")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="[STAGE:]ARG",
              help="An sbatch option for every job, e.g. --sbatch-arg=--partition=gpu; STAGE: for one stage's jobs "
                   "only, e.g. --sbatch-arg=train:--gres=gpu:4 (STAGE: rollout, score-teacher, train, finish). Repeatable.")
@click.option("--signal-seconds", type=int, default=120, show_default=True,
              help="SIGTERM this long before the time limit (--signal=B:TERM@S): the task stops cleanly and requeues itself.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the batch scripts and the tasks' Slurm logs go (a file system the nodes share). "
                   "Default: RUN_DIR/logs/slurm; for a bucket RUN_DIR, ./eopd-slurm-logs/BUCKET/PREFIX/logs/slurm.")
@click.option("--dry-run", is_flag=True, help="Print the batch scripts and sbatch commands; submit and write nothing.")
@handle_errors
def launch_slurm(target, run_dir, config_path, overrides, allow_config_change, round_index, workers,
                 array_parallelism, sbatch_args, signal_seconds, log_dir, dry_run):
    """Submit TARGET as sbatch job arrays, once: task i of N runs the stage with
    `--worker $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`; each job waits for the previous one
    (afterok: rollout -> score-teacher -> train -> next round). `--requeue` and a SIGTERM before the
    time limit bring back a preempted or timed-out task, which resumes from RUN_DIR. Scripts and
    logs: RUN_DIR/logs/slurm/ (see --log-dir for a bucket RUN_DIR). Follow it with `eopd-pipe
    status RUN_DIR` (or squeue). The tasks get the submitting shell's environment (sbatch's
    default), so AWS_* settings for a bucket RUN_DIR reach them without being written anywhere."""
    from pipeline.executors.slurm import SlurmExecutor, check_slurm_tools, parse_sbatch_arg

    for arg in sbatch_args:  # the user's mistakes are told before RUN_DIR is touched
        parse_sbatch_arg(arg)
    if array_parallelism is not None and array_parallelism < 1:
        raise UserError(f"--array-parallelism {array_parallelism}: need at least 1")
    if not dry_run:
        check_slurm_tools()
    run, cfg, jobs = launch_plan(target, run_dir, config_path, overrides, allow_config_change, round_index, workers,
                                 freeze=not dry_run)
    if not jobs:
        click.echo(f"{target}: already done in {run.root}; nothing to submit")
        return
    SlurmExecutor(run, cfg, array_parallelism, sbatch_args, signal_seconds, log_dir=log_dir).launch(
        jobs, dry_run=dry_run, echo=click.echo)


@launch.command("ray", context_settings=CONTEXT)
@launch_options
@click.option("--address", help="The Ray cluster to join (ray.init address, e.g. auto or ray://HEAD:10001). "
                                "Default: RAY_ADDRESS, else a new Ray instance on this machine.")
@click.option("--cpus-per-worker", type=float, default=1, show_default=True, help="CPUs each worker actor reserves (a fraction lets actors share a node's CPUs).")
@click.option("--gpus-per-worker", type=float, default=0, show_default=True,
              help="GPUs each worker actor reserves (1: one actor per GPU, holding that GPU's engine).")
@handle_errors
def launch_ray(target, run_dir, config_path, overrides, allow_config_change, round_index, workers, address,
               cpus_per_worker, gpus_per_worker):
    """Run TARGET on a Ray cluster. A sharded stage: --workers long-lived actors, each holding the
    stage's engine (the vLLM sampler, the loaded teacher), this driver handing shard indices to
    whichever actor is free. `run`: the rollout, teacher and trainer roles as actors (2 x --workers
    + 1 of them), kept for the whole run where the cluster holds them all (each new student's weights
    loaded in place from RUN_DIR), else taking turns; a cluster too small for one role is refused at
    once with what it needs. Then eval and report as a task. An actor lost with its node is rebuilt by Ray (max_restarts=-1) and its call retried there
    (max_task_retries=-1); a restarted driver re-reads RUN_DIR's records and redoes only what they
    lack. Needs the `ray` extra."""
    from pipeline.executors import require_extra
    from pipeline.executors.ray import RayExecutor
    from stages.launch import ShardEngine, TrainEngine, run_command

    from pipeline.rundir import freeze_config

    require_extra("ray", "ray", "eopd-pipe launch ray")  # before RUN_DIR is touched
    run, cfg, jobs = launch_plan(target, run_dir, config_path, overrides, allow_config_change, round_index, workers,
                                 freeze=False)
    executor = RayExecutor(run, cfg, ShardEngine, workers, address, cpus_per_worker, gpus_per_worker,
                           trainer=TrainEngine, command=run_command)
    try:
        if jobs:  # a cluster too small is refused before RUN_DIR is written (no config.yaml left behind)
            executor.connect()
            executor.fit(jobs)
        executor.cfg = freeze_config(run, cfg, allow_config_change)  # every actor reads RUN_DIR/config.yaml
        if not jobs:
            click.echo(f"{target}: already done in {run.root}")
            return
        runs = executor.launch(jobs, echo=click.echo)
    finally:
        executor.shutdown()
    if runs and runs[-1].job == "finish":
        click.echo(runs[-1].results[0]["stdout"].rstrip())


@main.command("make-toy", context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help="Untrained tiny models in seconds (for tests), instead of the trained demo teacher.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
@quiet("make-toy", dir_param="out_dir")
def make_toy_cmd(out_dir, quick, seed):
    """Build tiny local models and a task dataset: tokenizer, teacher, student, prompts.

    Offline and deterministic. The demo version trains the teacher on the task for a few CPU
    minutes so that it is accurate and genuinely uncertain where several solution paths exist.
    """
    from pipeline.toy import make_toy

    assets = make_toy(out_dir, seed=seed, quick=quick)
    click.echo(f"teacher: {assets.teacher}\nstudent: {assets.student}\n"
               f"train prompts: {assets.train_prompts}\neval prompts: {assets.eval_prompts}")


if __name__ == "__main__":
    main(prog_name="eopd-pipe")
