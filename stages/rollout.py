"""`eopd-pipe rollout`: the round's student samples `n` responses per prompt with vLLM.

Recipe:
  1. policy = base student (round 0) or round r-1's trained student
  2. prompts: tokenised once (cached in the run dir), the round's subset, split into shards
  3. per shard: its requests queued on the vLLM engine (the next shard's too, so the batch stays
     full); every response has its own seed derived from (run seed, round, prompt id, sample
     index), so rows do not depend on shard layout or restarts
  4. rows -> Parquet shard (atomic), manifest updated; a restart redoes only unfinished shards
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.config import Config
from pipeline.models import GenerationQueue, check_model_dir, load_tokenizer
from pipeline.prompts import round_prompt_indices, save_prompt_cache, tokenized_prompts
from pipeline.rundir import RunDir, freeze_config
from pipeline.sampler import Sampler, start_engine
from pipeline.work import ShardResult, ShardWorker, StageSummary, WorkerSpec, derive_seed, run_shards

if TYPE_CHECKING:
    from stages.train import StudentUpload

STAGE = "rollouts"


def rollout_schema(prompt_columns: pa.Schema) -> pa.Schema:
    """The rollouts shard schema of DESIGN.md, followed by the prompt row's own columns."""
    fields = [
        pa.field("prompt_id", pa.string()),
        pa.field("sample_index", pa.int32()),
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("response_token_ids", pa.list_(pa.int32())),
        pa.field("response_logprobs", pa.list_(pa.float32())),
        pa.field("finish_reason", pa.string()),
        pa.field("policy_round", pa.int32()),
    ]
    extra = [f for f in prompt_columns if f.name not in {"prompt_id", "prompt_token_ids"}]
    return pa.schema(fields + extra)


def plan_shards(prompts: pa.Table, cfg: Config, round_index: int) -> list[list[int]]:
    """Row indices of `prompts` for each shard of this round."""
    idx = round_prompt_indices(prompts.num_rows, cfg.prompts.prompts_per_round, cfg.seed, round_index)
    per = cfg.rollout.prompts_per_shard
    return [idx[s : s + per].tolist() for s in range(0, len(idx), per)]


