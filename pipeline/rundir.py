"""The run directory: the only state of a run. Paths, the frozen config, per-round locations.

    RUN_DIR/config.yaml                 frozen resolved config
    RUN_DIR/prompts/prompts.parquet     tokenised prompt cache
    RUN_DIR/round-0000/{rollouts,teacher,train,student}/
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.config import Config, config_to_dict, diff_configs, load_yaml, validate
from pipeline.errors import UserError

STAGES = ("rollouts", "teacher")  # sharded stages, in order; train/student are directories of their own


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a run dir is often shared by a team
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def prompts_dir(self) -> Path:
        return self.root / "prompts"

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r:04d}"

    def stage_dir(self, r: int, stage: str) -> Path:
        return self.round_dir(r) / stage

    def student_dir(self, r: int) -> Path:
        """The student written by round r's training (the policy of round r+1)."""
        return self.round_dir(r) / "student"

    def student_done(self, r: int) -> bool:
        """Round r's training is finished: its student is written (atomically, config.json inside)."""
        return (self.student_dir(r) / "config.json").is_file()

    def rounds_present(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("round-[0-9][0-9][0-9][0-9]") if p.is_dir())

    def policy_for_round(self, cfg: Config, r: int) -> Path:
        """Round 0 samples from the base student, round r>0 from round r-1's trained student."""
        if r == 0:
            return Path(cfg.student.path)
        prev = self.student_dir(r - 1)
        if not (prev / "config.json").is_file():
            raise UserError(
                f"round {r} samples from the student trained in round {r - 1}, but {prev} does not exist yet; "
                f"run `eopd-pipe train {self.root} --round {r - 1}` first (or `eopd-pipe run {self.root}`)"
            )
        return prev


def freeze_config(run: RunDir, cfg: Config, allow_change: bool = False) -> Config:
    """First use writes RUN_DIR/config.yaml; later uses must agree with it (or pass allow_change)."""
    new = config_to_dict(cfg)
    if run.config_path.exists():
        frozen = validate(load_yaml(run.config_path.read_text()) or {}, str(run.config_path))
        old = config_to_dict(frozen)
        changes = diff_configs(old, new)
        if not changes:
            return frozen
        if not allow_change:
            raise UserError(
                f"{run.config_path} was frozen by an earlier call and this call's config differs:\n  "
                + "\n  ".join(changes)
                + "\nRun without --config/--set to continue with the frozen config, or pass "
                "--allow-config-change to replace it (the old one is kept as config.yaml.<time>)."
            )
        backup = run.config_path.with_name(f"config.yaml.{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run.config_path, backup)
    atomic_write_text(run.config_path, yaml.safe_dump(new, sort_keys=False))
    return cfg
