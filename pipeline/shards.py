"""Parquet shards and their manifest: the data contract between stages.

A shard is written under a hidden temporary name, fsynced and renamed, so a file with a final
name is always complete. The stage's `manifest.json` records each finished shard's rows, bytes
and sha256; readers verify the checksum and name the file when it does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from pipeline.errors import UserError
from pipeline.rundir import atomic_write_text

SCHEMA_VERSION = "1"
META_PREFIX = "eopd."
ZSTD_LEVEL = 3  # pyarrow's default level: most of the ratio of higher levels at a fraction of the CPU


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(final: Path) -> Path:
    # Leading dot: globs like "*.parquet" (datasets, pandas) never pick up a half-written shard.
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def remove_stale_tmp(final: Path) -> None:
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        p.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardInfo:
    rows: int
    bytes: int
    sha256: str
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "bytes": self.bytes, "sha256": self.sha256, "tokens": self.tokens}


def write_shard(final: Path, table: pa.Table, metadata: dict[str, str], tokens: int = 0,
                before_rename: Callable[[], None] | None = None) -> ShardInfo:
    """Write `table` (zstd Parquet) atomically to `final`, with `metadata` in the file footer."""
    meta = dict(table.schema.metadata or {})
    meta.update({f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in metadata.items()})
    meta[f"{META_PREFIX}schema_version".encode()] = SCHEMA_VERSION.encode()
    table = table.replace_schema_metadata(meta)
    tmp = tmp_path_for(final)
    try:
        pq.write_table(table, tmp, compression="zstd", compression_level=ZSTD_LEVEL)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        info = ShardInfo(rows=table.num_rows, bytes=tmp.stat().st_size, sha256=sha256_file(tmp), tokens=tokens)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def file_metadata(path: Path) -> dict[str, str]:
    """The `eopd.*` footer keys of a shard, without the prefix."""
    return schema_metadata(pq.read_schema(path))


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """The `eopd.*` keys of a shard's schema (as read with the table), without the prefix."""
    raw = schema.metadata or {}
    return {k.decode()[len(META_PREFIX):]: v.decode() for k, v in raw.items() if k.startswith(META_PREFIX.encode())}


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file. ParquetFile, not pq.read_table: the latter goes through pyarrow.dataset,
    which costs ~0.3 s to import on first use and ~5x longer per small file (bench/end_to_end.py)."""
    with pq.ParquetFile(path) as f:
        return f.read(columns=columns)


def shard_files(stage_dir: Path) -> list[Path]:
    """The finished shard files present in a stage directory (temporary ones start with a dot)."""
    return sorted(Path(stage_dir).glob("part-[0-9][0-9][0-9][0-9][0-9].parquet"))


def _run_dir_of(stage_dir: Path) -> Path:
    return Path(stage_dir).resolve().parent.parent  # RUN_DIR/round-NNNN/STAGE


def missing_manifest_message(stage_dir: Path) -> str:
    n = len(shard_files(stage_dir))
    if n == 0:
        return f"{stage_dir} has no manifest.json: this stage has not run yet"
    return (f"{stage_dir} holds {n} shard file(s) but no manifest.json (deleted or lost), so none of them "
            f"counts as done; run `eopd-pipe status {_run_dir_of(stage_dir)} --repair` to check each shard and "
            f"rebuild the manifest, or delete {stage_dir} to redo the stage")


def corrupt_manifest_message(path: Path, problem: str) -> str:
    stage_dir = Path(path).parent
    return (f"{path} is corrupted ({problem}); run `eopd-pipe status {_run_dir_of(stage_dir)} --repair` to "
            f"check each shard and rebuild it (the shards are kept), or delete {stage_dir} to redo the stage")


def manifest_problem(data: Any) -> str | None:
    """What is wrong with a parsed manifest's structure, or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    missing = [k for k in ("num_shards", "plan", "shards", "complete") if k not in data]
    if missing:
        return f"keys {missing} missing"
    if not isinstance(data["num_shards"], int) or not isinstance(data["shards"], dict):
        return "num_shards or shards of the wrong type"
    for name, rec in data["shards"].items():
        if not (isinstance(rec, dict) and {"rows", "bytes", "sha256"} <= set(rec) and len(name) == 18
                and name.startswith("part-") and name[5:10].isdigit()):
            return f"bad shard record {name!r}"
    return None


