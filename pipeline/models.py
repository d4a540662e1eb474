"""Model and tokenizer loading, with clear errors for missing or malformed model directories."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:  # torch is imported where used: `eopd-pipe --help` should not pay for it
    import torch


def check_model_dir(path, what: str) -> Path:
    """A local HF model directory must exist and hold config.json. The hub is asked only for a name
    that cannot be a local path ("org/name" whose "org" is not a local directory) or "hub:org/name".
    A bucket URL (s3://bucket/prefix, also a student written into a bucket run directory) is read
    from its verified local cache (`storage.local_tree`), downloaded once per content."""
    from pipeline import storage

    text = str(path)
    if storage.is_remote(path) or storage.looks_like_url(text):
        loc = storage.location(path)
        if not storage.is_file(loc / "config.json"):
            raise UserError(f"{what} model {loc} has no config.json (or does not exist); it must be a transformers "
                            f"save_pretrained directory uploaded under that prefix")
        return storage.local_tree(loc, f"{what} model")
    if text.startswith("hub:"):  # "hub:org/name": the hub, even where a local path of that name could exist
        return _hub_snapshot(text[len("hub:"):], what)
    p = Path(text).expanduser()
    looks_local = (p.is_absolute() or text.startswith((".", "~")) or p.exists() or len(p.parts) != 2
                   or Path(p.parts[0]).is_dir())
    if not looks_local:
        return _hub_snapshot(text, what)
    if not p.is_dir():
        where = f" ({p.resolve()})" if not p.is_absolute() else ""
        raise UserError(f"{what} model directory {p}{where} does not exist; set {what}.path to a save_pretrained "
                        f"directory, a hub model as hub:org/name, or run `eopd-pipe make-toy DIR` for tiny local models")
    if not (p / "config.json").is_file():
        raise UserError(f"{what} model directory {p} has no config.json; it must be a transformers save_pretrained directory")
    return p


def pad_right(seqs) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Token sequences -> (input_ids, attention_mask), both [batch, longest], padded on the right
    (positions then count from 0 in every row, as the models expect without position ids)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


def length_sorted_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped so that (batch size x longest sequence) <= token_budget (a longer single
    sequence gets a batch of its own); sorting by length keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def response_hidden_states(model, seqs, prompt_lengths, device) -> "torch.Tensor":
    """Final hidden states [sum of response lengths, H] of a causal LM at the positions that predict
    the response tokens: each sequence is prompt + response, position j predicts token j + 1, so
    response token t (at P + t) is predicted at P + t - 1. The LM head is left to the caller."""
    import torch

    ids, mask = pad_right(seqs)
    hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    return torch.cat([hidden[r, P - 1 : len(s) - 1] for r, (s, P) in enumerate(zip(seqs, prompt_lengths))])


def load_tokenizer(path: str | Path, what: str = "student"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise UserError(f"{what} tokenizer at {path} could not be loaded: {type(e).__name__}: {e}") from None


def use_cpu_threads(n: int | None) -> None:
    """Config `cpu_threads`: torch's intra-op threads in this process and, through OMP_NUM_THREADS,
    in the processes it starts (stage processes, vLLM's engine). torch reads the variable when it
    loads, so it is set too where torch is not imported yet."""
    if n is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def make_llm(model_path: str | Path, vllm_cfg, seed: int, worker_extension_cls: str | None = None,
             in_process: bool | None = None):
    """A `vllm.LLM` for sampling. Must be called from code under `if __name__ == "__main__"`
    (vLLM spawns worker processes), which the `eopd-pipe` console script is. `in_process` overrides
    `vllm_cfg.in_process` (the persistent `run` keeps vLLM out of its process: see stages/run.py)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{vllm_cfg.cpu_kvcache_gib:g}")
    in_process = vllm_cfg.in_process if in_process is None else in_process
    if in_process is None:
        import torch

        in_process = vllm_cfg.tensor_parallel_size == 1 and not torch.cuda.is_available()
    extra = {}
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is created
        extra["distributed_executor_backend"] = "uni"
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    if worker_extension_cls:
        extra["worker_extension_cls"] = worker_extension_cls
    from vllm import LLM

    if vllm_cfg.device and vllm_cfg.device.startswith("cuda") and not in_process:
        # The engine process sees only that GPU (it reads CUDA_VISIBLE_DEVICES when it starts);
        # this process, which may already hold the others, is unaffected.
        with visible_gpu(vllm_cfg.device):
            return LLM(**extra, **_llm_args(model_path, vllm_cfg, seed))
    return LLM(**extra, **_llm_args(model_path, vllm_cfg, seed))


def _llm_args(model_path: str | Path, vllm_cfg, seed: int) -> dict:
    return dict(
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


@contextlib.contextmanager
def visible_gpu(device: str):
    """CUDA_VISIBLE_DEVICES narrowed to `device` ('cuda:N' or 'N') for processes started inside."""
    index = device.split(":")[-1]
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = before.split(",") if before else None
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible else index
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class GenerationQueue:
    """Groups of requests on one `vllm.LLM` engine, finished one group at a time.

    `add(key, prompts, params)` queues a group and returns at once; `wait(key)` steps the engine
    until every request of that group is finished and returns their outputs in order. Groups added
    before the wait keep running in the same batches meanwhile, so a caller that adds group i+1
    before waiting for group i never lets the batch drain between groups (one `LLM.generate` per
    group would: its last requests run in an ever smaller batch).
    """

    def __init__(self, llm) -> None:
        self.engine = llm.llm_engine
        self.pending: dict[str, list[str]] = {}
        self.finished: dict[str, object] = {}  # request id -> RequestOutput, until its group is collected

    def add(self, key: str, prompts: list, params: list) -> None:
        from vllm.sampling_params import RequestOutputKind

        ids = [f"{key}/{j}" for j in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params):
            # As LLM.generate does: no per-step outputs (cumulative ones cost O(length^2) host time).
            p.output_kind = RequestOutputKind.FINAL_ONLY
            self.engine.add_request(request_id, prompt, p)
        self.pending[key] = ids

    def wait(self, key: str) -> list:
        ids = self.pending.pop(key)
        remaining = sum(r not in self.finished for r in ids)
        while remaining:
            if not self.engine.has_unfinished_requests():
                raise RuntimeError(f"vLLM engine idle with {remaining} requests of {key!r} unanswered")
            for out in self.engine.step():
                if out.finished:
                    self.finished[out.request_id] = out
                    remaining -= out.request_id.rpartition("/")[0] == key
        return [self.finished.pop(r) for r in ids]


def _hub_snapshot(repo_id: str, what: str) -> Path:
    """'org/name' -> the local snapshot directory (downloaded unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        name = type(e).__name__
        if "NotFound" in name and "Entry" not in name:  # RepositoryNotFoundError, RevisionNotFoundError
            why = "the hub has no such model (or it is private: `huggingface-cli login`)"
        elif os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or "LocalEntryNotFound" in name:
            why = "it is not in the local hub cache and the hub is not reachable (offline)"
        else:
            why = f"the hub could not be reached: {name}"
        raise UserError(f"{what}.path {repo_id!r}: no local directory {Path(repo_id).resolve()}, and {why}; "
                        f"point {what}.path at a local save_pretrained directory, or download it first "
                        f"(`huggingface-cli download {repo_id}`)") from None


PROBE = "The teacher and student must agree: 3 + 4 = 7, naïve café, <tag> \n\t ∑x² 你好 🙂"


def check_same_vocabulary(student_tok, teacher_tok, student_path: str | Path, teacher_path: str | Path) -> None:
    """Teacher top-k ids are only meaningful to a student that numbers tokens the same way.

    Compares the vocabulary (token -> id), the special tokens (id -> text) and the ids of a
    probe string. Special-token *roles* may differ (a base student ends with <|endoftext|>,
    an instruct teacher with <|im_end|>): that is what `score_teacher.eos_map` is for.
    """
    problems = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])[:5]
        problems.append(f"vocabularies differ: sizes {len(sv)} vs {len(tv)}; only in student {only_s}, "
                        f"only in teacher {only_t}, different ids for {moved}")
    ss = {i: str(t) for i, t in student_tok.added_tokens_decoder.items() if t.special}
    ts = {i: str(t) for i, t in teacher_tok.added_tokens_decoder.items() if t.special}
    if ss != ts:
        diff = sorted(set(ss.items()) ^ set(ts.items()))[:6]
        problems.append(f"special tokens differ (id, text): {diff}")
    sp, tp = student_tok(PROBE, add_special_tokens=False)["input_ids"], teacher_tok(PROBE, add_special_tokens=False)["input_ids"]
    if sp != tp:
        problems.append(f"a probe string tokenises differently: student {sp[:12]}… vs teacher {tp[:12]}…")
    if problems:
        raise UserError(f"student tokenizer ({student_path}) and teacher tokenizer ({teacher_path}) are not the same "
                        f"vocabulary, so teacher top-k ids would mean other tokens to the student:\n  - "
                        + "\n  - ".join(problems) + "\nUse a teacher and student from the same model family.")
