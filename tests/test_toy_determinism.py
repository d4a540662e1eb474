"""`make-toy` builds the same bytes run to run on one machine: two builds in two fresh processes (the
demo's shapes and optimiser, fewer steps) give byte-identical models, tokenizers and prompt files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BUILD = ("import sys; from pipeline.toy import make_toy; "
         "make_toy(sys.argv[1], n_eval=16, progress=False, teacher_steps=24, student_steps=12)")


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "toy.json"}  # toy.json: timings


@pytest.mark.slow
def test_two_builds_are_byte_identical(tmp_path):
    for name in ("a", "b"):
        res = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / name)], cwd=REPO, capture_output=True,
                             text=True, timeout=1800, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                           "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert "teacher/model.safetensors" in a and "student/model.safetensors" in a and "train_prompts.jsonl" in a
    assert a == b
