"""The rollout sampler: one `vllm.LLM` kept for a whole `eopd-pipe run`, whose weights are swapped
in place for each round's new student instead of starting a new engine (~17 s on a CPU, tens of
seconds with CUDA graph capture on a GPU).

In-place reload is vLLM's own `reload_weights` worker method, followed by two refreshes it leaves
to the caller:
  - the prefix cache (KV blocks computed with the old weights): `LLM.reset_prefix_cache()`;
  - the LM head's derived copy. On the CPU backend `process_weights_after_loading` packs each
    linear layer's weight into a GEMM layout. With tied embeddings (Qwen3-0.6B/1.7B/4B, the toy)
    `lm_head` shares `embed_tokens.weight`; the layerwise reload re-processes the embedding but not
    the head, so its packed copy keeps the OLD weights and log-probs are silently off (measured: up
    to 1.25 nats on the toy). `WeightReload.reload_policy` re-runs the head's
    `process_weights_after_loading` after the reload (idempotent: it packs from `weight`, which it
    keeps), which makes sampling exactly a fresh engine's (tests/test_sampler.py, tied and untied).

Starting the engine is retried (`start_engine`). Seen under load in tests/test_sampler.py (out of
process engines, as the persistent `run` keeps them): vLLM reports a death of its engine process
during start-up only as "Engine core initialization failed. See root cause above. Failed core
proc(s): {...}", the exit code can be missing (`{}`: the process not reaped yet), and the test
showed the last 3,000 characters of stderr, the parent's traceback, not the root cause above it.
Out of process, vLLM 0.32 on a CPU runs the engine core and, under it, a worker process that
loads the weights and takes the KV cache. On a busy machine a healthy model's start dies there by
memory: the kernel's OOM killer SIGKILLs the process that is allocating (the worker: the engine
core then fails with "WorkerProc initialization failed" and exits 1; or the core itself, -9), or
the worker's own check finds less memory available than the KV cache asked for
(VLLM_CPU_KVCACHE_SPACE; exit 1). Both pass once the other
jobs' peak has gone, so a start is tried again after a pause; the last failure is one message
naming the exits, the memory available and the fixes. Bad arguments fail in this process before
any engine process starts and are raised at once; an engine error that is not transient (an
unsupported head size) is reported after the last try.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.models import make_llm

EXTENSION = "pipeline.sampler.WeightReload"
# How often an engine start that vLLM reports as "Engine core initialization failed" is tried, and
# the pause before the next try (seconds, times the try number): overridable for tests and CI.
ATTEMPTS_ENV, PAUSE_ENV = "EOPD_ENGINE_START_ATTEMPTS", "EOPD_ENGINE_RETRY_SECONDS"
DEFAULT_ATTEMPTS, DEFAULT_PAUSE_S = 3, 10.0
# Fault injection for tests/test_sampler.py: EOPD_TEST_ENGINE_START_FAIL=COUNTER_FILE:N SIGKILLs the
# process that loads the worker extension (vLLM's worker, while the engine starts), the first N times.
FAIL_ENV = "EOPD_TEST_ENGINE_START_FAIL"
_INIT_FAILED = "Engine core initialization failed"


def start_engine(model_path: str | Path, vllm_cfg, seed: int, **kwargs: Any):
    """`make_llm(...)`, tried again when vLLM's engine process dies while starting (see the module
    docstring). Other errors (a bad argument, an unsupported model) are raised at once."""
    attempts = max(1, int(os.environ.get(ATTEMPTS_ENV, DEFAULT_ATTEMPTS)))
    pause = float(os.environ.get(PAUSE_ENV, DEFAULT_PAUSE_S))
    codes: list[str] = []
    for attempt in range(1, attempts + 1):
        try:
            return make_llm(model_path, vllm_cfg, seed, **kwargs)
        except RuntimeError as e:
            if _INIT_FAILED not in str(e):
                raise
            codes.append(_exit_codes(str(e)))
            if attempt == attempts:
                raise UserError(_start_failed_message(model_path, vllm_cfg, codes)) from None
            wait = pause * attempt
            said = " ".join(str(e).split())[:300]  # vLLM's own words, on one line
            print(f"warning: vLLM's engine process for {model_path} exited while starting (exit {codes[-1]}; "
                  f"{_memory_note(vllm_cfg)}); trying again in {wait:g} s ({attempt + 1} of {attempts}). "
                  f"vLLM said: {said}", file=sys.stderr, flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _exit_codes(message: str) -> str:
    """"Failed core proc(s): {'EngineCore_DP0': -9}" -> "-9 (killed by SIGKILL)"."""
    found = re.findall(r"'[^']*': (-?\d+)", message.split("Failed core proc(s):")[-1])
    if not found:  # "{}": the process had not been reaped when vLLM looked (seen under load)
        return "code not reported by vLLM"
    out = []
    for code in found:
        if code.lstrip("-").isdigit() and int(code) < 0:
            out.append(f"{code} (killed by {signal.Signals(-int(code)).name})")
        else:
            out.append(code)
    return ", ".join(out)


def _memory_note(vllm_cfg) -> str:
    try:
        import psutil

        available = psutil.virtual_memory().available / 2**30
    except Exception:  # noqa: BLE001 -- a note in a message, never a second failure
        return "available memory unknown"
    return f"{available:.1f} GiB of memory available now"


def _start_failed_message(model_path, vllm_cfg, codes: list[str]) -> str:
    return (f"vLLM's engine process for {model_path} exited while starting, {len(codes)} time(s) "
            f"(exit {'; '.join(codes)}); its own error, if it printed one, is above or in this command's log "
            f"(RUN_DIR/logs/). On a busy machine this is memory: the kernel's OOM killer (`dmesg | grep -i oom`; "
            f"vLLM then reports its worker's death) or vLLM's own check of the memory available: "
            f"{_memory_note(vllm_cfg)}, and the engine needs its weights plus its KV cache "
            f"(rollout.vllm.cpu_kvcache_gib / eval.vllm.cpu_kvcache_gib = {vllm_cfg.cpu_kvcache_gib:g} GiB on a CPU, "
            f"gpu_memory_utilization = {vllm_cfg.gpu_memory_utilization:g} of a GPU). Free memory (other jobs), lower "
            f"that setting, or allow more tries with {ATTEMPTS_ENV}=N; then run the same command again "
            f"(finished work is kept)")


def _fault_on_engine_start() -> None:
    """The test hook of FAIL_ENV, run when vLLM's worker process imports this module (to load the
    worker extension below), never in the process that asked for the engine."""
    spec = os.environ.get(FAIL_ENV)
    if not spec or multiprocessing.parent_process() is None:
        return
    counter, _, times = spec.rpartition(":")
    path = Path(counter)
    done = int(path.read_text() or 0) if path.is_file() else 0
    if done < int(times):
        path.write_text(str(done + 1))
        os.kill(os.getpid(), signal.SIGKILL)


_fault_on_engine_start()


class WeightReload:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called through `collective_rpc`."""

    def reload_policy(self, weights_path: str) -> None:
        self.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        if head is not None and hasattr(head, "quant_method"):
            # Rebuild the head's derived (packed) copy from its weight; see the module docstring.
            head.quant_method.process_weights_after_loading(head)


