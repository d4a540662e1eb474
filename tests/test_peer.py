"""bench/trl_peer.py: TRL gets eopd-pipe's optimiser and schedule, and really trains on the toy."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.training import lr_factor
from pipeline.work import record_timing

REPO = Path(__file__).resolve().parent.parent


def _peer():
    spec = importlib.util.spec_from_file_location("trl_peer", REPO / "bench" / "trl_peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["trl_peer"] = module
    spec.loader.exec_module(module)
    return module


def test_trl_gets_our_optimiser_schedule_and_sampling_settings():
    peer = _peer()
    cfg = load_config(None)  # the embedded default
    steps = cfg.rounds * cfg.rollout.n * cfg.prompts.prompts_per_round // cfg.train.batch_rows
    model = torch.nn.Linear(3, 2)
    opt, sched = peer.make_optimizer(model, cfg, steps)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == cfg.train.weight_decay
    seen = []
    for step in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [cfg.train.lr * lr_factor(s, steps, cfg.train) for s in range(steps)]
    assert seen == pytest.approx(want, rel=1e-12)
    kw = peer.trl_config_kwargs(cfg, steps, seed=3)
    assert (kw["max_steps"], kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]) == \
        (steps, cfg.train.batch_rows, 1)
    assert (kw["learning_rate"], kw["max_grad_norm"], kw["beta"]) == (cfg.train.lr, cfg.train.max_grad_norm, 1.0)
    assert (kw["temperature"], kw["top_p"], kw["max_completion_length"]) == \
        (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_tokens)


def test_our_timeline_reads_the_rounds_timings(tmp_path):
    peer = _peer()
    for r in range(3):
        d = tmp_path / f"round-{r:04d}"
        d.mkdir()
        for stage, wall in (("rollouts", 0.04), ("teacher", 0.02), ("train", 0.06)):
            t0 = time.perf_counter()
            time.sleep(wall)  # the stage "runs" for its wall, then records it, as pipeline.work does
            record_timing(d, stage, time.perf_counter() - t0, 0.0, 0.0)
    t = peer.our_timeline(tmp_path)
    assert t["rounds"] == 3 and sorted(t["round_end_s"]) == ["0", "1", "2"]
    assert t["stage_wall_sum_s"] == pytest.approx({"rollouts": 0.12, "teacher": 0.06, "train": 0.18}, rel=0.5)
    ends = [t["round_end_s"][str(r)] for r in range(3)]
    assert ends == sorted(ends) and t["train_s"] == ends[-1] >= sum(t["stage_wall_sum_s"].values()) - 1e-3


@pytest.mark.slow
def test_trl_distillation_trainer_trains_the_toy_student(toy, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("accelerate")
    peer = _peer()
    sets = peer.toy_sets(Path(toy.root), 0) + ["rounds=1", "prompts.prompts_per_round=32", "rollout.max_tokens=12"]
    cfg = load_config(None, sets)
    out = tmp_path / "trl"
    summary = peer.train_trl(Path(toy.root), out, cfg, steps=2, seed=0, save_at=[1], threads=1)
    assert sorted(summary["step_wall_s"]) == ["1", "2"] and summary["s_per_step"] > 0
    assert summary["first_losses"] == [] or all(math.isfinite(x) for x in summary["first_losses"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = AutoModelForCausalLM.from_pretrained(toy.student)
    for where in (out / "step-00001", out / "final"):
        after = AutoModelForCausalLM.from_pretrained(where)
        AutoTokenizer.from_pretrained(where)  # eopd-pipe eval loads the tokenizer from the model dir
        moved = max((a - b).abs().max().item() for a, b in zip(after.parameters(), before.parameters()))
        assert moved > 0  # two AdamW steps at lr 3e-4 warm-up move the weights
    json.dumps(summary)  # what trl_peer.py writes to train.json
