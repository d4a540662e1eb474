"""Config loading: typed, strict, with messages naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import DEFAULT_CONFIG, load_config, parse_overrides
from pipeline.errors import UserError
from pipeline.rundir import RunDir, freeze_config

BASE = {"student": {"path": "s"}, "teacher": {"path": "t"}, "prompts": {"path": "p.jsonl"}}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["rollout.n=8", "rollout.vllm.enforce_eager=true", "seed=3"])
    assert cfg.rollout.n == 8 and cfg.rollout.vllm.enforce_eager is True and cfg.seed == 3
    assert cfg.rollout.temperature == 1.0  # default


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, {**BASE, "rollout": {"nn": 3}})
    with pytest.raises(UserError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "rollout.nn: unknown key" in msg and "max_tokens" in msg


def test_wrong_type(tmp_path):
    with pytest.raises(UserError, match=r"rollout.n: Input should be a valid integer \(got 'four'\)"):
        load_config(write(tmp_path, {**BASE, "rollout": {"n": "four"}}))


def test_missing_required_field(tmp_path):
    with pytest.raises(UserError, match="teacher: required field is missing"):
        load_config(write(tmp_path, {"student": {"path": "s"}, "prompts": {"path": "p"}}))


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_set_needs_key_value():
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_overrides(["rollout.n"])


def test_embedded_default_is_valid():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.rollout.n >= 1


def test_frozen_config_conflict_is_refused_with_a_diff(tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = load_config(write(tmp_path, BASE))
    freeze_config(run, cfg)
    frozen = run.config_path.read_bytes()
    assert freeze_config(run, cfg) == cfg  # same config: fine
    changed = load_config(write(tmp_path, BASE), ["rollout.n=9", "seed=1"])
    with pytest.raises(UserError) as e:
        freeze_config(run, changed)
    assert "rollout.n: 4 -> 9" in str(e.value) and "seed: 0 -> 1" in str(e.value) and "--allow-config-change" in str(e.value)
    assert run.config_path.read_bytes() == frozen
    freeze_config(run, changed, allow_change=True)
    assert load_config(run.config_path).rollout.n == 9
    assert len(list(run.root.glob("config.yaml.*"))) == 1  # the old one is kept


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; users write it that way on the command line and in files.
    assert parse_overrides(["train.lr=1e-4", "train.tau=8E-1", "rollout.n=4", "student.path=1e2x"]) == {
        "train": {"lr": 1e-4, "tau": 0.8}, "rollout": {"n": 4}, "student": {"path": "1e2x"}}
    path = tmp_path / "c.yaml"
    path.write_text("student: {path: s}\nteacher: {path: t}\nprompts: {path: p.jsonl}\ntrain: {lr: 3e-6}\n")
    assert load_config(path, ["train.max_grad_norm=2e0"]).train.lr == 3e-6