class Manifest:
    """`STAGE_DIR/manifest.json`: the plan (number of shards) and each finished shard's record.

    Several workers update it; every read-modify-write holds an OS file lock, which the OS
    releases if the holder dies (kill -9 included).
    """

    def __init__(self, stage_dir: Path) -> None:
        self.stage_dir = Path(stage_dir)
        self.path = self.stage_dir / "manifest.json"
        self._lock = FileLock(str(self.stage_dir / ".locks" / "manifest.lock"))

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            raise UserError(missing_manifest_message(self.stage_dir)) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(corrupt_manifest_message(self.path, f"not valid JSON: {e}")) from None
        problem = manifest_problem(data)
        if problem:
            raise UserError(corrupt_manifest_message(self.path, problem))
        return data

    def _write(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))

    def init(self, num_shards: int, plan: dict[str, Any]) -> None:
        """Create the manifest, or check that an existing one was made for the same plan."""
        (self.stage_dir / ".locks").mkdir(parents=True, exist_ok=True)
        with self._lock:
            if not self.exists() and shard_files(self.stage_dir):
                raise UserError(missing_manifest_message(self.stage_dir))  # a fresh manifest would hide them
            if self.exists():
                data = self.read()
                if data["num_shards"] != num_shards or data["plan"] != plan:
                    raise UserError(
                        f"{self.path} was planned as {data['num_shards']} shards for {data['plan']}, "
                        f"this call plans {num_shards} shards for {plan}; delete {self.stage_dir} to redo the stage"
                    )
                return
            self._write({"num_shards": num_shards, "plan": plan, "shards": {}, "complete": num_shards == 0})

    def record(self, i: int, info: ShardInfo) -> None:
        with self._lock:
            data = self.read()
            data["shards"][shard_name(i)] = info.to_json()
            data["complete"] = len(data["shards"]) == data["num_shards"]
            self._write(data)

    def forget(self, i: int) -> None:
        """Drop a shard whose file was deleted (e.g. after a checksum error), so it is redone."""
        with self._lock:
            data = self.read()
            if data["shards"].pop(shard_name(i), None) is not None:
                data["complete"] = False
                self._write(data)

    def done(self) -> set[int]:
        if not self.exists():
            return set()
        return {int(name[5:10]) for name in self.read()["shards"]}

    def is_complete(self) -> bool:
        return self.exists() and bool(self.read().get("complete"))


class GrowingManifest(Manifest):
    """A manifest whose plan key `growing` maps upstream shard names to their sha256 and fills in
    shard by shard while the stage follows its upstream (`pipeline.work.Follow`). Any other key, and an upstream
    shard named by both the old and the new plan, must agree as in `Manifest.init`."""

    def __init__(self, stage_dir: Path, growing: str) -> None:
        super().__init__(stage_dir)
        self.growing = growing

    def init(self, num_shards: int, plan: dict[str, Any]) -> None:
        (self.stage_dir / ".locks").mkdir(parents=True, exist_ok=True)
        with self._lock:
            if not self.exists():
                return super().init(num_shards, plan)
            data = self.read()
            old, new = data["plan"], plan[self.growing]
            seen = old.get(self.growing) if isinstance(old.get(self.growing), dict) else {}
            same_rest = {**old, self.growing: None} == {**plan, self.growing: None}
            if data["num_shards"] != num_shards or not same_rest or any(new.get(n, d) != d for n, d in seen.items()):
                return super().init(num_shards, plan)  # refuses, naming both plans
            self._extend(data, new)

    def extend(self, entries: dict[str, str]) -> None:
        """Add upstream shards to the plan (before the shards that read them are computed)."""
        with self._lock:
            self._extend(self.read(), entries)

    def _extend(self, data: dict[str, Any], entries: dict[str, str]) -> None:
        merged = {**data["plan"][self.growing], **entries}
        if merged != data["plan"][self.growing]:
            data["plan"] = {**data["plan"], self.growing: merged}
            self._write(data)


def require_complete(stage_dir: Path, what: str, fix: str) -> dict[str, Any]:
    """The manifest of a finished stage, or a UserError saying what is missing and how to finish it."""
    manifest = Manifest(stage_dir)
    if not manifest.exists():
        if shard_files(stage_dir):
            raise UserError(missing_manifest_message(stage_dir))
        raise UserError(f"no {what} at {stage_dir}; {fix}")
    data = manifest.read()
    if not data.get("complete"):
        missing = data["num_shards"] - len(data["shards"])
        raise UserError(f"{what} at {stage_dir} are incomplete: {missing} of {data['num_shards']} shards missing; {fix}")
    return data


def check_shard(path: Path, record: dict[str, Any]) -> None:
    """The shard file must exist and match its manifest record's sha256 (UserError naming the file)."""
    if not path.is_file():
        raise UserError(f"shard {path} is listed in the manifest but missing; run the stage that wrote it again to redo it")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise UserError(
            f"shard {path} is corrupted: sha256 {digest[:12]}… does not match the manifest's {record['sha256'][:12]}…; "
            f"delete it and run the stage that wrote it again: only the missing shard is redone"
        )


def verify_stage(stage_dir: Path, data: dict[str, Any]) -> None:
    """Check every shard's sha256 up front, so a corrupted input stops a stage before it writes anything."""
    for name, record in sorted(data["shards"].items()):
        check_shard(Path(stage_dir) / name, record)


def read_shard(stage_dir: Path, name: str, record: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    """Read one shard after checking its sha256 against the manifest record."""
    path = Path(stage_dir) / name
    check_shard(path, record)
    try:
        return read_parquet(path, columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"shard {path} cannot be read as Parquet: {e}") from None


def iter_stage(stage_dir: Path, what: str, fix: str, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(name, table) of every shard of a complete stage, in shard order, checksums verified."""
    data = require_complete(stage_dir, what, fix)
    for name in sorted(data["shards"]):
        yield name, read_shard(stage_dir, name, data["shards"][name], columns)
