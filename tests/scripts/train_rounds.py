"""Train several rounds in ONE process (one Trainer: model and optimiser stay in memory), as the
persistent `run` does; the reference for "rounds trained by separate `eopd-pipe train` calls take
the same steps as one continuous optimisation". Launch under torchrun for several ranks.

    python tests/scripts/train_rounds.py RUN_DIR ROUND [ROUND ...] [--set KEY=VALUE ...]
"""

import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.rundir import RunDir
from stages.train import Trainer


def main() -> None:
    args = sys.argv[1:]
    sets = tuple(args[i + 1] for i, a in enumerate(args) if a == "--set")
    plain = [a for i, a in enumerate(args) if a != "--set" and (i == 0 or args[i - 1] != "--set")]
    run = RunDir(Path(plain[0]))
    cfg = load_config(run.config_path, sets)
    trainer = Trainer(run, cfg, allow_config_change=True)
    for r in plain[1:]:
        trainer.train_round(int(r))


if __name__ == "__main__":
    main()
