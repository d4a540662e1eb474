"""`eopd-pipe status`: what is done, per round, stage and shard. Reads only the run directory."""

from __future__ import annotations

import json

from pipeline.rundir import STAGES, RunDir
from pipeline.shards import Manifest


def stage_line(run: RunDir, r: int, stage: str) -> str:
    m = Manifest(run.stage_dir(r, stage))
    if not m.exists():
        return f"  {stage:<9} not started"
    data = m.read()
    shards = data["shards"]
    rows = sum(s["rows"] for s in shards.values())
    tokens = sum(s.get("tokens", 0) for s in shards.values())
    mib = sum(s["bytes"] for s in shards.values()) / 2**20
    state = "complete" if data["complete"] else "partial"
    line = f"  {stage:<9} {state:<8} {len(shards)}/{data['num_shards']} shards, {rows} rows, {tokens} tokens, {mib:.1f} MiB"
    if not data["complete"]:
        missing = sorted(set(range(data["num_shards"])) - {int(n[5:10]) for n in shards})
        line += f"; missing shards {missing[:10]}{' …' if len(missing) > 10 else ''}"
    return line


def train_line(run: RunDir, r: int) -> str:
    train_dir = run.stage_dir(r, "train")
    ckpts = sorted((train_dir / "checkpoints").glob("step-*")) if train_dir.is_dir() else []
    metrics = train_dir / "metrics.jsonl"
    last = None
    if metrics.is_file():
        lines = metrics.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else None
    if not ckpts and last is None:
        return f"  {'train':<9} not started"
    step = f"step {last['step']}" if last else "no metrics"
    return f"  {'train':<9} {step}; checkpoints: {', '.join(p.name for p in ckpts[-3:]) or 'none'}"


def status_text(run: RunDir) -> str:
    if not run.config_path.is_file():
        return f"{run.root}: no run here yet (no config.yaml)"
    out = [f"run {run.root}"]
    rounds = run.rounds_present()
    if not rounds:
        out.append("  no round started")
    for r in rounds:
        out.append(f"round {r}")
        out += [stage_line(run, r, s) for s in STAGES]
        out.append(train_line(run, r))
        student = run.student_dir(r)
        out.append(f"  {'student':<9} {'written' if (student / 'config.json').is_file() else 'not written'}")
    return "\n".join(out)


def verify_run(run: RunDir) -> list[str]:
    """Check every recorded shard's sha256; returns one problem line per bad shard."""
    from pipeline.shards import sha256_file

    problems = []
    for r in run.rounds_present():
        for stage in STAGES:
            m = Manifest(run.stage_dir(r, stage))
            if not m.exists():
                continue
            for name, rec in sorted(m.read()["shards"].items()):
                path = m.stage_dir / name
                if not path.is_file():
                    problems.append(f"{path}: missing (rerun `eopd-pipe {'rollout' if stage == 'rollouts' else 'score-teacher'}` to redo it)")
                elif sha256_file(path) != rec["sha256"]:
                    problems.append(f"{path}: corrupted (sha256 differs from the manifest); delete it and rerun the stage to redo it")
    return problems
