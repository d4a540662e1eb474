"""A quiet terminal: library output goes to RUN_DIR/logs/COMMAND.log; -v shows it; errors still show.
(A real rollout's quiet terminal and -v: tests/test_rollout.py, on the runs it makes anyway.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO, run_cli, write_config

# What a library does, in every way that reaches a terminal, inside a capture; a child process
# (a stage started by `run`) captures into a log of its own and still reaches the terminal.
SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pipeline.logs import capture_logs

    lib = logging.getLogger("fakelib")
    root = sys.argv[1]
    with capture_logs(root + "/logs/outer.log"):
        print("OURS 1")
        h = logging.StreamHandler(sys.stdout)  # bound at import, as vLLM's is: now the terminal stream
        h.setFormatter(logging.Formatter("LIB %(levelname)s %(message)s"))
        lib.addHandler(h); lib.propagate = False; lib.setLevel(logging.INFO)
        lib.info("lib info")
        lib.error("lib failed")
        os.write(2, b"C-LEVEL FD2\\n")
        warnings.warn("a library warning")
        logging.getLogger("other").warning("a propagating warning")
        with capture_logs(root + "/logs/inner.log"):
            print("OURS 2", file=sys.stderr)
            lib.info("inner lib info")
            child = ("import os, sys\\nfrom pipeline.logs import capture_logs\\nos.write(2, b'CHILD RAW\\\\n')\\n"
                     "with capture_logs(sys.argv[1] + '/logs/child.log'):\\n"
                     "    print('CHILD OURS')\\n    os.write(1, b'CHILD C\\\\n')")
            subprocess.run([sys.executable, "-c", child, root], check=True)
        lib.info("outer again")
    print("OURS 3")
""")


def test_capture_mechanism(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["OURS 1", "CHILD OURS", "OURS 3"]
    assert res.stderr.splitlines() == [f"error (fakelib): lib failed  [full log: {tmp_path}/logs/outer.log]", "OURS 2"]
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    outer = logs["outer.log"]
    for line in ("LIB INFO lib info", "LIB ERROR lib failed", "C-LEVEL FD2", "UserWarning: a library warning",
                 "WARNING other: a propagating warning", "LIB INFO outer again"):
        assert line in outer, (line, outer)
    assert "LIB INFO inner lib info" in logs["inner.log"] and "CHILD RAW" in logs["inner.log"]
    assert "CHILD C" in logs["child.log"] and "OURS" not in "".join(logs.values())


def test_library_failure_reaches_terminal_with_log_path(toy, tmp_path):
    """vLLM refusing its arguments is not our UserError: the traceback reaches the terminal, ending
    with where the library log is."""
    cfg = write_config(tmp_path / "c.yaml", toy, rollout={"vllm": {"enforce_eager": True, "dtype": "float32",
                                                                   "max_model_len": 100000}})
    run = tmp_path / "run"
    res = run_cli("rollout", run, "--config", cfg)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" in res.stderr
    assert f"(what the libraries printed during this command: {run / 'logs' / 'rollout.log'})" in res.stderr
    assert (run / "logs" / "rollout.log").is_file()
