"""The repository passes its own lint (pyflakes and syntax errors; pyproject.toml [tool.ruff]),
so `python3 -m pytest` (README's test command, and CI's) checks every file."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_finds_nothing():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(REPO)],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
