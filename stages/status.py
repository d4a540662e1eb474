"""`eopd-pipe status`: one screen saying where a run stands. Reads only the run directory (and, for
"who is working on it", the OS's lock table); `--repair` rebuilds lost or corrupted manifests.

Per round: each sharded stage (shards done / planned, rows, tokens, size, shards being written now and
by which process), training (steps logged, the last complete checkpoint, whether a process trains it
now), whether the student is written, and the round's health figures and warnings (pipeline/health.py).
Workers on this machine are found through /proc/locks (the shard and train locks are OS file locks);
those on other nodes of a shared filesystem through the heartbeat each holder writes in its lock file;
on a bucket, through the lease objects.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from pipeline import storage
from pipeline.errors import UserError
from pipeline.identity import describe_worker, same_pid_view
from pipeline.health import health_warnings, round_health
from pipeline.rundir import STAGES, RunDir
from pipeline.shards import (SCHEMA_VERSION, Manifest, ShardInfo, schema_metadata, sha256_file,
                             shard_files, shard_index, shard_name)

CHECKPOINT_DONE = "COMPLETE"  # pipeline.training.CHECKPOINT_DONE (not imported: it pulls in torch)
STAGE_COMMAND = {"rollouts": "rollout", "teacher": "score-teacher"}
# The columns each stage's shards must have (DESIGN.md, "Shard schemas"): Arrow type names, "list<T>"
# for lists (whatever the item field is called), None where the codec decides the type.
REQUIRED_COLUMNS = {
    "rollouts": {"prompt_id": "string", "sample_index": "int32", "prompt_token_ids": "list<int32>",
                 "response_token_ids": "list<int32>", "response_logprobs": "list<float>",
                 "finish_reason": "string", "policy_round": "int32"},
}
REQUIRED_COLUMNS["teacher"] = {**REQUIRED_COLUMNS["rollouts"], "teacher_entropy": "list<float>",
                               "teacher_token_logprob": "list<float>", "teacher_topk_ids": None,
                               "teacher_topk_logprobs": None}


def type_name(t) -> str:
    import pyarrow as pa

    return f"list<{t.value_type}>" if pa.types.is_list(t) or pa.types.is_large_list(t) else str(t)


# ----------------------------------------------------------------------------- who holds a lock


def lock_holders() -> dict[tuple[int, int], int]:
    """(device, inode) -> pid of every file lock held on this machine (empty where /proc/locks is not)."""
    held = {}
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return held
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":  # "->": a process waiting for the lock, not holding it
            continue
        try:
            major, minor, inode = parts[5].split(":")
            held[(os.makedev(int(major, 16), int(minor, 16)), int(inode))] = int(parts[4])
        except ValueError:
            continue
    return held


def holder(path: Path, held: dict[tuple[int, int], int]) -> int | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return held.get((st.st_dev, st.st_ino))


def describe_process(pid: int) -> str:
    """"pid 123: eopd-pipe rollout runs/demo --worker 0/2" (the command line as far as it is readable)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    args = [a for a in args if a]
    for i, a in enumerate(args):
        if a.endswith("eopd-pipe") or a == "pipeline.cli":
            text = f"pid {pid}: eopd-pipe {' '.join(args[i + 1:])}"
            return text if len(text) <= 100 else text[:99] + "…"
    return f"pid {pid}: {' '.join([Path(args[0]).name] + args[1:])[:100]}" if args else f"pid {pid}"


# ----------------------------------------------------------------------------- the screen


