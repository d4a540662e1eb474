"""pipeline/models.py: pieces that need no model."""

from __future__ import annotations

import os

from pipeline.models import visible_gpu


def test_visible_gpu_narrows_what_a_started_engine_sees_and_restores(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with visible_gpu("cuda:1"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # indices count within what is visible
    with visible_gpu("cuda:2"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6,7"
