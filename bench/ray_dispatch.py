"""A rollout stage on a Ray cluster (2 actors, the driver handing out shard indices) against the same
stage as two processes `--worker 0/2` and `--worker 1/2`, side by side in one run, on the same toy
models and config; then the per-shard dispatch overhead of the Ray path, split into

  - stage entry: what one stage call costs around its shard (config, tokenizer, prompt cache,
    manifest init and record) = actor-side call time - shard compute - model load;
  - transport: driver round trip - actor-side call time (Ray's RPC, scheduling, result return).

usage: python bench/ray_dispatch.py [--shards 12] [--prompts-per-shard 2] [--out bench/ray_dispatch.json]
The two variants run one after the other on the same machine (a 2-core host here: both use both cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--prompts-per-shard", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.update(ENV)

    from pipeline.toy import make_toy

    tmp = Path(tempfile.mkdtemp(prefix="eopd-ray-dispatch-"))
    toy = make_toy(tmp / "toy", seed=0, quick=True)
    n_prompts = args.shards * args.prompts_per_shard
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "seed": 7, "student": {"path": str(toy.student)}, "teacher": {"path": str(toy.teacher)},
        "prompts": {"path": str(toy.train_prompts), "limit": n_prompts, "prompts_per_round": n_prompts},
        "rollout": {"n": 2, "max_tokens": 12, "prompts_per_shard": args.prompts_per_shard,
                    "vllm": {"enforce_eager": True, "dtype": "float32"}},
    }))

    # Processes: the same stage as two `--worker I/2` processes side by side.
    proc_run = tmp / "procs"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "launch", "local", "rollout", str(proc_run),
                          "--config", str(cfg_path), "--workers", "2"], capture_output=True, text=True)
    procs_wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    timings = [json.loads(line) for line in (proc_run / "round-0000" / "timings.jsonl").read_text().splitlines()]

    # Ray: a head with no CPUs and two one-CPU nodes; two actors, one per node.
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_config
    from pipeline.executors.base import Job
    from pipeline.executors.ray import RayExecutor
    from pipeline.rundir import RunDir, freeze_config
    from stages.launch import ShardEngine

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray_run = RunDir(tmp / "ray")
        cfg = load_config(cfg_path, ())
        freeze_config(ray_run, cfg)
        executor = RayExecutor(ray_run, cfg, ShardEngine, workers=2, address=cluster.address)
        executor.connect()
        t0 = time.perf_counter()
        stage_run = executor.run_sharded(Job("rollout", 0, 2))
        ray_wall = time.perf_counter() - t0
        # Driver-side round trips: hand each actor a shard that is already recorded (nothing computed,
        # nothing loaded): the pure dispatch cost, entry and transport, per shard.
        actors = executor.actors("rollout")
        trips, entry = [], []
        for i in range(args.shards):
            t = time.perf_counter()
            r = ray.get(actors[i % 2].shard.remote(0, i))
            trips.append(time.perf_counter() - t)
            entry.append(r["seconds"])
        executor.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()

    same = all((proc_run / "round-0000/rollouts" / p.name).read_bytes() == p.read_bytes()
               for p in (Path(ray_run.root) / "round-0000/rollouts").glob("part-*.parquet"))
    worked = [r for r in stage_run.results if r["done_now"]]
    overhead = [r["seconds"] - r["compute_seconds"] - r["load_seconds"] for r in worked]
    out = {
        "shards": args.shards, "prompts_per_shard": args.prompts_per_shard,
        "procs_wall_s": round(procs_wall, 2), "ray_wall_s": round(ray_wall, 2),
        "ray_over_procs": round(ray_wall / procs_wall, 3),
        "procs_stage_wall_s": [t["wall_s"] for t in timings], "procs_load_s": [t["load_s"] for t in timings],
        "ray_load_s": [round(r["load_seconds"], 2) for r in worked if r["load_seconds"] > 0.5],  # engine starts
        "ray_shard_compute_median_s": round(statistics.median(r["compute_seconds"] for r in worked), 4),
        "ray_stage_entry_per_shard_median_s": round(statistics.median(overhead), 4),
        "recorded_shard_call_median_s": round(statistics.median(entry), 4),
        "driver_round_trip_median_s": round(statistics.median(trips), 4),
        "transport_median_s": round(statistics.median(t - e for t, e in zip(trips, entry)), 4),
        "shards_identical": same,
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