def live_claims(locks_dir, held: dict, pattern: str) -> list[tuple[str, str]]:
    """(lock name, who holds it) of each live claim in `locks_dir`: fcntl locks held on this machine
    (their pid from /proc/locks, the holder's identity from the lock file), locks held on another node
    of a shared filesystem (invisible here: named by the heartbeat the holder writes in the lock file,
    while it is fresh), or a bucket's unexpired leases (the holder's identity and the lease's age)."""
    import fnmatch

    if storage.is_remote(locks_dir):
        return [(lease["name"], f"{describe_worker(lease['worker'])}, lease {lease['age_s']:.0f} s old")
                for lease in storage.leases(locks_dir) if not lease["expired"] and fnmatch.fnmatch(lease["name"], pattern)]
    out = []
    for p in sorted(locks_dir.glob(pattern)) if locks_dir.is_dir() else []:
        try:
            beat = json.loads(p.read_text() or "{}")
            ident = beat.get("worker", {})
        except (OSError, ValueError, AttributeError):
            beat, ident = {}, {}
        if (pid := holder(p, held)) is None:
            if who := remote_holder(beat):
                out.append((p.name, who))
            continue
        who = describe_process(pid)
        with contextlib.suppress(AttributeError, TypeError):
            if ident.get("pid") == pid and (engine := describe_worker(ident).partition(", ")[2]):
                who += f" ({engine})"  # the Slurm task, Ray node or SkyPilot task it runs under
        out.append((p.name, who))
    return out


def remote_holder(beat: dict) -> str | None:
    """Who holds a lock that this machine's lock table does not show, from its heartbeat: a holder on
    another machine (or in another pid namespace) whose heartbeat is younger than its expiry; None for
    a released lock (empty file), a stale heartbeat (its holder died there) or a holder seen gone here."""
    try:
        ident, (age, expired) = beat["worker"], storage.claim_age(beat)
        if expired:
            return None
        if same_pid_view(ident):
            return None  # same machine and pid view: /proc/locks would show it if it were held
        return f"{describe_worker(ident)}, heartbeat {age:.0f} s old"
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def stage_line(run: RunDir, r: int, stage: str, held: dict) -> tuple[str, bool]:
    """(the stage's line, whether a process works on it now)."""
    stage_dir = run.stage_dir(r, stage)
    busy = [(shard_index(name), who) for name, who in live_claims(stage_dir / ".locks", held, "part-*.parquet.lock")]
    now = ""
    if busy:
        by: dict[str, list[int]] = {}
        for shard, who in busy:
            by.setdefault(who, []).append(shard)
        now = "; in progress: " + ", ".join(f"shard(s) {s} by {who}" for who, s in by.items())
    m = Manifest(stage_dir)
    if not m.exists():
        files = shard_files(stage_dir)
        if files:
            return (f"  {stage:<9} {len(files)} shard file(s) but no manifest.json: run `eopd-pipe status {run.root} "
                    f"--repair` to check them and rebuild it{now}"), bool(busy)
        return f"  {stage:<9} not started{now}", bool(busy)
    try:
        data = m.read()
    except UserError:
        return (f"  {stage:<9} manifest.json is corrupted: run `eopd-pipe status {run.root} --repair` to check the "
                f"shards and rebuild it{now}"), bool(busy)
    shards = data["shards"]
    rows = sum(s["rows"] for s in shards.values())
    tokens = sum(s.get("tokens", 0) for s in shards.values())
    mib = sum(s["bytes"] for s in shards.values()) / 2**20
    state = "complete" if data["complete"] else "partial"
    line = (f"  {stage:<9} {state:<8} {len(shards)}/{data['num_shards']} shards, {rows} rows, {tokens} tokens, "
            f"{mib:.1f} MiB")
    if not data["complete"]:
        missing = sorted(set(range(data["num_shards"])) - {shard_index(n) for n in shards} - {s for s, _ in busy})
        if missing:
            line += f"; to do: {missing[:10]}{' …' if len(missing) > 10 else ''}"
    return line + now, bool(busy)


def checkpoints(train_dir) -> list:
    d = train_dir / "checkpoints"  # as pipeline.training.complete_checkpoints, without importing torch
    return [d / n for n in storage.subdirs(d, "step-[0-9]*") if storage.is_file(d / n / CHECKPOINT_DONE)]


