"""`eopd-pipe train`: the student learns from the teacher shards with the entropy-gated objective.

Recipe (per optimiser step s of the round):
  1. rows of step s: a seeded permutation of the round's responses, `batch_rows` at a time (or,
     with train.data_order "shards", shard after shard, so the persistent `run` can start training
     on the first teacher shards); split across ranks, packed into micro-batches of at most
     `micro_batch_tokens` padded tokens
  2. per micro-batch: student backbone -> hidden states at the positions predicting response
     tokens -> eopd.losses.chunked_objective (LM head + loss chunk by chunk, never full logits),
     normalised by ALL response tokens of the step (the paper's mean over response tokens)
  3. clip, AdamW step, LR schedule (cosine over all rounds); metrics to metrics.jsonl
  4. checkpoint every `checkpoint_every` steps and on SIGTERM (model, optimiser, scheduler, RNG,
     step = the data cursor, since the plan is deterministic); a restart resumes from the newest
  5. at the end: round-R/student/ (save_pretrained, model + tokenizer), written atomically
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eopd.losses import ObjectiveConfig, chunked_objective, entropy_gate
from eopd.metrics import merge_stats, student_topk_ids, summarize_stats, topk_jaccard_distance
from pipeline import storage
from pipeline.storage import Location
from pipeline.config import Config, TrainConfig
from pipeline.errors import Preempted, UserError
from pipeline.models import check_model_dir, length_sorted_batches, load_tokenizer, response_hidden_states
from pipeline.rundir import RunDir, freeze_config
from pipeline.signals import PREEMPTION
from pipeline.teacher_data import RoundRows, TeacherStream
from pipeline.training import (CHECKPOINT_DONE, DeepSpeedEngine, TorchEngine, all_reduce_sum, barrier,
                               checkpoint_name, complete_checkpoints, load_deepspeed_config, load_rng_state,
                               lr_factor, prune_checkpoints, rng_state, save_rng_state, seed_everything,
                               set_rng_state, world)
from pipeline.work import Follow, derive_seed, record_timing, test_pause

NORMALISATION = "loss = sum over response tokens of L_t / (all response tokens of the optimiser step)"


@dataclass
class TrainSummary:
    student_dir: Path
    steps_done_now: int
    total_steps: int
    resumed_from: int
    last_metrics: dict | None
    wall_seconds: float = 0.0
    load_seconds: float = 0.0
    engine_seconds: float = 0.0  # forward, backward and optimiser step (bench/end_to_end.py)
    probe_seconds: float = 0.0  # the top-10 probe's forward (a metric, not training)
    checkpoint: Future | None = None  # the round's last checkpoint while it uploads (write_student waits for it)
    student_upload: StudentUpload | None = None  # train_round(upload_in_background=True) on a bucket


def objective_config(tc: TrainConfig) -> ObjectiveConfig:
    return ObjectiveConfig(objective=tc.objective, rkl_estimator=tc.rkl_estimator, fkl_mode=tc.fkl_mode, tau=tc.tau,
                           gate_quantile=tc.gate_quantile, lam=tc.lam, clip_eps=tc.clip_eps, jsd_beta=tc.jsd_beta)


def plan_step_rows(rows_per_shard: list[int], tc: TrainConfig, seed: int, round_index: int,
                   world_size: int) -> list[list[int]]:
    """Each optimiser step's responses (the round's row indices; shards in order). Deterministic in
    (seed, round), so the step index alone is the data cursor of a checkpoint.

    train.data_order "round": a seeded permutation of all the round's responses. "shards": each
    shard's responses in a seeded order, the shards one after another, so that step s needs only
    the shards its rows come from and can start while later shards are still being scored."""
    if tc.batch_rows < world_size:
        raise UserError(f"train.batch_rows={tc.batch_rows} is smaller than the {world_size} ranks; each rank needs a response per step")
    num_rows, steps = sum(rows_per_shard), []
    for epoch in range(tc.epochs):
        if tc.data_order == "round":
            order = np.random.default_rng(derive_seed(seed, "train", round_index, epoch)).permutation(num_rows).tolist()
        else:
            starts = np.cumsum([0] + rows_per_shard[:-1])
            order = [int(a) + int(j) for i, (a, n) in enumerate(zip(starts, rows_per_shard))
                     for j in np.random.default_rng(derive_seed(seed, "train", round_index, epoch, "shard", i)).permutation(n)]
        for a in range(0, len(order), tc.batch_rows):
            step_rows = order[a : a + tc.batch_rows]
            if len(step_rows) >= world_size:  # else a tail too small to give every rank a response
                steps.append(step_rows)
    return steps


def pack_step(rows: RoundRows, step_rows: list[int], tc: TrainConfig, world_size: int) -> list[list[list[int]]]:
    """ranks -> micro-batches -> row indices of one step."""
    per_rank = [pack_micro_batches(rows, step_rows[r::world_size], tc.micro_batch_tokens) for r in range(world_size)]
    return equal_micro_batch_counts(per_rank)


def last_shard_of(step_rows: list[int], rows_per_shard: list[int]) -> int:
    """The highest shard index that holds one of `step_rows`."""
    return int(np.searchsorted(np.cumsum(rows_per_shard), max(step_rows), side="right"))


def equal_micro_batch_counts(per_rank: list[list[list[int]]]) -> list[list[list[int]]]:
    """Every rank must call backward equally often per step (ZeRO-2 reduces gradients on every
    backward): split a rank's largest micro-batch, or add an empty one (a zero-weight backward)."""
    target = max(len(mbs) for mbs in per_rank)
    out = []
    for mbs in per_rank:
        mbs = [list(mb) for mb in mbs]
        while len(mbs) < target:
            big = max(range(len(mbs)), key=lambda j: len(mbs[j]))
            if len(mbs[big]) > 1:
                half = len(mbs[big]) // 2
                mbs[big:big + 1] = [mbs[big][:half], mbs[big][half:]]
            else:
                mbs.append([])
        out.append(mbs)
    return out