class Sampler:
    """A vLLM engine with the weights of `policy`; `load(path)` swaps them in place."""

    def __init__(self, policy: Path, vllm_cfg, seed: int, in_process: bool | None = None) -> None:
        self.llm = start_engine(policy, vllm_cfg, seed=seed, worker_extension_cls=EXTENSION, in_process=in_process)
        self.policy = self.started_from = Path(policy).resolve()
        # Read now: the directory may be a scratch copy that is moved or removed later (a student
        # still uploading when the engine started, stages/train.py: StudentUpload).
        self._started_files = _engine_files(self.started_from)
        self.reload_seconds = 0.0

    def can_load(self, policy: Path) -> bool:
        """Whether `policy` can be swapped in and then sample exactly as an engine started from it:
        the same model config (shapes, vocabulary, tied head), generation config and tokenizer files
        as the model this engine was started from (which fixed its stop tokens and vocabulary)."""
        return _engine_files(Path(policy)) == self._started_files

    def load(self, policy: Path) -> None:
        """Sample from the weights in `policy` (a save_pretrained directory of the same architecture)."""
        policy = Path(policy).resolve()
        if policy == self.policy:
            return
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_policy", kwargs={"weights_path": str(policy)})
        self.llm.reset_prefix_cache()
        self.policy = policy
        self.reload_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the engine (and its process) now rather than at interpreter exit."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None


# Keys that save_pretrained and the trainer write whatever the weights, which the engine does not read.
_NOISE = ("_name_or_path", "name_or_path", "transformers_version", "use_cache", "is_local", "local_files_only")


def _engine_files(model_dir: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):
        path = model_dir / name
        if not path.is_file():
            out[name] = None
        elif name.endswith("config.json") or name == "special_tokens_map.json":
            out[name] = {k: v for k, v in json.loads(path.read_text()).items() if k not in _NOISE}
        else:
            out[name] = path.read_bytes()
    return out
