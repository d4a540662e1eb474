"""The paper's toy study (bench/toy_study.py) in a reduced run: the update rules are what they claim
to be, and the qualitative results of the full run hold (seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eopd.losses import ObjectiveConfig

PATH = Path(__file__).resolve().parent.parent / "bench" / "toy_study.py"


@pytest.fixture(scope="module")
def toy_study():
    spec = importlib.util.spec_from_file_location("toy_study", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_study"] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead (seconds vs tens of seconds)
    yield module
    torch.set_num_threads(threads)


def _one_step(toy_study, rule: str, lr: float = 0.5):
    """One SGD step of the sampled RKL on 3 students with fixed sampled ids; returns (s, s_new, A, q, y)."""
    g = torch.Generator().manual_seed(3)
    teacher = F.log_softmax(torch.randn(3, toy_study.VOCAB, generator=g, dtype=torch.float64), -1)
    s = torch.randn(3, toy_study.VOCAB, generator=g, dtype=torch.float64)
    y = torch.tensor([[4], [17], [60]])
    behaviour = F.log_softmax(s, -1)
    top = teacher.topk(16, -1)
    s_param = s.clone().requires_grad_(True)
    if rule == "paper":
        loss = toy_study.paper_rule_loss(s_param, y, behaviour, teacher, top, "rkl", torch.ones(3, dtype=torch.bool))
    else:
        loss = toy_study.pg_loss(s_param, y, behaviour, teacher, toy_study.entropy_from_logprobs(teacher), top,
                                 ObjectiveConfig(objective="rkl"))
    (grad,) = torch.autograd.grad(loss, s_param)
    adv = (teacher.gather(1, y) - behaviour.gather(1, y))[:, 0]
    return s, s - lr * grad, adv, behaviour.exp(), y[:, 0]


def test_paper_rule_is_s_y_plus_eta_advantage(toy_study):
    s, s_new, adv, _, y = _one_step(toy_study, "paper", lr=0.5)
    expected = s.clone()
    expected[torch.arange(3), y] += 0.5 * adv
    torch.testing.assert_close(s_new, expected)


def test_pg_rule_is_softmax_policy_gradient(toy_study):
    s, s_new, adv, q, y = _one_step(toy_study, "pg", lr=0.5)
    onehot = F.one_hot(y, toy_study.VOCAB).double()
    torch.testing.assert_close(s_new, s + 0.5 * adv[:, None] * (onehot - q))


def _changes(res, rule, objective, teacher):
    return float(res[(rule, objective, teacher)]["top1_changes"].mean())


def test_reduced_study_shows_the_full_runs_pattern(toy_study):
    cfg = toy_study.StudyConfig(seeds=40, steps=300, lr=2.0)
    res = toy_study.study(cfg, rules=("paper",), objectives=("rkl", "eopd"))
    # The paper's observation at eta = 2: under RKL the flat teacher's student changes its top-1 far more often.
    assert _changes(res, "paper", "rkl", "flat") > 2 * _changes(res, "paper", "rkl", "peaked")
    # EOPD on the peaked teacher (gate open): fewer top-1 changes and a much lower final KL(q||p) than RKL.
    assert _changes(res, "paper", "eopd", "peaked") < 0.5 * _changes(res, "paper", "rkl", "peaked")
    rkl_final = float(res[("paper", "rkl", "peaked")]["final_rkl"].mean())
    assert float(res[("paper", "eopd", "peaked")]["final_rkl"].mean()) < rkl_final / 3
    # ...but on the flat teacher EOPD tracks the near-tied modes, so its top-1 changes even more often.
    assert _changes(res, "paper", "eopd", "flat") > _changes(res, "paper", "rkl", "flat")


def test_contrast_needs_a_large_step(toy_study):
    # At eta = 0.5 RKL settles on both teachers: the peaked/flat contrast is gone.
    res = toy_study.study(toy_study.StudyConfig(seeds=40, steps=300, lr=0.5), rules=("paper",), objectives=("rkl",))
    assert _changes(res, "paper", "rkl", "flat") < 1.5 * _changes(res, "paper", "rkl", "peaked")
