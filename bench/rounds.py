"""Per-round cost of `eopd-pipe run` at the paper's cadence: persistent roles vs one process per stage.

    python bench/rounds.py --assets toy-assets [--rounds 6] [--repeats 1]

Both modes run the embedded default (configs/default.yaml) at the paper's cadence, 128 prompts x
1 rollout and 4 optimiser steps of 32 responses per round, eval off, side by side in one process
tree (the modes alternate when --repeats > 1). Each stage appends where its time went to
ROUND/timings.jsonl (model load, engine compute: vLLM stepping, the teacher forward, the
trainer's forward/backward/optimiser and its metric probe); the rest of a round (imports, process
starts, model loads, Parquet, checkpoints, bookkeeping) is "outside the engine".

Printed per mode: wall per round (round 0 and the mean of the later, steady rounds), the share of
each outside the engine, and the ratio persistent / per-stage. The two runs must also write the
same students (checked here too: it is the point of the persistent run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CADENCE = ["prompts.prompts_per_round=128", "rollout.n=1", "train.batch_rows=32", "eval.prompts=null"]


def run_mode(run: Path, assets: Path, rounds: int, per_stage: bool) -> dict:
    sets = [*CADENCE, f"rounds={rounds}", f"student.path={assets}/student", f"teacher.path={assets}/teacher",
            f"prompts.path={assets}/train_prompts.jsonl"]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(run)] + [a for s in sets for a in ("--set", s)]
    if per_stage:
        cmd.append("--per-stage-processes")
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    total = time.time() - t0
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    walls, engines = [], []
    prev = t0
    for r in range(rounds):
        lines = [json.loads(l) for l in (run / f"round-{r:04d}" / "timings.jsonl").read_text().splitlines()]
        end = max(l["end"] for l in lines)
        walls.append(end - prev)
        engines.append(sum(l["engine_s"] for l in lines))
        prev = end
    students = {r: hashlib.sha256((run / f"round-{r:04d}" / "student" / "model.safetensors").read_bytes()).hexdigest()
                for r in range(rounds)}
    return {"total": total, "walls": walls, "engines": engines, "students": students}


def share(wall: float, engine: float) -> float:
    return 1 - engine / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=REPO / "toy-assets")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    assets = args.assets.resolve()
    results: dict[str, list[dict]] = {"per-stage": [], "persistent": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = ["per-stage", "persistent"] if rep % 2 == 0 else ["persistent", "per-stage"]
            for mode in order:
                run = Path(tmp) / f"{mode}-{rep}"
                results[mode].append(run_mode(run, assets, args.rounds, mode == "per-stage"))
                shutil.rmtree(run)
    same = all(a["students"] == b["students"] for a, b in zip(results["per-stage"], results["persistent"]))
    print(f"{args.rounds} rounds x 4 optimiser steps (128 prompts x 1 rollout, batch 32), repeats {args.repeats}")
    print(f"{'mode':<12} {'run wall s':>10} {'round 0 s':>10} {'later rounds s':>15} {'outside share r0':>17} "
          f"{'outside share later':>20} {'outside share run':>18}")
    summary = {}
    for mode, runs in results.items():
        r0 = statistics.median(x["walls"][0] for x in runs)
        later = statistics.median(statistics.mean(x["walls"][1:]) for x in runs)
        s0 = statistics.median(share(x["walls"][0], x["engines"][0]) for x in runs)
        sl = statistics.median(share(sum(x["walls"][1:]), sum(x["engines"][1:])) for x in runs)
        total = statistics.median(x["total"] for x in runs)
        srun = statistics.median(share(x["total"], sum(x["engines"])) for x in runs)
        summary[mode] = (total, later)
        print(f"{mode:<12} {total:>10.1f} {r0:>10.1f} {later:>15.2f} {s0:>16.1%} {sl:>19.1%} {srun:>17.1%}")
    print(f"persistent / per-stage: run wall {summary['persistent'][0] / summary['per-stage'][0]:.3f}x, "
          f"later rounds {summary['persistent'][1] / summary['per-stage'][1]:.3f}x")
    print(f"same students in both modes: {same}")


if __name__ == "__main__":
    main()