def shard_requests(prompts: pa.Table, rows: list[int], cfg: Config, round_index: int) -> tuple[list, list]:
    """vLLM requests for one shard: n per prompt, each with its own seed derived from
    (run seed, round, prompt id, sample index), so a row does not depend on the shard layout."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    r = cfg.rollout
    sub = prompts.take(rows)
    requests, params = [], []
    for pid, toks in zip(sub.column("prompt_id").to_pylist(), sub.column("prompt_token_ids").to_pylist()):
        for s in range(r.n):
            requests.append(TokensPrompt(prompt_token_ids=toks))
            params.append(SamplingParams(
                n=1, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens,
                logprobs=0,  # the sampled token's log-prob under the policy: the behaviour log-prob q_old
                seed=derive_seed(cfg.seed, STAGE, round_index, pid, s),
            ))
    return requests, params


def shard_table(prompts: pa.Table, rows: list[int], outputs: list, cfg: Config, round_index: int) -> pa.Table:
    """vLLM outputs (n per prompt, in request order) -> the shard's rows."""
    n = cfg.rollout.n
    sub = prompts.take(rows)
    prompt_ids = sub.column("prompt_id").to_pylist()
    prompt_tokens = sub.column("prompt_token_ids").to_pylist()
    cols: dict[str, list] = {k: [] for k in ("prompt_id", "sample_index", "prompt_token_ids", "response_token_ids",
                                             "response_logprobs", "finish_reason", "policy_round")}
    for j, out in enumerate(outputs):
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        cols["prompt_id"].append(prompt_ids[j // n])
        cols["sample_index"].append(j % n)
        cols["prompt_token_ids"].append(prompt_tokens[j // n])
        cols["response_token_ids"].append(ids)
        cols["response_logprobs"].append([step[t].logprob for step, t in zip(comp.logprobs, ids)])
        cols["finish_reason"].append(str(comp.finish_reason))
        cols["policy_round"].append(round_index)
    extra = sub.drop_columns(["prompt_id", "prompt_token_ids"]).take([j // n for j in range(len(outputs))])
    schema = rollout_schema(prompts.schema)
    arrays = [pa.array(cols[f.name], f.type) for f in schema if f.name in cols]
    return pa.Table.from_arrays(arrays + list(extra.columns), schema=schema)


def rollout_worker(llm, prompts: pa.Table, shards: list[list[int]], cfg: Config, round_index: int) -> ShardWorker:
    """Shards through one vLLM engine; with `rollout.overlap_shards` the next shard's requests
    are queued before the current shard is finished (see GenerationQueue)."""
    queue = GenerationQueue(llm)

    def start(i: int) -> None:
        queue.add(str(i), *shard_requests(prompts, shards[i], cfg, round_index))

    def finish(i: int) -> ShardResult:
        if str(i) not in queue.pending:
            start(i)
        t0 = time.perf_counter()
        outputs = queue.wait(str(i))
        engine_seconds = time.perf_counter() - t0
        table = shard_table(prompts, shards[i], outputs, cfg, round_index)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return ShardResult(table, tokens, engine_seconds)

    return ShardWorker(finish=finish, start=start if cfg.rollout.overlap_shards else None)


def policy_label(run: RunDir, source, policy: Path) -> str:
    """The policy as shards name it: relative to the run dir when inside it (so shards do not depend
    on where the run lives, local or on a bucket), else the model path as given."""
    root = str(run.root).rstrip("/") + "/"
    if run.remote:
        return str(source)[len(root):] if str(source).startswith(root) else str(source)
    resolved = policy.resolve()
    return str(resolved.relative_to(run.root)) if resolved.is_relative_to(run.root) else str(policy)


def run_rollout(run: RunDir, cfg: Config, round_index: int, worker: WorkerSpec | None = None,
                allow_config_change: bool = False, sampler: Sampler | None = None,
                stop: threading.Event | None = None, uploading: StudentUpload | None = None) -> StageSummary:
    """`sampler`: an engine kept across rounds (the persistent `run`); it is given this round's
    policy in place. Without one, the stage starts its own engine. `stop`: set by another thread
    (the persistent `run`, which runs this stage in a thread), it ends the stage before its next shard.
    `uploading`: the policy (round r-1's student, persistent run on a bucket) is still uploading:
    sampled from its local copy meanwhile, no shard recorded before its upload is complete."""
    if uploading is not None:
        source, policy = uploading.dest, uploading.local
    else:
        source = run.policy_for_round(cfg, round_index)
        policy = check_model_dir(source, "student")  # a local directory (a bucket's is cached locally)
    # The base student's tokenizer defines the prompt tokens for every round (later students are saved with it).
    tokenizer = load_tokenizer(check_model_dir(cfg.student.path, "student"))
    prompts, cached = tokenized_prompts(run.prompts_dir, cfg.prompts, tokenizer)
    # Every input is checked: only now does the call write into the run dir.
    freeze_config(run, cfg, allow_config_change)
    if not cached:
        save_prompt_cache(run.prompts_dir, prompts)
    shards = plan_shards(prompts, cfg, round_index)

    def open_worker():
        if sampler is not None:
            sampler.load(policy)
            llm = sampler.llm
        else:  # the engine seed matters little: every request carries its own seed
            llm = start_engine(policy, cfg.rollout.vllm, seed=derive_seed(cfg.seed, STAGE, round_index))
        worker = rollout_worker(llm, prompts, shards, cfg, round_index)
        if uploading is not None:
            finish = worker.finish

            def finish_once_policy_is_complete(i: int) -> ShardResult:
                result = finish(i)
                uploading.wait()  # round r-1 complete on the bucket before a shard of round r is recorded
                return result
            worker.finish = finish_once_policy_is_complete
        return worker

    # Inside the run dir the policy is named relative to it: shards do not depend on where the run lives.
    label = policy_label(run, source, policy)
    plan = {"prompts": prompts.num_rows, "rows_per_shard": [len(s) for s in shards], "policy": label}
    meta = {"stage": STAGE, "round": str(round_index), "policy": label, "n": str(cfg.rollout.n)}
    return run_shards(run.stage_dir(round_index, STAGE), len(shards), plan, open_worker, meta, worker,
                      desc=f"rollout round {round_index}", stop=stop)

