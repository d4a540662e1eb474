"""pipeline/training.py through the real CLI: checkpoints load without pickle, so a run directory
copied from elsewhere cannot run code when `eopd-pipe train` resumes from it."""

from __future__ import annotations

import os
import pickle
import shutil
import signal

import pytest
import torch

from conftest import kill_group, run_cli, spawn_cli, wait_for_line

pytestmark = pytest.mark.slow


class Evil:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["state.pt", "rng-rank0.pt"])
def test_a_checkpoint_holding_code_is_refused(scored, tmp_path, victim):
    _, run = scored
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy, ignore=shutil.ignore_patterns("train", "student"))
    proc = spawn_cli("train", run_copy, env={"EOPD_TEST_PAUSE": "train_step:3"})  # checkpoint at step 2
    wait_for_line(proc, "EOPD_TEST_PAUSE reached")
    kill_group(proc, signal.SIGKILL)
    ckpt = run_copy / "round-0000" / "train" / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    # A real torch checkpoint whose payload also carries the hostile object.
    state = torch.load(ckpt / victim, weights_only=False)
    state["extra"] = Evil(str(marker))
    torch.save(state, ckpt / victim, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    res = run_cli("train", run_copy)
    assert res.returncode == 2, res.stderr[-3000:]
    assert not marker.exists()
    assert f"{victim} holds more than tensors and plain values" in res.stderr and "Traceback" not in res.stderr
    assert "Delete this checkpoint directory" in res.stderr