def train_line(run: RunDir, r: int, held: dict) -> tuple[str, bool]:
    train_dir = run.stage_dir(r, "train")
    ckpts = checkpoints(train_dir)  # none where train_dir is not there
    last_step = None
    metrics = train_dir / "metrics.jsonl"
    if storage.is_file(metrics):
        for line in reversed(storage.read_text(metrics).splitlines()):
            try:
                last_step = json.loads(line)["step"]
                break
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
    trainer = live_claims(train_dir, held, ".lock")
    written = run.student_done(r)
    ckpt = f"last checkpoint {ckpts[-1].name}" if ckpts else "no complete checkpoint"
    if trainer:
        return f"  {'train':<9} training now ({trainer[0][1]}): step {last_step or 0} logged; {ckpt}", True
    if written:
        steps = last_step if last_step is not None else "?"
        return f"  {'train':<9} done: {steps} steps; {ckpt}; student written", False
    if last_step is None and not ckpts:
        return f"  {'train':<9} not started", False
    resume = f"resumes after {ckpts[-1].name}" if ckpts else "restarts from step 0"
    return f"  {'train':<9} stopped at step {last_step or 0} ({ckpt}): the next `train`/`run` {resume}", False


FULL_DETAIL_ROUNDS = 5  # a run with at most this many rounds shows every round in full
WARNED_MAX = 3  # finished rounds with a warning shown on the compact screen (the newest)
TREND_ROWS = 10  # the health trend: about this many rows of rounds


def _round_block(run: RunDir, r: int, held: dict) -> tuple[list[str], bool, bool]:
    """(round r's full lines without health, student written, a process works on it)."""
    lines, busy = [], False
    for s in STAGES:
        line, b = stage_line(run, r, s, held)
        lines.append(line)
        busy |= b
    line, b = train_line(run, r, held)
    lines.append(line)
    busy |= b
    done = run.student_done(r)
    state = "done" if done else "in progress" if busy else "not running (interrupted or waiting)"
    return [f"round {r}: {state}"] + lines, done, busy


def _eval_line(run: RunDir) -> str | None:
    evals = [run.root / "eval" / n for n in storage.names(run.root / "eval", "*.json")]
    if not evals:
        return None
    parts = []
    for path in evals:
        try:
            res = json.loads(storage.read_text(path))
            pk = res["pass_at_k"]
            ks = sorted(pk, key=int)
            parts.append(f"{path.stem} pass@1 {100 * pk['1']:.1f} pass@{ks[-1]} {100 * pk[ks[-1]]:.1f}")
        except (OSError, ValueError, KeyError, TypeError):
            parts.append(f"{path.stem} (unreadable)")
    return "eval: " + " | ".join(parts)


