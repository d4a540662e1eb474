"""examples/skypilot-spot.yaml is a SkyPilot managed spot job that resumes: loaded offline by SkyPilot's
own parser (`sky.Task.from_yaml`), with the fields the recipe relies on checked here, since the
parser accepts keys it does not know. SkyPilot is the optional `skypilot` extra; beside this
project's pins it downgrades click, so it may live in an interpreter of its own
(EOPD_SKYPILOT_PYTHON, which .ci/run sets)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from conftest import REPO

RECIPE = REPO / "examples" / "skypilot-spot.yaml"

READ = """
import json, sys
import sky
task = sky.Task.from_yaml(sys.argv[1])
out = {"name": task.name, "run": task.run, "setup": task.setup, "envs": task.envs,
       "storage_mounts": sorted(task.storage_mounts or {}), "file_mounts": sorted(task.file_mounts or {}),
       "resources": [{"use_spot": r.use_spot, "job_recovery": r.job_recovery,
                      "accelerators": r.accelerators} for r in task.resources]}
print(json.dumps(out))
"""


def skypilot_python() -> str:
    if importlib.util.find_spec("sky") is not None:
        return sys.executable
    default = REPO / ".venv-skypilot" / "bin" / "python"  # where `./install.sh test` puts it
    python = os.environ.get("EOPD_SKYPILOT_PYTHON") or (str(default) if default.is_file() else None)
    assert python, ("SkyPilot is not installed: pip install 'eopd-pipe[skypilot]', or into an interpreter "
                    "of its own and set EOPD_SKYPILOT_PYTHON to it (.ci/run does)")
    return python


def test_spot_recipe_loads_and_resumes_the_same_command_over_an_s3_run_dir():
    res = subprocess.run([skypilot_python(), "-c", READ, str(RECIPE)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    task = json.loads(res.stdout.strip().splitlines()[-1])
    assert task["name"] == "eopd-spot"
    assert len(task["resources"]) == 3  # one per accepted accelerator
    for r in task["resources"]:
        assert r["use_spot"] is True
        recovery = {k.lower(): v for k, v in r["job_recovery"].items()}
        assert recovery["max_restarts_on_errors"] >= 1 and recovery["strategy"].upper() == "EAGER_NEXT_REGION"
    assert task["envs"]["RUN_DIR"].startswith("s3://")
    # The run dir is a URL eopd-pipe writes itself, never a bucket mount (no locks, no rename there).
    assert task["storage_mounts"] == [] and task["file_mounts"] == []
    # One command, the same after every recovery: it resumes from the run dir's records.
    assert task["run"].strip() == 'eopd-pipe run "$RUN_DIR" --config "$CONFIG"'
    assert (REPO / task["envs"]["CONFIG"]).is_file()
    assert "install.sh gpu" in task["setup"]
