"""What a person watching `eopd-pipe run` sees: one progress line for the whole run.

    run  37/200 |█▊        | step 296/1600 · KL 0.105 · gate 0.11 · pass@1 41.2 @288 · 2.1 s/round · ETA 5:43

- the bar (terminal only, when it is a tty and not -v): round r/R, optimiser step s/S (moved by
  every training step: a thread follows the round's metrics.jsonl), the on-policy KL at the
  start of the last round and its gate fraction (pipeline/health.py), pass@1 of the last
  mid-run eval (eval.every_rounds) with its step, seconds per round in this process, and the ETA;
- a one-line summary every `logging.summary_every` rounds (0: about ten per run) and after the
  last round, printed above the bar (also when the terminal is a file or with -v);
- everything the stages print (their bars, "train round r: ..." headers, per-round counts) goes
  to RUN_DIR/logs/run.log instead (`stage_output_to_log`); a stage's line starting with
  "warning:" also reaches the terminal, above the bar. With -v (nothing captured) the stages
  print to the terminal as before and the bar is left out, so no line lands on top of it.

Every line for the terminal goes through `echo`, which clears the bar, writes, and redraws it.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

from tqdm import tqdm

from pipeline import storage
from pipeline.errors import UserError

from pipeline import logs

BAR_FORMAT = "run {n_fmt}/{total_fmt} |{bar:12}| {desc}"  # desc: the fields (tqdm puts ", " before a postfix)


def clock(seconds: float | None) -> str:
    """5:43, 1:02:07; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def summary_every(rounds: int, setting: int) -> int:
    """Rounds between summary lines: the setting, or about ten lines per run."""
    return setting if setting > 0 else max(1, math.ceil(rounds / 10))


