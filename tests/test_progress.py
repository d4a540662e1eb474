"""What `eopd-pipe run` leaves on a terminal (pipeline/progress.py): one line for the run, a summary every
few rounds, the stages' output in RUN_DIR/logs/run.log; checked in a real pseudo-terminal, 160 columns."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

VLLM = {"enforce_eager": True, "dtype": "float32", "cpu_kvcache_gib": 1.0}  # rollout's = eval's: the curve uses its engine

from conftest import CLI_ENV, REPO, write_config
from pipeline.progress import RunProgress, _ToLog, clock, summary_every


def test_clock_and_summary_cadence():
    assert [clock(s) for s in (0, 59.4, 343, 3727, None)] == ["0:00", "0:59", "5:43", "1:02:07", "?"]
    assert summary_every(200, 0) == 20 and summary_every(6, 0) == 1 and summary_every(200, 50) == 50


def test_summaries_without_a_terminal():
    """Output to a file: no bar, a summary every `every` rounds and after the last one."""
    out = io.StringIO()
    p = RunProgress(rounds=5, steps_per_round=8, every=2, out=out)
    assert p.bar is None

    class H:
        kl_start, gate_fraction, student_entropy = 0.2, 0.11, 0.25
    for r in range(5):
        p.start_round(r)
        if r == 1:
            p.curve_point("round-1", {"pass_at_k": {"1": 0.473, "8": 0.9}}, 16)
        p.end_round(r, H(), steps_per_round=8, last_step=8 * (r + 1))
    p.close()
    lines = out.getvalue().splitlines()
    assert [l.split(" · ")[0] for l in lines] == ["round 2/5", "round 4/5", "round 5/5"]
    assert lines[0].startswith("round 2/5 · step 16/40 · KL 0.200 · H(student) 0.250 · gate 0.11 · pass@1 47.3 @16 · ")
    assert "ETA" in lines[1] and "ETA" not in lines[2] and "elapsed" in lines[2]


def test_stage_warnings_reach_the_terminal():
    log, shown = io.StringIO(), []
    stream = _ToLog(log, shown.append)
    stream.write("train round 3: 128 responses, 8 steps\ntrain round 3:  50%|###  | 4/8\r")
    stream.write("train round 3: 100%|#####| 8/8\nwarning: round 2 has no complete checkpoint, so ...\n")
    stream.write("eval: warning: math-verify cannot parse the answer of 2 problem(s)\n")
    assert shown == ["warning: round 2 has no complete checkpoint, so ...",
                     "eval: warning: math-verify cannot parse the answer of 2 problem(s)"]
    assert "train round 3: 128 responses" in log.getvalue()


def render(stream: bytes, width: int) -> list[str]:
    """The screen a terminal shows after `stream`: \\r, \\n, backspace, cursor up (ESC[nA), erase line
    (ESC[K / ESC[2K), line wrap at `width`; other escape sequences (colours) are dropped."""
    lines, row, col = [[]], 0, 0
    text = stream.decode("utf-8", errors="replace")
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\x1b":
            m = re.match(r"\x1b\[(\d*)([A-Za-z])", text[i:])
            if m:
                n, code = int(m.group(1) or 1), m.group(2)
                if code == "A":
                    row = max(0, row - n)
                elif code == "K":
                    lines[row][col:] = []
                i += m.end()
                continue
            i += 1
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
            while len(lines) <= row:
                lines.append([])
        elif ch == "\b":
            col = max(0, col - 1)
        else:
            if col >= width:
                row, col = row + 1, 0
                while len(lines) <= row:
                    lines.append([])
            line = lines[row]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    return ["".join(l).rstrip() for l in lines]


@pytest.mark.slow
def test_run_in_a_pty(toy, tmp_path, monkeypatch):
    """A real `run` (3 rounds, a curve point each round) in a 160-column pseudo-terminal: a handful of
    lines (summaries, curve, eval table, plots), the run's line drawn alone on its row (no line written
    over it), the stages' bars and headers in run.log and not on the screen."""
    cfg = write_config(tmp_path / "c.yaml", toy, rounds=3, rollout={"n": 1, "max_tokens": 12, "prompts_per_shard": 8, "vllm": VLLM},
                       prompts={"path": str(toy.train_prompts), "limit": 16},
                       train={"batch_rows": 8, "micro_batch_tokens": 4096},
                       eval={"prompts": {"path": str(toy.eval_prompts), "limit": 8}, "verifier": "toy", "samples": 2,
                             "max_tokens": 12, "top_p": 1.0, "models": ["base", "final"], "every_rounds": 1,
                             "curve_problems": 4, "vllm": VLLM})
    run = tmp_path / "run"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(run), "--config", str(cfg)], cwd=REPO,
                            env={**os.environ, **CLI_ENV, "PYTHONPATH": str(REPO), "COLUMNS": "160"},
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    data, deadline = b"", time.time() + 900
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    (tmp_path / "terminal.bin").write_bytes(data)  # what the terminal got, for a look when this fails
    assert proc.wait(timeout=60) == 0, data.decode(errors="replace")[-3000:]
    screen = [l for l in render(data, 160) if l.strip()]
    assert len(screen) <= 30, "\n".join(screen)
    bars = [l for l in screen if l.startswith("run ") and "|" in l]
    assert len(bars) == 1 and re.fullmatch(r"run 3/3 \|█+\| step 6/6 · .*done", bars[0]), bars
    for line in screen:  # nothing written over the bar: every other line is whole
        assert line.startswith("run 3/3 |") or " |█" not in line, line
    assert [l.split(" · ")[0] for l in screen if l.startswith("round ")] == ["round 1/3", "round 2/3", "round 3/3"]
    assert any(l.startswith("model ") and "pass@1" in l for l in screen)
    assert not any("train round" in l or "rollout round" in l or "INFO" in l for l in screen), "\n".join(screen)
    log = (run / "logs" / "run.log").read_text()
    assert "train round 0:" in log and "rollout round 2" in log
    curve = {p.stem: json.loads(p.read_text()) for p in (run / "eval" / "curve").glob("*.json")}
    assert {"base", "round-0", "round-1", "round-2"} <= set(curve)
    assert [curve[f"round-{r}"]["global_step"] for r in range(3)] == [2, 4, 6]
    assert (run / "report" / "eval_curve.png").is_file()
    assert Path(run / "eval" / "final.json").is_file()

    # `status` of the finished run, as a long run shows it: the health trend, the curve, and the finished
    # rounds without their stages (the barely trained toy student warns every round: at max_tokens);
    # `--round R` in full.
    from pipeline.rundir import RunDir
    from stages import status

    monkeypatch.setattr(status, "FULL_DETAIL_ROUNDS", 1)
    text = status.status_text(RunDir(run)).splitlines()
    assert text[0].endswith("3 of 3 round(s) started, 3 done"), text
    assert text[1].startswith("health (mean over") and text[2].split()[:2] == ["rounds", "KL"], text
    assert [l for l in text if l.startswith("round ")] == ["round 0: done", "round 1: done", "round 2: done"]
    assert not any(l.startswith(("  rollouts", "  teacher", "  train")) for l in text), text
    assert any(l.startswith("curve: student pass@1 ") for l in text) and text[-1].startswith("eval: base pass@1")
    one = status.status_text(RunDir(run), round_index=1).splitlines()
    assert one[1] == "round 1: done" and one[2].startswith("  rollouts  complete") and any(l.startswith("  health") for l in one)
