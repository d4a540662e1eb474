"""What the train stage needs besides the math: the optimiser engine (plain torch or DeepSpeed),
the LR schedule, atomic checkpoints with RNG states, and distributed helpers.

Both engines expose the same five calls (`backward`, `step`, `save`, `load`, `module`), so the
stage's loop is written once. DeepSpeed runs when `train.deepspeed` names a JSON config; the
process is then started by the `deepspeed` or `torchrun` launcher (one process per GPU).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.errors import UserError

CHECKPOINT_DONE = "COMPLETE"  # written last: a checkpoint directory without it is ignored


# ----------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed once initialised, else the launcher's env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _several_ranks() -> bool:
    # A one-process group exists too: vLLM creates one when a rollout ran in this process.
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def barrier() -> None:
    if _several_ranks():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    if not _several_ranks():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- schedule and RNG


def lr_factor(global_step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to min_lr_ratio over the remaining steps (or constant)."""
    if global_step < cfg.warmup_steps:
        return (global_step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (global_step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_rng_state(path: Path) -> None:
    """This process's RNG states as tensors and plain values: loadable with weights_only=True."""
    state = rng_state()
    kind, key, pos, has_gauss, gauss = state["numpy"]
    state["numpy"] = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss}
    torch.save(state, path)


def load_rng_state(path: Path) -> dict[str, Any]:
    """The inverse of save_rng_state; refuses a file that would need pickle to load (it could run code)."""
    state = safe_torch_load(path)
    np_state = state["numpy"]
    state["numpy"] = (np_state["kind"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                      np_state["has_gauss"], np_state["gauss"])
    return state


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only. A checkpoint copied
    from elsewhere cannot run code on load; a refused file names itself and the way out."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds more than tensors and plain values, so it was not loaded (a pickle can run "
                        f"code): {str(e).splitlines()[0]}. Delete this checkpoint directory to resume from the one "
                        f"before it, or from the round's start") from None


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(ckpt_dir) -> list:
    """The checkpoint directories of `ckpt_dir` (local or on a bucket) that hold their COMPLETE file."""
    from pipeline import storage

    return [ckpt_dir / n for n in storage.subdirs(ckpt_dir, "step-[0-9]*") if storage.is_file(ckpt_dir / n / CHECKPOINT_DONE)]


def prune_checkpoints(ckpt_dir, keep: int) -> None:
    from pipeline import storage

    for old in complete_checkpoints(ckpt_dir)[:-keep]:
        storage.remove_tree(old)
    if not storage.is_remote(ckpt_dir):
        for partial in Path(ckpt_dir).glob(".incoming-*"):
            shutil.rmtree(partial, ignore_errors=True)


# ----------------------------------------------------------------------------- engines


class TorchEngine:
    """Single process, plain torch AdamW with gradient clipping."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, lr_lambda) -> None:
        self.module = model
        self.cfg = cfg
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def fast_forward(self, global_step: int) -> None:
        _fast_forward(self.scheduler, global_step)

    def save(self, path: Path, client_state: dict[str, Any]) -> None:
        """Write a checkpoint to `path` (a fresh directory)."""
        path.mkdir(parents=True)
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "client": client_state}, path / "state.pt")

    def load(self, path: Path) -> dict[str, Any]:
        state = safe_torch_load(path / "state.pt")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2. Micro-batches vary in number per step (token-budget packing), so the
    accumulation boundary is set by hand instead of through a fixed gradient_accumulation_steps."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, lr_lambda, bf16: bool) -> None:
        import deepspeed

        ds_cfg = load_deepspeed_config(cfg, bf16)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
        self.module = self.engine.module

    def backward(self, loss: torch.Tensor, is_last_micro_batch: bool) -> None:
        # Reduce-scatter gradients only at the last micro-batch of the optimiser step.
        self.engine.set_gradient_accumulation_boundary(is_last_micro_batch)
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def fast_forward(self, global_step: int) -> None:
        _fast_forward(self.scheduler, global_step)

    def save(self, path: Path, client_state: dict[str, Any]) -> None:
        """Collective: every rank calls it. DeepSpeed writes path.parent/path.name/."""
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state,
                                    save_latest=False)

    def load(self, path: Path) -> dict[str, Any]:
        check_deepspeed_checkpoint(path)  # DeepSpeed itself loads with weights_only=False
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        return client


def _fast_forward(scheduler, global_step: int) -> None:
    """Put a fresh LambdaLR at `global_step` of the global schedule (no optimiser step taken)."""
    scheduler.last_epoch = global_step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        scheduler.step()


# Globals a DeepSpeed ZeRO-1/2 checkpoint of ours pickles besides tensors and containers
# (read from real checkpoints with torch.serialization.get_unsafe_globals_in_checkpoint).
# Each is a plain data class or enum (constructing one runs no code of the file's choosing).
DEEPSPEED_SAFE_GLOBALS = {"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.utils.tensor_fragment.fragment_address",
                          "deepspeed.runtime.zero.config.ZeroStageEnum"}


def check_deepspeed_checkpoint(path: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose pickles reference anything beyond tensors, containers and
    the DeepSpeed names DeepSpeed itself writes (a pickle can run code; DeepSpeed's loader would)."""
    for f in sorted(Path(path).glob("*.pt")):
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
                  if g not in DEEPSPEED_SAFE_GLOBALS]
        if unsafe:
            raise UserError(f"{f} references {unsafe[:5]}, which a checkpoint of eopd-pipe never holds, so it was not "
                            f"loaded (a pickle can run code). Delete {path} to resume from the checkpoint before it")


def load_deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    path = Path(cfg.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"train.deepspeed: {path} does not exist (see configs/deepspeed/ for examples)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"train.deepspeed: {path} is not valid JSON: {e}") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UserError(f"{path}: ZeRO stage {stage} is not supported by the chunked LM-head loss "
                        f"(it needs the whole lm_head weight on each rank); use stage 1 or 2")
    # eopd-pipe owns batching and accumulation: one "micro-batch" per backward call.
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.max_grad_norm
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = bf16
    return ds
