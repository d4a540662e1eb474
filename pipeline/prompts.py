"""Prompt datasets: load with `datasets`, render the template, tokenise once, cache in the run dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from string import Formatter
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import PromptsConfig
from pipeline.errors import UserError
from pipeline import storage
from pipeline.shards import read_parquet, remove_stale_tmp, schema_metadata, write_shard
from pipeline.storage import Location

RESERVED_COLUMNS = {
    "prompt_id", "sample_index", "prompt_token_ids", "response_token_ids", "response_logprobs",
    "finish_reason", "policy_round",
}
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


HUB_PREFIX = "hub:"  # prompts.path "hub:org/name": a hub dataset, even where a local path of that name could exist


def looks_local(path: str) -> bool:
    """A path the user means as a local file or directory: one that exists, is absolute or starts with
    . or ~, names a data file (.jsonl, ...), has more than two parts, or whose first part is a local
    directory. Anything else ("org/name", "gsm8k") may be a hub dataset."""
    p = Path(path).expanduser()
    return (p.exists() or p.is_absolute() or path.startswith((".", "~")) or p.suffix in _LOCAL_BUILDERS
            or len(p.parts) > 2 or (len(p.parts) == 2 and Path(p.parts[0]).is_dir()))


def load_prompt_dataset(cfg: PromptsConfig):  # -> datasets.Dataset
    """A local file/directory or a hub dataset name, as a `datasets.Dataset` of the configured split.

    A path that looks local (see `looks_local`) and does not exist fails at once, naming it; the hub is
    asked only for names that cannot be local paths, or with the prefix "hub:"."""
    raw = cfg.path
    hub = raw.startswith(HUB_PREFIX)
    name = raw[len(HUB_PREFIX):] if hub else raw
    path = Path(name).expanduser()
    if not hub and looks_local(name) and not path.exists():
        near = sorted(p.name for p in path.parent.glob(f"*{path.suffix}"))[:5] if path.parent.is_dir() else []
        raise UserError(f"prompts.path {raw}: no such file or directory ({path.resolve()})"
                        + (f"; files there: {near}" if near else "")
                        + "; point it at a .jsonl/.json/.parquet/.csv file, a dataset directory, "
                        f"or a hub dataset as {HUB_PREFIX}org/name")
    if not hub and path.is_file() and path.suffix not in _LOCAL_BUILDERS:
        raise UserError(f"prompts.path {path}: unsupported file type {path.suffix!r} "
                        f"(use one of {sorted(_LOCAL_BUILDERS)})")
    if not hub and path.is_file() and not path.read_bytes()[:65536].strip():
        raise UserError(_empty_message(raw, cfg.split))
    import datasets

    datasets.disable_progress_bars()  # prompt files load in seconds; keep stderr for messages
    try:
        if hub:
            ds = datasets.load_dataset(name, split=cfg.split)
        elif path.is_file():
            ds = datasets.load_dataset(_LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
        elif path.is_dir() and (path / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=cfg.split)
        else:
            ds = datasets.load_dataset(name, split=cfg.split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (offline hub, bad split, parse errors)
        where = "hub dataset" if not path.exists() else "dataset"
        detail = f"{type(e).__name__}: {e}".strip().rstrip(":")
        if isinstance(e, (StopIteration, ValueError)) and "corresponds to no data" in str(e):
            raise UserError(_empty_message(raw, cfg.split)) from None
        raise UserError(f"prompts.path {raw!r} ({where}, split {cfg.split!r}) could not be loaded: "
                        f"{detail}") from None
    if len(ds) == 0:
        raise UserError(_empty_message(raw, cfg.split))
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    return ds


def _empty_message(path: str, split: str) -> str:
    where = "" if Path(path).is_file() else f" in split {split!r}"
    return (f"prompts.path {path}: the dataset is empty (no rows{where}); "
            f"point prompts.path at a file with one prompt per row (JSON lines: {{\"prompt\": \"...\"}})")


def _template_fields(template: str) -> set[str]:
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in Formatter().parse(template) if name}


def check_prompt_columns(cfg: PromptsConfig, columns: list[str]) -> None:
    needed = _template_fields(cfg.template) | ({cfg.id_field} if cfg.id_field else set())
    if cfg.template == "{prompt}" and cfg.prompt_field != "prompt":
        needed = (needed - {"prompt"}) | {cfg.prompt_field}
    missing = sorted(needed - set(columns))
    if missing:
        raise UserError(
            f"prompts.path {cfg.path}: column(s) {missing} not found (columns: {columns}); "
            f"set prompts.prompt_field / prompts.template / prompts.id_field to existing columns, e.g. --set prompts.prompt_field=question"
        )
    clash = sorted(RESERVED_COLUMNS & set(columns))
    if clash:
        raise UserError(f"prompts.path {cfg.path}: column(s) {clash} clash with eopd-pipe's rollout columns; rename them")


def render_prompt(cfg: PromptsConfig, row: dict[str, Any], tokenizer) -> list[int]:
    if cfg.template == "{prompt}":
        text = str(row[cfg.prompt_field])
    else:
        text = cfg.template.format(**row)
    if cfg.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: same fingerprint <=> same token ids for any text."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:16]


def prompt_cache_key(cfg: PromptsConfig, tokenizer) -> str:
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + tokenizer_fingerprint(tokenizer)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenized_prompts(prompts_dir: Path, cfg: PromptsConfig, tokenizer) -> tuple[pa.Table, bool]:
    """(table, from_cache). Columns prompt_id, prompt_token_ids, + the dataset's own columns.

    Reads the cache in `prompts_dir` when its key (prompt config + tokenizer) matches; otherwise
    loads, checks and tokenises the dataset WITHOUT writing: the caller saves it with
    `save_prompt_cache` once every input of the call has been checked.
    """
    key = prompt_cache_key(cfg, tokenizer)
    cache = prompts_dir / "prompts.parquet"
    if storage.is_file(cache):
        table = read_parquet(cache)
        if schema_metadata(table.schema).get("cache_key") == key:
            return table, True

    ds = load_prompt_dataset(cfg)
    check_prompt_columns(cfg, ds.column_names)
    rows = ds.to_list()
    ids = [str(r[cfg.id_field]) if cfg.id_field else f"row-{i:08d}" for i, r in enumerate(rows)]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        raise UserError(f"prompts.path {cfg.path}: id column {cfg.id_field!r} has duplicates (e.g. {dup!r}); ids must be unique, or set prompts.id_field: null to use row numbers")
    token_ids = [render_prompt(cfg, r, tokenizer) for r in rows]
    empty = [ids[i] for i, t in enumerate(token_ids) if not t]
    if empty:
        raise UserError(f"prompts.path {cfg.path}: prompt {empty[0]!r} tokenises to nothing; check prompts.template")
    table = pa.table({
        "prompt_id": pa.array(ids, pa.string()),
        "prompt_token_ids": pa.array(token_ids, pa.list_(pa.int32())),
        **{c: ds.data.column(c) for c in ds.column_names},
    })
    return table.replace_schema_metadata({b"eopd.cache_key": key.encode()}), False


def save_prompt_cache(prompts_dir: Location, table: pa.Table) -> None:
    key = table.schema.metadata[b"eopd.cache_key"].decode()
    remove_stale_tmp(prompts_dir / "prompts.parquet")
    write_shard(prompts_dir / "prompts.parquet", table, {"cache_key": key, "stage": "prompts"})


def round_prompt_indices(num_prompts: int, per_round: int | None, seed: int, round_index: int) -> np.ndarray:
    """Which prompts round r uses: all of them, or the r-th window of `per_round` prompts in a
    sequence of seeded permutations (one per epoch), so every prompt is seen once per epoch."""
    if per_round is None or per_round >= num_prompts:
        return np.arange(num_prompts)
    start = round_index * per_round
    out: list[np.ndarray] = []
    epoch = start // num_prompts
    offset = start % num_prompts
    while sum(len(x) for x in out) < per_round:
        perm = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        out.append(perm[offset:])
        epoch, offset = epoch + 1, 0
    return np.concatenate(out)[:per_round]
