"""A write failure during training (the run directory's disk full at a checkpoint) is one message
naming the checkpoint and the fix, leaves what a kill at that point would leave, and the same
command resumes once there is space. Needs root (a small tmpfs), as CI and the developers' machines run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size_bytes: int, remount: bool = False) -> None:
        opts = f"{'remount,' if remount else ''}size={size_bytes}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], check=True)
    yield mnt, mount
    subprocess.run(["umount", str(mnt)], check=False)


def _size(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_checkpoint_on_a_full_disk_is_one_message_and_resumes(scored, small_disk):
    cfg, src = scored
    mnt, mount = small_disk
    need = _size(src)
    mount(need + 2 * 4096 * 64)  # the shards fit, a checkpoint (model + Adam moments, ~10 MB) does not
    run = mnt / "run"
    shutil.copytree(src, run)
    res = run_cli("train", run, "--config", cfg, "--round", "0")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line[line.index("error:"):] for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, res.stderr[-3000:]
    assert str(run / "round-0000" / "train" / "checkpoints") in errors[0] and "free space" in errors[0], errors[0]
    ckpts = run / "round-0000" / "train" / "checkpoints"
    assert not [p for p in ckpts.iterdir()] if ckpts.is_dir() else True  # no half checkpoint, no scratch left
    assert not (run / "round-0000" / "student").exists()
    mount(need + 256 * 2**20, remount=True)
    res = run_cli("train", run, "--config", cfg, "--round", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "round-0000" / "student" / "config.json").is_file()
    res = run_cli("status", run, "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert os.listdir(ckpts)
