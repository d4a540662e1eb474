"""One round of the embedded default: wall time of each stage and the share spent outside the
engine (vLLM generate, teacher forward + statistics, student forward/backward/optimiser step).

Each stage runs in its own process, as `eopd-pipe run` runs it (after a rollout in the same
process, vLLM's CPU backend leaves torch with one thread bound to one core: a later stage there
would measure something no user runs). Per stage the child times the stage call itself; library
imports happen before it (a once-per-process cost, printed, not counted).

Bookkeeping = wall - model load - engine - probe: prompt handling, Arrow/Parquet encoding, zstd,
fsync, sha256, manifests, locks, shard reading and decoding, batching, metrics, checkpoints. The
train stage's top-10 probe (a no-grad student forward per step, for the top-10 change metric) is
model compute but not training; it gets its own column. Target: under 10% of every stage.

    python bench/end_to_end.py [--toy toy-assets] [--config configs/default.yaml] [--set KEY=VALUE ...] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

STAGES = {"rollout": "vLLM generate", "score-teacher": "teacher forward + statistics",
          "train": "forward + backward + optimiser step"}


def child(stage: str, run_dir: str, config: str, overrides: list[str]) -> None:
    """Run one stage of round 0 and print its timings as one JSON line."""
    t0 = time.perf_counter()
    import datasets, transformers  # noqa: F401,E401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 (lazy submodules)
    if stage == "rollout":
        import vllm  # noqa: F401
    from pipeline.config import load_config
    from pipeline.rundir import RunDir
    from stages.rollout import run_rollout
    from stages.score_teacher import run_score_teacher
    from stages.train import run_train

    imports = time.perf_counter() - t0
    cfg = load_config(Path(config), overrides)
    run_stage = {"rollout": run_rollout, "score-teacher": run_score_teacher, "train": run_train}[stage]
    t0 = time.perf_counter()  # the whole stage call: input checks, tokenizers and output included
    s = run_stage(RunDir(run_dir), cfg, 0)
    wall = time.perf_counter() - t0
    print("RESULT " + json.dumps({"wall": wall, "load": s.load_seconds, "engine": s.engine_seconds,
                                  "probe": getattr(s, "probe_seconds", 0.0), "imports": imports}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", default="toy-assets", help="toy assets dir (built if missing: a few CPU minutes)")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=1, help="whole rounds, each in a fresh run dir")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.config, args.overrides)

    from pipeline.toy import make_toy

    make_toy(args.toy)
    toy = Path(args.toy).resolve()
    overrides = [f"student.path={toy / 'student'}", f"teacher.path={toy / 'teacher'}",
                 f"prompts.path={toy / 'train_prompts.jsonl'}", *args.overrides]
    shares: dict[str, list[float]] = {name: [] for name in STAGES}
    for repeat in range(args.repeats):
        run_dir = tempfile.mkdtemp(prefix="bench-e2e-")
        print(f"repeat {repeat}: one round of {args.config}, each stage in its own process, run dir {run_dir}")
        print(f"{'stage':<14} {'wall s':>7} {'load s':>7} {'engine s':>9} {'probe s':>8} {'other s':>8} {'other/wall':>10}  engine =")
        for name, what in STAGES.items():
            cmd = [sys.executable, __file__, "--child", name, run_dir, "--config", args.config,
                   *[x for o in overrides for x in ("--set", o)]]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
            other = r["wall"] - r["load"] - r["engine"] - r["probe"]
            shares[name].append(other / r["wall"])
            print(f"{name:<14} {r['wall']:>7.2f} {r['load']:>7.2f} {r['engine']:>9.2f} {r['probe']:>8.2f} {other:>8.2f} "
                  f"{other / r['wall']:>10.1%}  {what} (imports before: {r['imports']:.1f} s)", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    print("probe = train's top-10 probe: a no-grad student forward on probe_tokens per step (a metric, counted apart)")
    print("other/wall, median over repeats: " + ", ".join(f"{n} {statistics.median(v):.1%}" for n, v in shares.items())
          + "   target: < 10% for every stage")


if __name__ == "__main__":
    main()