def pack_micro_batches(rows: RoundRows, idx: list[int], budget: int) -> list[list[int]]:
    """Longest first, so (rows x longest sequence) <= budget wastes little padding; equal lengths
    in row order."""
    ordered = sorted(idx)
    lengths = [len(rows.prompt_ids[i]) + rows.response_length(i) for i in ordered]
    return [[ordered[j] for j in mb] for mb in length_sorted_batches(lengths, budget)]


def response_hidden(model, rows: RoundRows, batch: list[int], device: torch.device,
                    limits: list[int] | None = None) -> torch.Tensor:
    """Final hidden states [n_tokens, H] at the positions that predict each response token (only
    the first limits[j] response tokens of row batch[j], when given)."""
    seqs = [np.concatenate([rows.prompt_ids[i], rows.response_tokens(i, None if limits is None else limits[j])])
            for j, i in enumerate(batch)]
    return response_hidden_states(model, seqs, [len(rows.prompt_ids[i]) for i in batch], device)


def probe_rows(rows: RoundRows, tokens: int, within: int | None = None) -> tuple[list[int], list[int]]:
    """The probe's fixed token positions: (rows, response tokens used of each), `tokens` in all,
    from the first `within` rows (the first shard's, so that streamed training needs no other).
    Cut to exactly `tokens`, so that a 2,048-token response does not cost a 2,048-token forward per step."""
    out, limits, n = [], [], 0
    for i in range(min(rows.num_rows, within or rows.num_rows)):
        take = min(rows.response_length(i), tokens - n)
        if take > 0:
            out.append(i)
            limits.append(take)
            n += take
        if n >= tokens:
            break
    return out, limits


def init_distributed(tc: TrainConfig) -> None:
    """DeepSpeed needs a process group even for one process; the launchers set RANK/WORLD_SIZE."""
    if not tc.deepspeed:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise UserError("several ranks were launched but train.deepspeed is not set; "
                            "multi-process training runs through DeepSpeed (e.g. --set train.deepspeed=configs/deepspeed/zero2.json)")
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def load_student(path: Path, tc: TrainConfig, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[tc.dtype]
    # Plain torch keeps fp32 master weights; DeepSpeed keeps its own fp32 copy under bf16.
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype if tc.deepspeed else torch.float32).to(device)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model.train(), dtype


