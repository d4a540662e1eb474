"""Model and tokenizer loading, with clear errors for missing or malformed model directories."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError


def check_model_dir(path: str | Path, what: str) -> Path:
    """A local HF model directory must exist and hold config.json (hub names pass through)."""
    p = Path(path)
    looks_local = p.is_absolute() or str(path).startswith(".") or p.exists() or len(p.parts) != 2
    if not looks_local:
        return _hub_snapshot(str(path), what)
    if not p.is_dir():
        raise UserError(f"{what} model directory {p} does not exist; set {what}.path to a save_pretrained directory "
                        f"(or run `eopd-pipe make-toy DIR` for tiny local models)")
    if not (p / "config.json").is_file():
        raise UserError(f"{what} model directory {p} has no config.json; it must be a transformers save_pretrained directory")
    return p


def load_tokenizer(path: str | Path, what: str = "student"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise UserError(f"{what} tokenizer at {path} could not be loaded: {type(e).__name__}: {e}") from None


def make_llm(model_path: str | Path, vllm_cfg, seed: int):
    """A `vllm.LLM` for sampling. Must be called from code under `if __name__ == "__main__"`
    (vLLM spawns worker processes), which the `eopd-pipe` console script is."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{vllm_cfg.cpu_kvcache_gib:g}")
    in_process = vllm_cfg.in_process
    if in_process is None:
        import torch

        in_process = vllm_cfg.tensor_parallel_size == 1 and not torch.cuda.is_available()
    extra = {}
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is created
        extra["distributed_executor_backend"] = "uni"
    from vllm import LLM

    return LLM(
        **extra,
        model=str(model_path),
        tokenizer=str(model_path),
        seed=seed,
        dtype=vllm_cfg.dtype,
        max_model_len=vllm_cfg.max_model_len,
        tensor_parallel_size=vllm_cfg.tensor_parallel_size,
        gpu_memory_utilization=vllm_cfg.gpu_memory_utilization,
        enforce_eager=vllm_cfg.enforce_eager,
        enable_prefix_caching=vllm_cfg.enable_prefix_caching,
    )


def _hub_snapshot(repo_id: str, what: str) -> Path:
    """'org/name' -> the local snapshot directory (downloaded unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise UserError(f"{what}.path {repo_id!r} is not a local directory and could not be fetched from the hub "
                        f"({type(e).__name__}); download it first or point {what}.path at a local save_pretrained directory") from None
