"""Objectives over seeds: `eopd-pipe run` for every (objective, seed), then `eopd-pipe compare`.

    python bench/seeds.py --assets toy-assets --out runs/seeds            # rkl, eopd, full x seeds 0 1 2
    python bench/seeds.py --assets toy-assets --out runs/seeds --jobs 2 --set rounds=40   # a shorter sweep
    python bench/seeds.py --assets toy-assets --out runs/seeds --estimator sampled topk  # both RKL estimators

Each run is exactly what a user types, with the seed and objective set and the toy paths pointed at
--assets (the other keys: configs/default.yaml, plus every --set given here):

    eopd-pipe run OUT/OBJECTIVE-sSEED --set seed=SEED --set train.objective=OBJECTIVE \
        --set student.path=ASSETS/student --set teacher.path=ASSETS/teacher \
        --set prompts.path=ASSETS/train_prompts.jsonl --set eval.prompts.path=ASSETS/eval_prompts.jsonl

With --estimator E (sampled, topk, or both) each run also sets train.rkl_estimator=E and is named
OBJECTIVE-E-sSEED; without it the config's estimator is used and runs are named OBJECTIVE-sSEED.

The seed changes every sampling seed of the run (rollouts, eval samples) and the order of the
training batches; the base student and teacher are the same models in every run (made once by
make-toy), so base and teacher rows vary only by their eval samples. Runs are resumable: a run
already finished is skipped (its directory is kept), an interrupted one continues. --jobs 2 runs
two at a time, each held to one thread (OMP_NUM_THREADS=1), which is what a 2-core machine allows.

Then `eopd-pipe compare OUT/*-s* --out OUT/compare`: one row per run, and per objective the mean
± sample standard deviation of every column with the seeds named; OUT/compare/compare.png has
the error bars. Wall times per run go to OUT/walls.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_name(objective: str, seed: int, estimator: str | None = None) -> str:
    return f"{objective}-s{seed}" if estimator is None else f"{objective}-{estimator}-s{seed}"


def run_command(out: Path, assets: Path, objective: str, seed: int, sets: list[str],
                estimator: str | None = None) -> list[str]:
    keys = [f"seed={seed}", f"train.objective={objective}", f"student.path={assets}/student",
            f"teacher.path={assets}/teacher", f"prompts.path={assets}/train_prompts.jsonl",
            f"eval.prompts.path={assets}/eval_prompts.jsonl",
            *([f"train.rkl_estimator={estimator}"] if estimator else []), *sets]
    return [sys.executable, "-m", "pipeline.cli", "run", str(out / run_name(objective, seed, estimator)),
            *(a for k in keys for a in ("--set", k))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, required=True, help="a make-toy directory")
    ap.add_argument("--out", type=Path, required=True, help="where the run directories go")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--objectives", nargs="+", default=["rkl", "eopd", "full"])
    ap.add_argument("--estimator", nargs="+", choices=["sampled", "topk"], default=None,
                    help="train.rkl_estimator for every run (several: one run each); default: the config's")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (2 on a 2-core machine: one thread each)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    args = ap.parse_args()
    assets, out = args.assets.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    # Seed-major order: with --jobs 2 the objectives of one seed finish close together.
    todo = [(o, s, e) for s in args.seeds for o in args.objectives for e in (args.estimator or [None])]
    walls_path = out / "walls.json"
    walls = json.loads(walls_path.read_text()) if walls_path.is_file() else {}

    def one(job: tuple[str, int, str | None]) -> tuple[str, int]:
        objective, seed, estimator = job
        name = run_name(objective, seed, estimator)
        cmd = run_command(out, assets, objective, seed, args.sets, estimator)
        print("$", " ".join(cmd[1:]).replace("-m pipeline.cli", "eopd-pipe"), flush=True)
        t0 = time.time()
        with open(out / f"{name}.log", "ab") as log:
            code = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code == 0 and (out / name / "eval" / "final.json").is_file() and name not in walls:
            walls[name] = round(time.time() - t0, 1)
            walls_path.write_text(json.dumps(walls, indent=1) + "\n")
        print(f"{name}: exit {code}, {time.time() - t0:.0f} s (log {out / name}.log)", flush=True)
        return name, code

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, todo))
    failed = [name for name, code in results if code != 0]
    if failed:
        sys.exit(f"failed: {failed}; see their logs in {out}, run the same command again to resume")
    dirs = [str(out / run_name(o, s, e)) for o, s, e in todo]
    cmd = [sys.executable, "-m", "pipeline.cli", "compare", *dirs, "--out", str(out / "compare")]
    print("$ eopd-pipe compare", " ".join(dirs), "--out", out / "compare", flush=True)
    sys.exit(subprocess.call(cmd, cwd=REPO))


if __name__ == "__main__":
    main()
