"""Training health, from what is on disk: one round's figures and one-line warnings.

Figures of round R (`round_health`); each is None while its inputs are not on disk:

    kl_start          on-policy sampled KL at the start of the round, nats per token: the mean over
                      response tokens of log q_old(y_t) - log p(y_t), i.e. the rollouts' behaviour
                      log-prob (`response_logprobs`) minus the teacher's (`teacher_token_logprob`), read
                      from round R's teacher shards. Round R samples from round R-1's student, so a
                      rise from round R-1 to R says round R-1's training moved the student away.
    length_fraction   share of round R's responses that ended at rollout.max_tokens (finish_reason "length")
    steps, nonfinite_steps, first_nonfinite_step
                      steps logged in round-R/train/metrics.jsonl; how many have a NaN/inf loss; the first
    student_entropy, gate_fraction   means over the round's logged steps
    pass_at_k         {eval result name: {k: pass@k in [0, 1]}} of RUN_DIR/eval/*.json for round R's student

`health_warnings(current, previous)` turns two rounds' figures into warnings naming the round, the
figure and what to try. Reading a round costs two columns of its shards (no checksums), so `status`
and `run` can call it after every round.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage

KL_RISE = 1.25  # start-of-round KL this many times the previous round's: "well above"
KL_RISE_MIN = 0.05  # nats per token; a smaller rise is within sampling noise of a few thousand responses
LENGTH_SHARE = 0.5  # "most responses" ended at max_tokens


@dataclass
class RoundHealth:
    round: int
    kl_start: float | None = None
    kl_tokens: int = 0
    kl_shards: str = ""  # "4/4" (shards read / planned); partial while the stage runs
    length_fraction: float | None = None
    responses: int = 0
    steps: int = 0
    nonfinite_steps: int = 0
    first_nonfinite_step: int | None = None
    student_entropy: float | None = None
    gate_fraction: float | None = None
    pass_at_k: dict[str, dict[str, float]] = field(default_factory=dict)
    # From the frozen config, to say what to change (None when config.yaml is missing).
    lr: float | None = None
    max_tokens: int | None = None
    run_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "run_dir"}
        return d

    def summary(self) -> str:
        """One line of figures (what `status` prints under the round)."""
        parts = []
        if self.kl_start is not None:
            partial = f" ({self.kl_shards} shards)" if self.kl_shards and not _whole(self.kl_shards) else ""
            parts.append(f"KL at start {self.kl_start:.3f}{partial}")
        if self.length_fraction is not None:
            parts.append(f"at max_tokens {100 * self.length_fraction:.0f}%")
        if self.student_entropy is not None:
            parts.append(f"H(student) {self.student_entropy:.3f}")
        if self.gate_fraction is not None:
            parts.append(f"gate {self.gate_fraction:.2f}")
        if self.nonfinite_steps:
            parts.append(f"non-finite loss in {self.nonfinite_steps}/{self.steps} steps")
        for name, pk in sorted(self.pass_at_k.items()):
            ks = sorted(pk, key=int)
            shown = [k for k in ks if k in ("1", ks[-1])]
            parts.append(f"{name} " + " ".join(f"pass@{k} {100 * pk[k]:.1f}" for k in shown))
        return " | ".join(parts) if parts else "no figures yet"


def _whole(frac: str) -> bool:
    a, _, b = frac.partition("/")
    return a == b


def _root(run_dir):
    # A RunDir or a path (not getattr(.., "root"): every Path has a .root, "/")
    return run_dir.root if hasattr(run_dir, "round_dir") else storage.location(run_dir)


def _stage_files(stage_dir: Path) -> tuple[list[Path], int | None]:
    """The stage's finished shard files (manifest's when it reads, else the part files present) and
    the planned number of shards (None without a readable manifest)."""
    manifest = stage_dir / "manifest.json"
    try:
        data = json.loads(storage.read_text(manifest))
        names = sorted(data["shards"])
        return [stage_dir / n for n in names if storage.is_file(stage_dir / n)], int(data["num_shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return [stage_dir / n for n in storage.names(stage_dir, "part-[0-9]*.parquet")], None


def _flat(table, column: str):
    import numpy as np
    import pyarrow.compute as pc

    return np.asarray(pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False), dtype=np.float64)


def _kl_start(stage_dir: Path, h: RoundHealth) -> None:
    import numpy as np
    import pyarrow as pa

    from pipeline.shards import read_parquet

    files, planned = _stage_files(stage_dir)
    total, tokens, read = 0.0, 0, 0
    for path in files:
        try:
            t = read_parquet(path, ["response_logprobs", "teacher_token_logprob"])
        except (OSError, pa.ArrowInvalid, KeyError):
            continue  # unreadable shards are status --verify's and --repair's business
        diff = _flat(t, "response_logprobs") - _flat(t, "teacher_token_logprob")
        total += float(np.sum(diff))
        tokens += diff.size
        read += 1
    if tokens:
        h.kl_start, h.kl_tokens = total / tokens, tokens
        h.kl_shards = f"{read}/{planned if planned is not None else len(files)}"


def _length_fraction(stage_dir: Path, h: RoundHealth) -> None:
    import pyarrow as pa

    from pipeline.shards import read_parquet

    length = total = 0
    for path in _stage_files(stage_dir)[0]:
        try:
            reasons = read_parquet(path, ["finish_reason"]).column("finish_reason").to_pylist()
        except (OSError, pa.ArrowInvalid, KeyError):
            continue
        length += sum(r == "length" for r in reasons)
        total += len(reasons)
    if total:
        h.length_fraction, h.responses = length / total, total


def _metrics(path: Path, h: RoundHealth) -> None:
    if not storage.is_file(path):
        return
    entropies, gates = [], []
    for line in storage.read_text(path).splitlines():
        try:
            m = json.loads(line)  # json reads NaN and Infinity, as json.dumps wrote them
        except ValueError:
            continue  # a line cut by a kill
        h.steps += 1
        loss = m.get("loss")
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            h.nonfinite_steps += 1
            if h.first_nonfinite_step is None:
                h.first_nonfinite_step = m.get("step")
        for key, into in (("student_entropy", entropies), ("gate_fraction", gates)):
            v = m.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                into.append(float(v))
    h.student_entropy = sum(entropies) / len(entropies) if entropies else None
    h.gate_fraction = sum(gates) / len(gates) if gates else None


def _pass_at_k(root: Path, h: RoundHealth) -> None:
    for path in [root / "eval" / n for n in storage.names(root / "eval", "*.json")]:
        try:
            result = json.loads(storage.read_text(path))
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and result.get("round") == h.round and isinstance(result.get("pass_at_k"), dict):
            h.pass_at_k[path.stem] = {str(k): float(v) for k, v in result["pass_at_k"].items()}


def _config(root: Path, h: RoundHealth) -> None:
    try:
        cfg = yaml.safe_load(storage.read_text(root / "config.yaml")) or {}
        h.lr = cfg.get("train", {}).get("lr")
        h.max_tokens = cfg.get("rollout", {}).get("max_tokens")
    except (OSError, yaml.YAMLError, AttributeError):
        pass


def round_health(run_dir: str | Path, round_index: int) -> RoundHealth:
    """The health figures of round `round_index` of `run_dir` (a path or a RunDir), from disk only."""
    root = _root(run_dir)
    rd = root / f"round-{round_index:04d}"
    h = RoundHealth(round_index, run_dir=root)
    _config(root, h)
    _kl_start(rd / "teacher", h)
    _length_fraction(rd / "rollouts", h)
    _metrics(rd / "train" / "metrics.jsonl", h)
    _pass_at_k(root, h)
    return h


def _lr(h: RoundHealth) -> str:
    return f"train.lr (now {h.lr:g})" if isinstance(h.lr, (int, float)) else "train.lr"


def health_warnings(current: RoundHealth, previous: RoundHealth | None = None) -> list[str]:
    """One line per problem of `current` (with `previous`, the round before it, for the KL trend)."""
    r, out = current.round, []
    if current.nonfinite_steps:
        out.append(
            f"round {r}: the training loss is not finite (NaN/inf) in {current.nonfinite_steps} of {current.steps} "
            f"steps, "
            f"first at step {current.first_nonfinite_step} (round-{r:04d}/train/metrics.jsonl): training diverged; "
            f"try a lower {_lr(current)} or a smaller train.max_grad_norm, and delete round-{r:04d}/train to redo it")
    kl, prev_kl = current.kl_start, previous.kl_start if previous is not None else None
    if kl is not None and prev_kl is not None and kl > KL_RISE * prev_kl and kl - prev_kl > KL_RISE_MIN:
        out.append(
            f"round {r}: on-policy KL at the start of the round is {current.kl_start:.3f} nats/token, "
            f"{current.kl_start / previous.kl_start:.1f}x round {previous.round}'s {previous.kl_start:.3f}: "
            f"round {previous.round}'s training moved the student away from the teacher; "
            f"try a lower {_lr(current)}, warm-up (train.warmup_steps) or fewer steps per round")
    if current.length_fraction is not None and current.length_fraction > LENGTH_SHARE:
        mt = f"rollout.max_tokens={current.max_tokens}" if current.max_tokens else "rollout.max_tokens"
        share = f"{100 * current.length_fraction:.0f}% of round {r}'s {current.responses} responses ended at {mt}"
        before = previous.length_fraction if previous is not None else None
        was_fine = before is not None and before <= LENGTH_SHARE
        if was_fine:
            out.append(f"round {r}: {share} (round {previous.round}: {100 * previous.length_fraction:.0f}%): "
                       f"the student trained in round {previous.round} rambles or loops instead of answering; "
                       f"try a lower {_lr(current)}")
        else:
            out.append(f"round {r}: {share}: answers are cut off; raise rollout.max_tokens if they are long, "
                       f"else check the prompt template and the student's end-of-sequence token"
                       + (f", or try a lower {_lr(current)}" if r > 0 else ""))
    return out


def run_health(run_dir: str | Path, rounds: list[int] | None = None) -> list[tuple[RoundHealth, list[str]]]:
    """(figures, warnings) of each round present in `run_dir` (or of `rounds`), in order."""
    root = _root(run_dir)
    if rounds is None:
        rounds = sorted(int(n[6:]) for n in storage.subdirs(root, "round-[0-9][0-9][0-9][0-9]"))
    out, prev = [], None
    for r in rounds:
        h = round_health(root, r)
        if prev is None and r > 0:
            prev = round_health(root, r - 1)
        out.append((h, health_warnings(h, prev)))
        prev = h
    return out
