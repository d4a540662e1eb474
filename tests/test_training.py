"""pipeline/training.py through the real CLI: checkpoints load without pickle, so a run directory
copied from elsewhere cannot run code when `eopd-pipe train` resumes from it."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from conftest import run_cli


class Evil:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["state.pt", "rng-rank0.pt"])
def test_a_checkpoint_holding_code_is_refused(killed_checkpoint, tmp_path, victim):
    # conftest's killed_checkpoint: `train` SIGKILLed after step 3 was logged, checkpoint at step 2
    run_copy = shutil.copytree(killed_checkpoint.run, tmp_path / "run")
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
