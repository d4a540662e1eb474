"""The run directory: the only state of a run. Paths, the frozen config, per-round locations.

    RUN_DIR/config.yaml                 frozen resolved config
    RUN_DIR/prompts/prompts.parquet     tokenised prompt cache
    RUN_DIR/round-0000/{rollouts,teacher,train,student}/
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import yaml

from pipeline import storage
from pipeline.config import Config, config_to_dict, diff_configs, load_yaml, validate
from pipeline.errors import UserError
from pipeline.storage import Location

STAGES = ("rollouts", "teacher")  # sharded stages, in order; train/student are directories of their own


def atomic_write_text(path: Location, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of one."""
    storage.remove_stale_tmp(path)  # left by a writer that was killed
    storage.write_text(path, text)


class RunDir:
    """A run directory: a local path or a bucket URL (`s3://bucket/prefix`), read and written only
    through `pipeline.storage`. An unsupported URL scheme is refused here, never taken for a path."""

    def __init__(self, root: Location | str) -> None:
        self.root = storage.location(root)
        storage.check_reachable(self.root)  # a missing bucket, bad credentials or a dead endpoint: one message now

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.root)

    def local_dir(self, name: str) -> Path:
        """A local directory for what writes files in place (a tracker's own store, TensorBoard's
        event files): RUN_DIR/NAME locally; for a bucket run, NAME in the local cache of that run."""
        if not self.remote:
            return self.root / name
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        return storage.cache_root() / "runs" / key / name

    @property
    def config_path(self) -> Location:
        return self.root / "config.yaml"

    @property
    def prompts_dir(self) -> Location:
        return self.root / "prompts"

    def round_dir(self, r: int) -> Location:
        return self.root / f"round-{r:04d}"

    def stage_dir(self, r: int, stage: str) -> Location:
        return self.round_dir(r) / stage

    def student_dir(self, r: int) -> Location:
        """The student written by round r's training (the policy of round r+1)."""
        return self.round_dir(r) / "student"

    def student_done(self, r: int) -> bool:
        """Round r's training is finished: its student is written (config.json last: see storage.upload_tree)."""
        done = self.student_dir(r) / "config.json"
        if not storage.is_file(done):
            return False
        storage.remember_final(done)  # a complete student stays so (one training claim writes it)
        return True

    def rounds_present(self) -> list[int]:
        return sorted(int(n.split("-")[1]) for n in storage.subdirs(self.root, "round-[0-9][0-9][0-9][0-9]"))

    def policy_for_round(self, cfg: Config, r: int) -> Location | str:
        """Round 0 samples from the base student, round r>0 from round r-1's trained student."""
        if r == 0:
            return cfg.student.path
        prev = self.student_dir(r - 1)
        if not self.student_done(r - 1):
            raise UserError(
                f"round {r} samples from the student trained in round {r - 1}, but {prev} does not exist yet; "
                f"run `eopd-pipe train {self.root} --round {r - 1}` first (or `eopd-pipe run {self.root}`)"
            )
        return prev


def freeze_config(run: RunDir, cfg: Config, allow_change: bool = False) -> Config:
    """First use writes RUN_DIR/config.yaml; later uses must agree with it (or pass allow_change)."""
    new = config_to_dict(cfg)
    if storage.is_file(run.config_path):
        text = storage.read_text(run.config_path)
        frozen = validate(load_yaml(text) or {}, str(run.config_path))
        old = config_to_dict(frozen)
        changes = diff_configs(old, new)
        if not changes:
            storage.remember_final(run.config_path, text.encode())  # read once per process (a bucket)
            return frozen
        if not allow_change:
            raise UserError(
                f"{run.config_path} was frozen by an earlier call and this call's config differs:\n  "
                + "\n  ".join(changes)
                + "\nRun without --config/--set to continue with the frozen config, or pass "
                "--allow-config-change to replace it (the old one is kept as config.yaml.<time>)."
            )
        backup = run.config_path.with_name(f"config.yaml.{time.strftime('%Y%m%d-%H%M%S')}")
        storage.move(run.config_path, backup)
    text = yaml.safe_dump(new, sort_keys=False)
    atomic_write_text(run.config_path, text)
    storage.remember_final(run.config_path, text.encode())
    return cfg