def _checkpoint_scratch(final) -> Path:
    """Where the ranks of one node write a checkpoint before it takes its final name: beside it
    locally (the last step is a rename), in the local cache for a bucket (then uploaded). The same
    path for every rank: DeepSpeed's ranks write their files into one directory."""
    if not storage.is_remote(final):
        return final.with_name(f".incoming-{final.name}")
    key = hashlib.sha256(str(final).encode()).hexdigest()[:16]
    return storage.cache_root() / "scratch" / f"checkpoint-{key}"


def _save_failed(where, e: BaseException) -> UserError:
    # torch.save on a full disk raises RuntimeError ("[enforce fail at inline_container.cc] unexpected pos ..."),
    # not OSError: one message either way, naming the checkpoint and the fix.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"could not write {where}: {first}; the disk may be full or not writable: free space (or fix "
                     f"permissions) and run the same command again: training resumes from the last complete checkpoint")


def _in_thread(name: str, fn: Callable, *args) -> Future:
    """`fn(*args)` in a thread of its own, which ends with it; the future gives its result or error."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def save_checkpoint(engine, ckpt_dir, step: int, client: dict, rank: int, keep: int,
                    background: bool = False) -> Future | None:
    """Collective. Written under a hidden name (locally) or in the local cache (bucket), marked
    COMPLETE, then renamed or uploaded with COMPLETE last: a kill at any point leaves either the
    previous checkpoint or this one, never a half one that resume would pick.
    `background` (rank 0, a bucket): the upload and the prune run in a thread; the returned future
    ends with them (its `result()` raises what they raised). The round's last checkpoint goes so,
    beside the student's upload, which waits for it before its own completion file."""
    final = ckpt_dir / checkpoint_name(step)
    tmp = _checkpoint_scratch(final)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        storage.mkdir(ckpt_dir)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    try:
        engine.save(tmp, client)
        save_rng_state(tmp / f"rng-rank{rank}.pt")
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(final, e) from None
    barrier()
    if rank == 0:
        try:
            (tmp / CHECKPOINT_DONE).write_text(json.dumps({"step": step}))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _save_failed(final, e) from None
        def upload() -> None:
            test_pause("checkpoint_upload", step)
            try:
                storage.upload_tree(tmp, final, last=CHECKPOINT_DONE, doing="write the checkpoint")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            prune_checkpoints(ckpt_dir, keep)

        if background and storage.is_remote(final):
            pending = _in_thread("checkpoint-upload", upload)
            barrier()
            return pending
        upload()
    barrier()
    return None


@dataclass
class StudentUpload:
    """Round R's student, whole in `local` (a scratch directory in the local cache) and uploading to
    `dest` (a bucket) in a thread: the persistent run's next round loads `local` into its engine and
    samples meanwhile, and records nothing before `wait()` returns (round R is then complete on the
    bucket). `release()` waits too, then keeps `local` as the cached copy of `dest` (or removes it)."""
    dest: Location
    local: Path
    future: Future

    def wait(self) -> None:
        self.future.result()  # raises what the upload raised (one message naming the URL)

    def release(self) -> None:
        try:
            self.wait()
            storage.adopt_into_cache(self.local, self.dest)
        finally:
            shutil.rmtree(self.local, ignore_errors=True)


def write_student(model, tokenizer_dir: Path, out, checkpoint: Future | None = None,
                  background: bool = False) -> StudentUpload | None:
    """round-R/student/: saved into a scratch directory, then renamed into place (local) or uploaded
    with config.json last (bucket), so `config.json` exists only in a whole student; and only once
    the round's last `checkpoint` (uploading meanwhile) is whole, which the next round resumes from.
    `background` (a bucket): the upload runs in a thread and is returned as a StudentUpload."""
    storage.remove_stale_tmp(out)  # a predecessor killed while saving
    tmp = storage.scratch_dir(out, "student")
    handed_over = False
    try:
        try:
            model.save_pretrained(tmp)
            load_tokenizer(tokenizer_dir).save_pretrained(tmp)
        except (OSError, RuntimeError) as e:
            raise _save_failed(out, e) from None
        before_last = checkpoint.result if checkpoint is not None else None
        if background and storage.is_remote(out):
            upload = _in_thread("student-upload", storage.upload_tree, tmp, out, "config.json", "write the student",
                                False, before_last)
            handed_over = True
            return StudentUpload(out, tmp, upload)
        # cache: the next round's sampler (the persistent run's rollout engine) reads this copy, not a download
        storage.upload_tree(tmp, out, last="config.json", doing="write the student", cache=True, before_last=before_last)
        return None
    finally:
        if not handed_over:
            shutil.rmtree(tmp, ignore_errors=True)