def _curve_line(run: RunDir) -> str | None:
    """The learning curve (eval.every_rounds) in one line: pass@1 at a few of its steps."""
    points = []
    for path in [run.root / "eval" / "curve" / n for n in storage.names(run.root / "eval" / "curve", "*.json")]:
        try:
            res = json.loads(storage.read_text(path))
            points.append((path.stem, int(res.get("global_step", 0)), 100 * res["pass_at_k"]["1"], res.get("problems")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not points:
        return None
    ref = {m: p for m, _, p, _ in points if m in ("base", "teacher")}
    steps = sorted((st, p) for m, st, p, _ in points if m not in ("base", "teacher"))
    shown = steps if len(steps) <= 6 else [steps[round(i * (len(steps) - 1) / 5)] for i in range(6)]
    parts = [f"{p:.1f} @{st}" for st, p in shown]
    extra = "; ".join(f"{m} {p:.1f}" for m, p in sorted(ref.items()))
    problems = next((n for *_, n in points if n), "?")
    return (f"curve: student pass@1 {' -> '.join(parts) if parts else '-'}" + (f" ({extra})" if extra else "")
            + f"; {problems} problems per point")


def _mean(values) -> float | None:
    good = [v for v in values if isinstance(v, (int, float))]
    return sum(good) / len(good) if good else None


def _trend(healths: list) -> list[str]:
    """The health figures of many rounds as a small table, about TREND_ROWS rows of rounds each."""
    if not healths:
        return []
    size = max(1, -(-len(healths) // TREND_ROWS))
    rows = []
    for a in range(0, len(healths), size):
        group = healths[a:a + size]
        first, last = group[0].round, group[-1].round

        def fmt(v, f):
            return "-" if v is None else format(v, f)
        kl = _mean(h.kl_start for h in group)
        length = _mean(h.length_fraction for h in group)
        rows.append([f"{first}-{last}" if first != last else str(first), fmt(kl, ".3f"),
                     "-" if length is None else f"{100 * length:.0f}%", fmt(_mean(h.student_entropy for h in group), ".3f"),
                     fmt(_mean(h.gate_fraction for h in group), ".2f"), str(sum(h.nonfinite_steps for h in group))])
    header = ["rounds", "KL at start", "at max_tokens", "H(student)", "gate", "non-finite steps"]
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    return ["health (mean over each row's rounds; `--round R` for one round):"] + ["  " + line for line in lines]


def _collapsed(run: RunDir, rounds: list[int]) -> str:
    """The finished rounds in one line: their shards, rows, size and steps."""
    shards = rows = steps = 0
    mib = 0.0
    for r in rounds:
        for stage in STAGES:
            try:
                data = Manifest(run.stage_dir(r, stage)).read()
            except UserError:
                continue
            shards += len(data["shards"])
            if stage == "rollouts":
                rows += sum(x["rows"] for x in data["shards"].values())
            mib += sum(x["bytes"] for x in data["shards"].values()) / 2**20
        steps += _logged_steps(run, r)
    span = _spans(rounds)
    return (f"rounds {span}: done ({len(rounds)} round(s): {shards} shards, {rows:,} responses, {mib:,.1f} MiB; "
            f"{steps:,} optimiser steps; every student written)")


def _logged_steps(run: RunDir, r: int) -> int:
    path = run.stage_dir(r, "train") / "metrics.jsonl"
    try:
        for line in reversed(storage.read_text(path).splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    except OSError:
        pass
    return 0


def _spans(rounds: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    out, start = [], None
    for i, r in enumerate(rounds):
        if start is None:
            start = r
        if i + 1 == len(rounds) or rounds[i + 1] != r + 1:
            out.append(f"{start}-{r}" if r != start else str(r))
            start = None
    return ", ".join(out)


def status_text(run: RunDir, health: bool = True, round_index: int | None = None, show_all: bool = False) -> str:
    """The whole screen. With `health`, each round's health figures and warnings (reads two columns
    of the round's shards). Runs of up to FULL_DETAIL_ROUNDS rounds, `show_all` and `round_index`
    show rounds in full; longer runs show the finished rounds in one line, the health figures as a
    trend table, and in full only the rounds in progress, interrupted or with a warning."""
    if not storage.is_file(run.config_path):
        return f"{run.root}: no run here yet (no config.yaml)"
    try:
        import yaml

        planned = (yaml.safe_load(storage.read_text(run.config_path)) or {}).get("rounds")
    except Exception:  # a broken config.yaml is the stage commands' to report, with the key and the fix
        planned = None
    rounds = run.rounds_present()
    if round_index is not None:
        if round_index not in rounds:
            raise UserError(f"--round {round_index}: {run.round_dir(round_index)} does not exist "
                            f"(rounds present: {_spans(rounds) or 'none'})")
        rounds_shown = [round_index]
    else:
        rounds_shown = rounds
    done_count = sum(run.student_done(r) for r in rounds)
    out = [f"run {run.root}" + (f": {len(rounds)} of {planned} round(s) started" if planned else "")
           + (f", {done_count} done" if rounds and round_index is None else "")]
    if not rounds:
        out.append("  no round started")
    held = lock_holders()
    full = show_all or round_index is not None or len(rounds) <= FULL_DETAIL_ROUNDS
    first = rounds_shown[0] if rounds_shown else 0
    prev = round_health(run.root, first - 1) if health and rounds_shown and first > 0 else None
    collapsed, detail, warned, healths = [], [], [], []
    for r in rounds_shown:
        block, done, busy = _round_block(run, r, held)
        warnings = []
        if health:
            h = round_health(run.root, r)
            block.append(f"  {'health':<9} {h.summary()}")
            warnings = health_warnings(h, prev)
            block += [f"  warning: {w}" for w in warnings]
            prev = h
            healths.append(h)
        if full or not done or busy:
            detail.append((r, block))
        elif warnings:  # finished: its figures and warnings, not its stages
            warned.append((r, [block[0]] + block[1 + len(STAGES) + 1:]))
        else:
            collapsed.append(r)
    if full:
        for _, block in detail:
            out += block
    else:
        if collapsed:
            out.append(_collapsed(run, collapsed))
        out += _trend(healths)
        hidden = warned[:-WARNED_MAX]
        if hidden:
            out.append(f"{len(hidden)} more finished round(s) with a warning: {_spans([r for r, _ in hidden])} "
                       f"(`--round R` or `--all`)")
        for _, block in warned[-WARNED_MAX:] + detail:
            out += block
    if round_index is None:
        for line in (_curve_line(run), _eval_line(run)):
            if line:
                out.append(line)
        from pipeline.executors.slurm import slurm_status_lines  # what `launch slurm` submitted, without sacct

        if slurm := slurm_status_lines(run):
            out += ["slurm:"] + [f"  {line}" for line in slurm]
    return "\n".join(out)


# ----------------------------------------------------------------------------- --verify


def verify_run(run: RunDir) -> list[str]:
    """Check every recorded shard's sha256; returns one problem line per bad shard or manifest."""
    problems = []
    for r in run.rounds_present():
        for stage in STAGES:
            m = Manifest(run.stage_dir(r, stage))
            if not m.exists():
                if shard_files(m.stage_dir):
                    problems.append(f"{m.stage_dir}: shard files but no manifest.json; "
                                    f"run `eopd-pipe status {run.root} --repair`")
                continue
            try:
                data = m.read()
            except UserError as e:
                problems.append(str(e))
                continue
            for name, rec in sorted(data["shards"].items()):
                path = m.stage_dir / name
                if not storage.is_file(path):
                    problems.append(f"{path}: missing (rerun `eopd-pipe {STAGE_COMMAND[stage]}` to redo it)")
                elif sha256_file(path) != rec["sha256"]:
                    problems.append(f"{path}: corrupted (sha256 differs from the manifest); delete it and rerun the "
                                    f"stage to redo it")
    return problems


# ----------------------------------------------------------------------------- --repair


def check_shard_file(path: Path, stage: str, r: int) -> tuple[ShardInfo, dict[str, str]] | str:
    """A shard file's record (rows, bytes, sha256, tokens) and footer keys, after reading every page and
    checking its columns and footer; or what is wrong with it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.shards import read_parquet

    try:
        table = read_parquet(path)  # every page decompressed: a truncated or damaged file fails here
    except (OSError, pa.ArrowInvalid) as e:
        return f"not readable as Parquet ({e})"
    meta = schema_metadata(table.schema)
    if meta.get("schema_version") != SCHEMA_VERSION:
        return f"schema version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}"
    if meta.get("stage") != stage or meta.get("round") != str(r):
        return f"written by stage {meta.get('stage')!r} round {meta.get('round')!r}, found in {stage} of round {r}"
    for col, typ in REQUIRED_COLUMNS[stage].items():
        if col not in table.column_names:
            return f"column {col!r} missing"
        if typ is not None and type_name(table.schema.field(col).type) != typ:
            return f"column {col!r} is {type_name(table.schema.field(col).type)}, expected {typ}"
    tokens = int(pc.sum(pc.list_value_length(table.column("response_token_ids"))).as_py() or 0)
    return ShardInfo(table.num_rows, storage.size(path), sha256_file(path), tokens), meta


def _plan(run: RunDir, r: int, stage: str, metas: list[dict[str, str]]) -> tuple[int, dict] | str:
    """The stage's plan as the stage command computes it (so that its next call accepts the rebuilt
    manifest), or why it cannot be rebuilt."""
    if stage == "teacher":
        rollouts = Manifest(run.stage_dir(r, "rollouts"))
        try:
            data = rollouts.read()
        except UserError:
            return f"round {r}'s rollouts manifest is not readable (repair the rollouts first)"
        names = sorted(data["shards"])
        ks = {m.get("k") for m in metas}
        codecs = {m.get("topk_codec") for m in metas}
        if len(ks) != 1 or len(codecs) != 1:
            return f"shards disagree on k {sorted(map(str, ks))} or codec {sorted(map(str, codecs))}"
        return len(names), {"rollout_shards": {n: data["shards"][n]["sha256"] for n in names}, "k": int(ks.pop()),
                            "codec": codecs.pop()}
    import yaml

    from pipeline.prompts import round_prompt_indices
    from pipeline.shards import read_parquet

    try:
        cfg = yaml.safe_load(storage.read_text(run.config_path))
        prompts = read_parquet(run.prompts_dir / "prompts.parquet", ["prompt_id"]).num_rows
        per_round, per_shard = cfg["prompts"].get("prompts_per_round"), cfg["rollout"]["prompts_per_shard"]
        seed = cfg["seed"]
    except (OSError, KeyError, TypeError, ValueError) as e:
        return f"the plan needs config.yaml and prompts/prompts.parquet ({type(e).__name__}: {e})"
    count = len(round_prompt_indices(prompts, per_round, seed, r))
    policies = {m.get("policy") for m in metas}
    if len(policies) != 1:
        return f"shards disagree on the policy that sampled them: {sorted(map(str, policies))}"
    rows = [min(per_shard, count - s) for s in range(0, count, per_shard)]
    return len(rows), {"prompts": prompts, "rows_per_shard": rows, "policy": policies.pop()}


def repair_stage(run: RunDir, r: int, stage: str, held: dict) -> list[str]:
    """Rebuild a missing or corrupted manifest from the shards that pass `check_shard_file`; a shard
    that fails is renamed to NAME.bad (kept for a look, redone by the stage). Returns report lines."""
    stage_dir = run.stage_dir(r, stage)
    m = Manifest(stage_dir)
    files = shard_files(stage_dir)
    if m.exists():
        try:
            m.read()
            return [f"round {r} {stage}: manifest.json is fine (`--verify` checks the shards' checksums)"]
        except UserError:
            pass
    elif not files:
        return []
    busy = live_claims(stage_dir / ".locks", held, "*.lock")  # fcntl locks here, or a bucket's live leases
    if busy:
        raise UserError(f"{stage_dir} is being written by {busy[0][1]}; "
                        f"stop it (or let it finish) before `status --repair`")
    good: dict[int, ShardInfo] = {}
    metas, report = [], []
    for path in files:
        checked = check_shard_file(path, stage, r)
        if isinstance(checked, str):
            bad = path.with_name(path.name + ".bad")
            storage.move(path, bad)
            report.append(f"round {r} {stage}: {path.name}: {checked}; moved to {bad.name}, the stage will redo it")
            continue
        good[shard_index(path.name)] = checked[0]
        metas.append(checked[1])
    if not good:
        storage.remove(m.path)
        return report + [f"round {r} {stage}: no usable shard; the manifest is removed and the stage starts afresh"]
    plan = _plan(run, r, stage, metas)
    if isinstance(plan, str):
        raise UserError(f"{stage_dir}: cannot rebuild manifest.json: {plan}; or delete {stage_dir} to redo the stage")
    num_shards, plan = plan
    extra = sorted(i for i in good if i >= num_shards)
    if extra:
        raise UserError(f"{stage_dir}: shards {extra} lie beyond the {num_shards} shards of the plan; "
                        f"delete {stage_dir} to redo the stage")
    if stage == "rollouts":
        n = next(int(x["n"]) for x in metas if "n" in x) if any("n" in x for x in metas) else None
        wrong = [shard_name(i) for i, info in good.items()
                 if n is not None and info.rows != plan["rows_per_shard"][i] * n]
        if wrong:
            raise UserError(f"{stage_dir}: shards {wrong} do not have the rows the plan gives them; "
                            f"delete {stage_dir} to redo the stage")
    data = {"num_shards": num_shards, "plan": plan, "complete": len(good) == num_shards,
            "shards": {shard_name(i): good[i].to_json() for i in sorted(good)}}
    m.replace(data)
    state = "complete" if data["complete"] else f"{num_shards - len(good)} shard(s) still to do"
    return report + [f"round {r} {stage}: manifest.json rebuilt from {len(good)} checked shard(s) ({state})"]


def repair_run(run: RunDir) -> list[str]:
    """`status --repair` over every round and sharded stage (rollouts before teacher: the teacher plan
    names the rollout shards)."""
    if not storage.is_file(run.config_path):
        raise UserError(f"{run.root}: no run here (no config.yaml); nothing to repair")
    held = lock_holders()
    report = []
    for r in run.rounds_present():
        for stage in STAGES:
            report += repair_stage(run, r, stage, held)
    return report or ["nothing to repair: no stage directory has shards"]

