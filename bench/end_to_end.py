"""One round of the embedded default: wall time of each stage and the share spent outside the
engine (vLLM generate, teacher forward + statistics, student forward/backward/optimiser step).

Bookkeeping = wall - model load - engine: prompt handling, Arrow/Parquet encoding, zstd, fsync,
sha256, manifests, locks, shard reading and decoding, batching, metrics, checkpoints, the
student top-10 probe. Target: under 10% of every stage.

    python bench/end_to_end.py [--toy toy-assets] [--config configs/default.yaml] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", default="toy-assets", help="toy assets dir (built if missing: a few CPU minutes)")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.rundir import RunDir
    from pipeline.toy import make_toy
    from stages.rollout import run_rollout
    from stages.score_teacher import run_score_teacher
    from stages.train import run_train

    make_toy(args.toy)
    toy = Path(args.toy).resolve()
    cfg = load_config(Path(args.config), [f"student.path={toy / 'student'}", f"teacher.path={toy / 'teacher'}",
                                          f"prompts.path={toy / 'train_prompts.jsonl'}", *args.overrides])
    run = RunDir(tempfile.mkdtemp(prefix="bench-e2e-"))
    rows = []
    s = run_rollout(run, cfg, 0)
    rows.append(("rollout", s.wall_seconds, s.load_seconds, s.engine_seconds, "vLLM generate"))
    s = run_score_teacher(run, cfg, 0)
    rows.append(("score-teacher", s.wall_seconds, s.load_seconds, s.engine_seconds, "teacher forward + statistics"))
    t = run_train(run, cfg, 0)
    rows.append(("train", t.wall_seconds, t.load_seconds, t.engine_seconds, "forward + backward + optimiser step"))

    print(f"one round of {args.config} ({cfg.prompts.prompts_per_round or 'all'} prompts x n={cfg.rollout.n}), run dir {run.root}")
    print(f"{'stage':<14} {'wall s':>7} {'load s':>7} {'engine s':>9} {'other s':>8} {'other/wall':>10}  engine = ")
    for name, wall, load, engine, what in rows:
        other = wall - load - engine
        print(f"{name:<14} {wall:>7.1f} {load:>7.1f} {engine:>9.1f} {other:>8.1f} {other / wall:>10.1%}  {what}")
    print("target: other/wall < 10% for every stage")
    shutil.rmtree(run.root, ignore_errors=True)


if __name__ == "__main__":
    main()