class Trainer:
    """The student under optimisation. `eopd-pipe train` uses one for one round; the persistent
    `eopd-pipe run` keeps one for the whole run, so model, optimiser, scheduler and RNG stay in
    memory from round to round. Either way the optimisation is ONE run across rounds (as the
    paper's verl run): Adam's moments, the global LR schedule (warm-up once) and the RNG continue
    from round r-1's final checkpoint; only a missing checkpoint restarts them (with a warning).

    Phases of `train_round(r)`: plan (the round's data order) -> restore (this round's newest
    checkpoint; else the previous round's end state, from memory or its final checkpoint) ->
    steps (loss, backward, optimiser, metrics, checkpoints) -> student (round-R/student/).
    """

    def __init__(self, run: RunDir, cfg: Config, allow_config_change: bool = False) -> None:
        self.run, self.cfg, self.tc = run, cfg, cfg.train
        if self.tc.deepspeed:
            load_deepspeed_config(self.tc, bf16=False)  # refuse a bad DeepSpeed file before any work
        init_distributed(self.tc)
        self.rank, self.world_size = world()
        if self.rank == 0:
            freeze_config(run, cfg, allow_config_change)
        if self.tc.device and self.world_size == 1:
            self.device = torch.device(self.tc.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.engine: TorchEngine | DeepSpeedEngine | None = None
        self.total_steps = 1  # the global LR schedule's length; read by the scheduler's lambda
        self.holds_end_of: int | None = None  # the round whose final state the engine holds
        self._built_for: int | None = None  # a round whose engine prepare_round built, not yet restored
        self._rng_at_end: dict | None = None

    # ------------------------------------------------------------------ phases

    def train_round(self, round_index: int, follow: Follow | None = None,
                    upload_in_background: bool = False) -> TrainSummary:
        """`follow`: the round's teacher shards are still being scored by another thread of this
        process (train.data_order "shards" only); each step waits for the shards it needs.
        `upload_in_background` (the persistent run, a bucket): the student uploads in a thread, handed
        back as `summary.student_upload`, which the caller must wait for before it records anything
        that depends on the round being complete."""
        wall0 = time.perf_counter()
        out = self.run.student_dir(round_index)
        if storage.is_file(out / "config.json"):
            return TrainSummary(out, 0, 0, 0, None)
        source, steps = self._plan(round_index, follow)
        t_load = time.perf_counter()
        start, probe_prev = self._restore(round_index, len(steps))
        load_seconds = time.perf_counter() - t_load
        summary = self._steps(round_index, source, steps, start, probe_prev)
        if self.rank == 0:
            summary.student_upload = write_student(self.engine.module, check_model_dir(self.cfg.student.path, "student"),
                                                   out, summary.checkpoint, background=upload_in_background)
        barrier()
        self.holds_end_of, self._rng_at_end = round_index, rng_state()
        summary.load_seconds = load_seconds
        summary.wall_seconds = time.perf_counter() - wall0
        if self.rank == 0:
            record_timing(self.run.round_dir(round_index), "train", summary.wall_seconds, load_seconds,
                          summary.engine_seconds + summary.probe_seconds)
        return summary

    def _plan(self, r: int, follow: Follow | None) -> tuple[TeacherStream, list[list[int]]]:
        teacher_dir = self.run.stage_dir(r, "teacher")
        fix = f"run `eopd-pipe score-teacher {self.run.root} --round {r}` first"
        rows_per_shard = None  # a complete stage: its manifest's
        if follow is not None:  # known from the rollout plan before the teacher has scored anything
            plan = Follow(self.run.stage_dir(r, "rollouts"), follow.check).data()["plan"]
            rows_per_shard = [n * self.cfg.rollout.n for n in plan["rows_per_shard"]]
        source = TeacherStream(teacher_dir, rows_per_shard, self.cfg.score_teacher.top_k, fix, follow)
        rows_per_shard = source.rows_per_shard
        steps = plan_step_rows(rows_per_shard, self.tc, self.cfg.seed, r, self.world_size)
        if not steps:
            raise UserError(f"{teacher_dir}: {sum(rows_per_shard)} responses make no optimiser step of "
                            f"train.batch_rows={self.tc.batch_rows}")
        self.total_steps = len(steps) * self.cfg.rounds
        return source, steps

    def _restore(self, r: int, round_steps: int) -> tuple[int, torch.Tensor | None]:
        """(first step to take, the probe's previous top-10) after putting the engine in the state
        that step follows. Every path gives the same state, so a resumed or stage-by-stage run
        takes the same steps as one persistent process."""
        own = complete_checkpoints(self.run.stage_dir(r, "train") / "checkpoints")
        if not own and r > 0 and self.holds_end_of == r - 1:
            set_rng_state(self._rng_at_end)  # what else ran in this process (vLLM, teacher) does not count
            return 0, None
        built_now = self.engine is None or self._built_for == r
        if self.engine is None:
            self.prepare_round(r)
        self._built_for = None
        if own:
            client = self._load(own[-1])
            return client["step"], client.get("probe_topk")
        if r == 0:
            return 0, None
        prev = complete_checkpoints(self.run.stage_dir(r - 1, "train") / "checkpoints")
        if prev:
            self._load(prev[-1])
            return 0, None
        # Round r-1 was trained elsewhere or its checkpoints were deleted: its student, a new optimiser.
        if not built_now:  # an engine from an earlier round holds another state: start one afresh
            self._build_engine(self.run.policy_for_round(self.cfg, r))
        self.engine.fast_forward(round_steps * r)
        seed_everything(derive_seed(self.cfg.seed, "train-init", r, self.rank), self.tc.deterministic)
        if self.rank == 0:
            tqdm.write(f"warning: round {r - 1} has no complete checkpoint, so round {r} continues from its student "
                       f"with a new optimiser (Adam's first steps move every weight by about lr); the LR schedule "
                       f"stays global")
        return 0, None

    def prepare_round(self, r: int) -> None:
        """Load the student if no engine is held (the persistent `run` calls this before it starts
        threads: two models loading at once in two threads break transformers' meta-device loading)."""
        if self.engine is None and not self.run.student_done(r):
            # Round 0's RNG comes from the seed; a later round's from the checkpoint it continues.
            seed_everything(derive_seed(self.cfg.seed, "train-init", r, self.rank), self.tc.deterministic)
            self._build_engine(self.run.policy_for_round(self.cfg, r))
            self._built_for = r

    def _build_engine(self, policy: Path) -> None:
        model, dtype = load_student(check_model_dir(policy, "student"), self.tc, self.device)
        lr_lambda = lambda g: lr_factor(g, self.total_steps, self.tc)  # noqa: E731 (global step)
        self.engine = (DeepSpeedEngine(model, self.tc, lr_lambda, bf16=dtype == torch.bfloat16) if self.tc.deepspeed
                       else TorchEngine(model, self.tc, lr_lambda))

    def _load(self, ckpt) -> dict:
        ckpt = storage.local_tree(ckpt, "checkpoint")  # a bucket's checkpoint: its verified local copy
        client = self.engine.load(ckpt)
        rng_file = ckpt / f"rng-rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(load_rng_state(rng_file))
        return client

    def _steps(self, r: int, source: TeacherStream, steps: list[list[int]], start: int, probe_prev) -> TrainSummary:
        tc, rank, engine, device = self.tc, self.rank, self.engine, self.device
        objective = objective_config(tc)
        offset = len(steps) * r
        train_dir = self.run.stage_dir(r, "train")
        ckpt_dir, metrics_path = train_dir / "checkpoints", train_dir / "metrics.jsonl"
        metrics_log = None
        if rank == 0:
            _hold_train_lock(train_dir)
            logged = []
            if start:  # a round started afresh keeps no line: no read
                with contextlib.suppress(FileNotFoundError):
                    logged = storage.read_text(metrics_path).splitlines()
            keep = [l for l in logged if json.loads(l)["step"] <= start]
            # steps after the checkpoint are redone; on a bucket the lines are written in the background,
            # flushed before each checkpoint (which a resumed run keeps the lines up to)
            metrics_log = storage.Appender(metrics_path, "".join(l + "\n" for l in keep))
            tqdm.write(f"train round {r}: {sum(source.rows_per_shard)} responses, {len(steps)} steps, objective {tc.objective}; "
                       f"{NORMALISATION}" + (f"; resuming after step {start}" if start else ""))
        tb = _tensorboard(train_dir) if (tc.tensorboard and rank == 0) else None
        streamed = tc.data_order == "shards"
        rows = source.through(0 if streamed else len(source.rows_per_shard) - 1)
        probe = probe_rows(rows, tc.probe_tokens, source.rows_per_shard[0] if streamed else None)
        metrics, engine_seconds, probe_seconds = None, 0.0, 0.0
        checkpoint: Future | None = None  # the round's last checkpoint, uploading (bucket)
        bar = tqdm(total=len(steps), initial=start, desc=f"train round {r}", unit="step", disable=rank != 0)
        # A SIGTERM waits for the step boundary below: checkpoint, then stop.
        # The bar ends its line, also on an error; the metrics log writes its last lines.
        with PREEMPTION.deferred(), contextlib.closing(bar), metrics_log or contextlib.nullcontext():
            saved = start
            for s in range(start, len(steps)):
                if streamed:
                    try:
                        rows = source.through(last_shard_of(steps[s], source.rows_per_shard))
                        PREEMPTION.check()  # told to stop while waiting, whether or not the shard came meanwhile
                    except Preempted:  # told to stop while waiting for a shard: keep the steps taken
                        if s > saved:
                            if metrics_log is not None:
                                metrics_log.flush()  # a resumed run keeps the lines up to the checkpoint's step
                            save_checkpoint(engine, ckpt_dir, s, {"step": s, "probe_topk": probe_prev}, rank,
                                            tc.keep_checkpoints)
                        raise
                t0 = time.perf_counter()
                lr = engine.lr  # the rate this step's update uses (the scheduler moves on inside it)
                stats, grad_norm, seconds = self._step(rows, pack_step(rows, steps[s], tc, self.world_size), objective)
                engine_seconds += seconds
                elapsed = time.perf_counter() - t0
                head = engine.module.get_output_embeddings().weight
                with torch.no_grad():
                    probe_ids = student_topk_ids(response_hidden(engine.module, rows, probe[0], device, probe[1]),
                                                 head, k=10)
                probe_seconds += time.perf_counter() - t0 - elapsed
                change = topk_jaccard_distance(probe_prev, probe_ids) if probe_prev is not None else math.nan
                probe_prev = probe_ids.cpu()
                metrics = {"round": r, "step": s + 1, "global_step": offset + s + 1, "lr": lr,
                           "grad_norm": grad_norm, **summarize_stats(stats), "top10_change": change,
                           "tokens": int(stats["tokens"]), "tokens_per_s": stats["tokens"] / elapsed}
                if rank == 0:
                    metrics_log.write(json.dumps(metrics) + "\n")
                    if tb is not None:
                        for k, v in metrics.items():
                            tb.add_scalar(f"train/{k}", v, offset + s + 1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", gate=f"{metrics['gate_fraction']:.2f}",
                                    tok_s=f"{metrics['tokens_per_s']:,.0f}")
                    bar.update(1)
                test_pause("train_step", s + 1)
                preempt = all_reduce_sum([float(PREEMPTION.requested)])[0] > 0  # any rank told to stop: all stop here
                if (s + 1) % tc.checkpoint_every == 0 or preempt or s + 1 == len(steps):
                    if metrics_log is not None:
                        metrics_log.flush()  # a resumed run keeps the lines up to the checkpoint's step
                    # the round's last one uploads beside the student (which waits for it); a stop waits here
                    last = s + 1 == len(steps) and not preempt
                    checkpoint = save_checkpoint(engine, ckpt_dir, s + 1, {"step": s + 1, "probe_topk": probe_prev},
                                                 rank, tc.keep_checkpoints, background=last)
                    saved = s + 1
                if preempt:
                    raise Preempted()
        if metrics_log is not None:
            metrics_log.finished()
        return TrainSummary(self.run.student_dir(r), len(steps) - start, len(steps), start, metrics,
                            engine_seconds=engine_seconds, probe_seconds=probe_seconds, checkpoint=checkpoint)

    def _step(self, rows: RoundRows, step: list, objective: ObjectiveConfig) -> tuple[dict, float, float]:
        """One optimiser step over `step` (ranks -> micro-batches -> rows): (summed stats, grad norm,
        seconds inside forward/backward/optimiser)."""
        tc, engine, device = self.tc, self.engine, self.device
        all_rows = [i for micro in step for mb in micro for i in mb]
        normalizer = float(sum(rows.response_length(i) for i in all_rows))
        # The gate threshold of a quantile gate is the quantile of the whole step's entropies.
        tau = tc.tau if tc.gate_quantile is None else float(torch.quantile(rows.token_batch(all_rows).teacher_entropy,
                                                                           tc.gate_quantile))
        parts, seconds = [], 0.0
        head = engine.module.get_output_embeddings().weight
        micro_batches = step[self.rank]
        for j, mb in enumerate(micro_batches):
            # An empty micro-batch (ranks with fewer rows) backpropagates a zero loss on one row.
            weight, mb = (1.0, mb) if mb else (0.0, [r for m in micro_batches for r in m][:1])
            batch = rows.token_batch(mb).to(device)
            t0 = time.perf_counter()
            hidden = response_hidden(engine.module, rows, mb, device)
            gate = entropy_gate(batch.teacher_entropy, tau)
            loss, stats = chunked_objective(hidden, head, batch, objective, normalizer, tc.loss_chunk, gate)
            if not weight:
                loss, stats = loss * 0.0, {k: 0.0 for k in stats}
            engine.backward(loss, is_last_micro_batch=j == len(micro_batches) - 1)
            seconds += time.perf_counter() - t0
            parts.append(stats)
        t0 = time.perf_counter()
        grad_norm = engine.step()
        seconds += time.perf_counter() - t0
        stats = merge_stats(parts)
        keys = sorted(stats)
        return dict(zip(keys, all_reduce_sum([stats[k] for k in keys]))), grad_norm, seconds


def run_train(run: RunDir, cfg: Config, round_index: int, allow_config_change: bool = False) -> TrainSummary:
    """`eopd-pipe train`: one round, continuing the optimisation of the rounds before it."""
    if run.student_done(round_index):
        return TrainSummary(run.student_dir(round_index), 0, 0, 0, None)
    return Trainer(run, cfg, allow_config_change).train_round(round_index)


def _tensorboard(train_dir):
    if storage.is_remote(train_dir):
        tqdm.write(f"train.tensorboard: TensorBoard writes event files in place, which a bucket ({train_dir}) does not "
                   f"take; logging to metrics.jsonl only")
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        tqdm.write("train.tensorboard is set but tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(train_dir / "tb"))


_TRAIN_LOCK = None


def _hold_train_lock(train_dir) -> None:
    """One training per round at a time (a claim: an OS lock released if this process dies, or a
    bucket lease that expires when its holder stops renewing it)."""
    global _TRAIN_LOCK
    if _TRAIN_LOCK is not None and _TRAIN_LOCK.path == train_dir / ".lock":
        return
    lock = storage.claim(train_dir / ".lock")
    if lock is None:
        raise UserError(f"another process is training {train_dir} (it holds {train_dir / '.lock'}); wait for it or stop it"
                        + (f" (a lease of a killed process expires after {storage.lease_seconds():.0f} s)"
                           if storage.is_remote(train_dir) else ""))
    if _TRAIN_LOCK is not None:
        _TRAIN_LOCK.release()
    _TRAIN_LOCK = lock
