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
"""

from __future__ import annotations

import json
import time
from functools import cached_property
from pathlib import Path

from pipeline.models import make_llm

EXTENSION = "pipeline.sampler.WeightReload"


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
        self.llm = make_llm(policy, vllm_cfg, seed=seed, worker_extension_cls=EXTENSION, in_process=in_process)
        self.policy = self.started_from = Path(policy).resolve()
        self.reload_seconds = 0.0

    def can_load(self, policy: Path) -> bool:
        """Whether `policy` can be swapped in and then sample exactly as an engine started from it:
        the same model config (shapes, vocabulary, tied head), generation config and tokenizer files
        as the model this engine was started from (which fixed its stop tokens and vocabulary)."""
        return _engine_files(Path(policy)) == self._started_files

    @cached_property
    def _started_files(self) -> dict[str, object]:
        return _engine_files(self.started_from)  # read once: a real tokenizer.json is ~11 MB

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