class RunProgress:
    """The run-level bar and the summary lines of one `eopd-pipe run`."""

    def __init__(self, rounds: int, steps_per_round: int | None, every: int, rounds_done: int = 0,
                 global_step: int = 0, out: TextIO | None = None, bar: bool | None = None) -> None:
        self.rounds, self.steps_per_round, self.every = rounds, steps_per_round, every
        self.out = out if out is not None else logs.terminal_stderr()
        self.round_done = rounds_done  # rounds whose student is written
        self.step = global_step
        self.kl = self.gate = self.entropy = None
        self.pass1: tuple[float, int, str] | None = None  # (pass@1, global step, model) of the last curve point
        self.round_seconds: list[float] = []  # rounds run in this process (skipped ones excluded)
        self.t0 = time.perf_counter()
        self._round_start: float | None = None
        self._lock = threading.RLock()
        if bar is None:
            bar = _isatty(self.out) and not logs.is_verbose() and logs.capturing()
        self.bar = tqdm(total=rounds, initial=rounds_done, file=self.out, bar_format=BAR_FORMAT,
                        dynamic_ncols=True, mininterval=0.5, leave=True) if bar else None
        self._watched: tuple[Path, int] | None = None  # (metrics.jsonl of the round training now, bytes read)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="eopd-progress", daemon=True) if self.bar else None
        if self._watcher is not None:
            self._watcher.start()
        self._refresh()

    # ------------------------------------------------------------------ events

    def start_round(self, r: int, metrics: Path | None = None) -> None:
        """Round r starts (or resumes); `metrics`: its train/metrics.jsonl, followed for the step count."""
        self._round_start = time.perf_counter()
        with self._lock:
            self._watched = (metrics, 0) if metrics is not None else None

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                watched = self._watched
            if watched is None:
                continue
            path, offset = watched
            try:
                if storage.is_remote(path):  # a bucket's metrics.jsonl: one GET per look
                    data = storage.read_bytes(path)[offset:]
                else:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        data = f.read()
            except (OSError, UserError):
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            for line in data[:end].splitlines():
                try:
                    self.train_step(json.loads(line))
                except (ValueError, TypeError):
                    pass
            with self._lock:
                if self._watched is not None and self._watched[0] == path:
                    self._watched = (path, offset + end + 1)

    def train_step(self, record: dict[str, Any]) -> None:
        """A line of the round's metrics.jsonl (from the thread that follows the file)."""
        with self._lock:
            self.step = int(record.get("global_step", self.step))
            gate = record.get("gate_fraction")
            if isinstance(gate, (int, float)) and math.isfinite(gate):
                self.gate = float(gate)
        self._refresh()

    def end_round(self, r: int, health=None, steps_per_round: int | None = None, last_step: int | None = None,
                  ran: bool = True) -> None:
        """Round r's student is written. `health`: its RoundHealth (KL at the start, gate, entropy)."""
        with self._lock:
            self._watched = None
            if ran and self._round_start is not None:
                self.round_seconds.append(time.perf_counter() - self._round_start)
            self._round_start = None
            self.round_done = r + 1
            if steps_per_round:
                self.steps_per_round = steps_per_round
            if last_step is not None:
                self.step = last_step
            if health is not None:
                self.kl = health.kl_start if health.kl_start is not None else self.kl
                self.gate = health.gate_fraction if health.gate_fraction is not None else self.gate
                self.entropy = health.student_entropy if health.student_entropy is not None else self.entropy
        if self.bar is not None:
            self.bar.n = self.round_done
        self._refresh(force=True)
        # Rounds a resumed run finds done pass by quietly; the last one is summed up once.
        if (ran and self.round_done % self.every == 0) or self.round_done == self.rounds:
            self.echo(self.summary_line())

    def curve_point(self, model: str, result: dict[str, Any], step: int) -> None:
        with self._lock:
            if model.startswith("round-"):
                self.pass1 = (float(result["pass_at_k"]["1"]), step, model)
        self._refresh(force=True)

    # ------------------------------------------------------------------ text

    def seconds_per_round(self) -> float | None:
        recent = self.round_seconds[-20:]  # the current pace: the first round also loads every model
        if len(recent) > 1:
            recent = recent[1:] if len(self.round_seconds) <= 20 else recent
        return sum(recent) / len(recent) if recent else None

    def eta(self) -> float | None:
        per = self.seconds_per_round()
        return None if per is None else per * (self.rounds - self.round_done)

    def _fields(self, eta: bool = True) -> list[str]:
        total = self.steps_per_round * self.rounds if self.steps_per_round else None
        parts = [f"step {self.step}/{total if total else '?'}"]
        if self.kl is not None:
            parts.append(f"KL {self.kl:.3f}")
        if self.gate is not None:
            parts.append(f"gate {self.gate:.2f}")
        if self.pass1 is not None:
            parts.append(f"pass@1 {100 * self.pass1[0]:.1f} @{self.pass1[1]}")
        per = self.seconds_per_round()
        if per is not None:
            parts.append(f"{per:.1f} s/round")
        if eta:
            parts.append(f"ETA {clock(self.eta())}" if self.round_done < self.rounds else "done")
        return parts

    def summary_line(self) -> str:
        parts = [f"round {self.round_done}/{self.rounds}"] + self._fields(eta=False)
        if self.entropy is not None:
            parts.insert(3 if self.kl is not None else 2, f"H(student) {self.entropy:.3f}")
        parts.append(f"{clock(time.perf_counter() - self.t0)} elapsed")
        if self.round_done < self.rounds:
            parts.append(f"ETA {clock(self.eta())}")
        return " · ".join(parts)

    def _refresh(self, force: bool = False) -> None:
        if self.bar is None:
            return
        with self._lock:
            self.bar.set_description_str(" · ".join(self._fields()), refresh=False)
        if force:
            self.bar.refresh()
        else:
            self.bar.update(0)  # redraws at most every mininterval

    def echo(self, line: str) -> None:
        """A line for the terminal, above the bar (never on top of it)."""
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            self.out.write(line + "\n")
            self.out.flush()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ----------------------------------------------------------------------------- stage output


SHOWN = ("warning:", "stopping:")  # what a stage says that the person at the terminal must see


class _ToLog:
    """A text stream for the stages inside `run`: everything goes to the log (fd 1/2 inside a capture);
    a complete line that starts with "warning:" or "stopping:" (after any "stage: " prefix) is also
    handed to `show`."""

    def __init__(self, log: TextIO, show) -> None:
        self.log, self.show, self.pending = log, show, ""
        self.encoding = getattr(log, "encoding", "utf-8")

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        if "\n" in self.pending:
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                line = line.rsplit("\r", 1)[-1].strip()
                head = line.split(": ", 1)
                if line.startswith(SHOWN) or (len(head) == 2 and head[1].startswith(SHOWN)):
                    self.show(line)
        if len(self.pending) > 4096:  # a bar's \r updates without a newline: nothing to show there
            self.pending = self.pending[-4096:]
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.log.fileno()

    def __getattr__(self, name: str):
        return getattr(self.log, name)


_LOGGING_STAGES = threading.Event()


def stages_to_log() -> bool:
    """Whether what the stages print goes to the log now (inside `stage_output_to_log`)."""
    return _LOGGING_STAGES.is_set()


@contextmanager
def stage_output_to_log(show) -> Iterator[bool]:
    """Inside a capture (pipeline/logs.py), what the stages print goes to the log; yields whether it
    does (False with -v or without a capture: they print to the terminal as before)."""
    if logs.is_verbose() or not logs.capturing():
        yield False
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ToLog(sys.__stdout__, show), _ToLog(sys.__stderr__, show)
    _LOGGING_STAGES.set()
    try:
        yield True
    finally:
        _LOGGING_STAGES.clear()
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = saved
