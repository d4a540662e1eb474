"""Parquet shards and their manifest: the data contract between stages.

A shard's final name is always a complete file or object (`pipeline.storage.write_file`: a
renamed temporary file locally, one PUT on a bucket). The stage's `manifest.json` records each
finished shard's rows, bytes and sha256, updated through `pipeline.storage.update` (an fcntl lock
locally, compare-and-swap on its ETag on a bucket), so concurrent workers never lose a record;
readers verify the checksum and name the file when it does not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UserError
from pipeline.storage import Location

SCHEMA_VERSION = "1"
META_PREFIX = "eopd."
ZSTD_LEVEL = 3  # pyarrow's default level: most of the ratio of higher levels at a fraction of the CPU


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def shard_index(name: str) -> int:
    """The index in a shard's (or its lock's) name: part-00012.parquet[.lock] -> 12."""
    return int(name[5:10])


def sha256_file(path: Location) -> str:
    return storage.sha256_of(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


remove_stale_tmp = storage.remove_stale_tmp


@dataclass(frozen=True)
class ShardInfo:
    rows: int
    bytes: int
    sha256: str
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "bytes": self.bytes, "sha256": self.sha256, "tokens": self.tokens}


def write_shard(final: Location, table: pa.Table, metadata: dict[str, str], tokens: int = 0,
                before_rename: Callable[[], None] | None = None) -> ShardInfo:
    """Write `table` (zstd Parquet) to `final`, complete or not at all, with `metadata` in the footer.
    `before_rename` runs once the file is whole, just before it takes its final name (the kill tests)."""
    meta = dict(table.schema.metadata or {})
    meta.update({f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in metadata.items()})
    meta[f"{META_PREFIX}schema_version".encode()] = SCHEMA_VERSION.encode()
    table = table.replace_schema_metadata(meta)
    info: list[ShardInfo] = []

    def fill(tmp: Path) -> None:
        pq.write_table(table, tmp, compression="zstd", compression_level=ZSTD_LEVEL)
        info.append(ShardInfo(rows=table.num_rows, bytes=tmp.stat().st_size, sha256=storage.sha256_of(tmp), tokens=tokens))

    if storage.write_file(final, fill, before_rename, doing="write the shard", exclusive=True):
        return info[0]
    # A bucket already holds this shard: the worker that took over our lease wrote it. Its bytes
    # stand (its record, if made, names them); we record the same, never a second version.
    return info_of_shard(final, tokens)


def info_of_shard(final: Location, tokens: int = 0) -> ShardInfo:
    """The record of a shard file already in place (rows, bytes, sha256), read in one go."""
    body = storage.read_bytes(final)
    rows = pq.ParquetFile(pa.BufferReader(body)).metadata.num_rows
    return ShardInfo(rows=rows, bytes=len(body), sha256=hashlib.sha256(body).hexdigest(), tokens=tokens)


def file_metadata(path: Location) -> dict[str, str]:
    """The `eopd.*` footer keys of a shard, without the prefix."""
    if storage.is_remote(path):
        return schema_metadata(pq.read_schema(pa.BufferReader(storage.read_bytes(path))))
    return schema_metadata(pq.read_schema(path))


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """The `eopd.*` keys of a shard's schema (as read with the table), without the prefix."""
    raw = schema.metadata or {}
    return {k.decode()[len(META_PREFIX):]: v.decode() for k, v in raw.items() if k.startswith(META_PREFIX.encode())}


def read_parquet(path: Location | bytes, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (or its bytes, read from a bucket). ParquetFile, not pq.read_table: the latter
    goes through pyarrow.dataset, which costs ~0.3 s to import on first use and ~5x longer per small
    file (bench/end_to_end.py)."""
    if isinstance(path, bytes):
        source = pa.BufferReader(path)
    elif storage.is_remote(path):
        source = pa.BufferReader(storage.read_bytes(path))
    else:
        source = path
    with pq.ParquetFile(source) as f:
        return f.read(columns=columns)


def shard_files(stage_dir: Location) -> list[Location]:
    """The finished shard files present in a stage directory (temporary ones start with a dot)."""
    return [stage_dir / n for n in storage.names(stage_dir, "part-[0-9][0-9][0-9][0-9][0-9].parquet")]


def _run_dir_of(stage_dir: Location) -> Location:
    return stage_dir.parent.parent  # RUN_DIR/round-NNNN/STAGE


def missing_manifest_message(stage_dir: Location) -> str:
    n = len(shard_files(stage_dir))
    if n == 0:
        return f"{stage_dir} has no manifest.json: this stage has not run yet"
    return (f"{stage_dir} holds {n} shard file(s) but no manifest.json (deleted or lost), so none of them "
            f"counts as done; run `eopd-pipe status {_run_dir_of(stage_dir)} --repair` to check each shard and "
            f"rebuild the manifest, or delete {stage_dir} to redo the stage")


def corrupt_manifest_message(path: Location, problem: str) -> str:
    stage_dir = path.parent
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

    Several workers update it, each update a `storage.update` (fcntl lock locally, compare-and-swap
    on a bucket): no record is lost, and a shard recorded once keeps its first record (two workers
    that both finished it wrote identical bytes).
    """

    def __init__(self, stage_dir: Location) -> None:
        self.stage_dir = stage_dir
        self.path = stage_dir / "manifest.json"

    def exists(self) -> bool:
        return storage.is_file(self.path)

    def read(self) -> dict[str, Any]:
        data = self.read_if_any()
        if data is None:
            raise UserError(missing_manifest_message(self.stage_dir))
        return data

    def read_if_any(self) -> dict[str, Any] | None:
        """The manifest, or None where there is none: one read, no look-up first (on a bucket a HEAD less)."""
        try:
            body = storage.read_bytes(self.path)
        except FileNotFoundError:
            return None
        return self._remember(self._parse(body), body)

    def _remember(self, data: dict[str, Any], body: bytes) -> dict[str, Any]:
        """A complete manifest is final (only a checksum error, `forget`, reopens it): this process
        reads it from memory from now on (on a bucket; storage.remember_final)."""
        if data.get("complete"):
            storage.remember_final(self.path, body)
        return data

    def _parse(self, text: str | bytes) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(corrupt_manifest_message(self.path, f"not valid JSON: {e}")) from None
        problem = manifest_problem(data)
        if problem:
            raise UserError(corrupt_manifest_message(self.path, problem))
        return data

    @staticmethod
    def _dump(data: dict[str, Any]) -> bytes:
        return json.dumps(data, indent=1, sort_keys=True).encode()

    def _update(self, change: Callable[[dict[str, Any]], bool]) -> None:
        """Apply `change(data)` (True: it changed something) to the manifest as it is now."""
        def apply(old: bytes | None) -> bytes | None:
            if old is None:
                raise UserError(missing_manifest_message(self.stage_dir))
            data = self._parse(old)
            return self._dump(data) if change(data) else None
        body = storage.update(self.path, apply)
        if body is not None and storage.is_remote(self.path):
            self._remember(self._parse(body), body)

    def init(self, num_shards: int, plan: dict[str, Any]) -> dict[str, Any]:
        """Create the manifest, or check that an existing one was made for the same plan; returns it."""
        def apply(old: bytes | None) -> bytes | None:
            if old is None:
                if shard_files(self.stage_dir):
                    raise UserError(missing_manifest_message(self.stage_dir))  # a fresh manifest would hide them
                return self._dump({"num_shards": num_shards, "plan": plan, "shards": {}, "complete": num_shards == 0})
            return self._check_plan(self._parse(old), num_shards, plan)
        body = storage.update(self.path, apply)
        return self._remember(self._parse(body), body)

    def _check_plan(self, data: dict[str, Any], num_shards: int, plan: dict[str, Any]) -> bytes | None:
        if data["num_shards"] != num_shards or data["plan"] != plan:
            raise UserError(
                f"{self.path} was planned as {data['num_shards']} shards for {data['plan']}, "
                f"this call plans {num_shards} shards for {plan}; delete {self.stage_dir} to redo the stage"
            )
        return None

    def replace(self, data: dict[str, Any]) -> None:
        """Write a whole manifest (`status --repair`, which rebuilt it from checked shards)."""
        assert manifest_problem(data) is None
        storage.update(self.path, lambda old: self._dump(data))

    def record(self, i: int, info: ShardInfo) -> None:
        def change(data: dict[str, Any]) -> bool:
            if shard_name(i) in data["shards"]:
                return False  # recorded by another worker that finished it too: one record
            data["shards"][shard_name(i)] = info.to_json()
            data["complete"] = len(data["shards"]) == data["num_shards"]
            return True
        self._update(change)

    def forget(self, i: int) -> None:
        """Drop a shard whose file was deleted (e.g. after a checksum error), so it is redone."""
        def change(data: dict[str, Any]) -> bool:
            if data["shards"].pop(shard_name(i), None) is None:
                return False
            data["complete"] = False
            return True
        self._update(change)

    def done(self) -> set[int]:
        try:
            return {shard_index(name) for name in self.read()["shards"]}
        except UserError:
            if not self.exists():
                return set()
            raise

    def is_complete(self) -> bool:
        return bool((self.read_if_any() or {}).get("complete"))


class GrowingManifest(Manifest):
    """A manifest whose plan key `growing` maps upstream shard names to their sha256 and fills in
    shard by shard while the stage follows its upstream (`pipeline.work.Follow`). Any other key, and an upstream
    shard named by both the old and the new plan, must agree as in `Manifest.init`."""

    def __init__(self, stage_dir: Location, growing: str) -> None:
        super().__init__(stage_dir)
        self.growing = growing

    def _check_plan(self, data: dict[str, Any], num_shards: int, plan: dict[str, Any]) -> bytes | None:
        old, new = data["plan"], plan[self.growing]
        seen = old.get(self.growing) if isinstance(old.get(self.growing), dict) else {}
        same_rest = {**old, self.growing: None} == {**plan, self.growing: None}
        if data["num_shards"] != num_shards or not same_rest or any(new.get(n, d) != d for n, d in seen.items()):
            return super()._check_plan(data, num_shards, plan)  # refuses, naming both plans
        return self._dump(data) if self._extend(data, new) else None

    def extend(self, entries: dict[str, str]) -> None:
        """Add upstream shards to the plan (before the shards that read them are computed)."""
        self._update(lambda data: self._extend(data, entries))

    def _extend(self, data: dict[str, Any], entries: dict[str, str]) -> bool:
        merged = {**data["plan"][self.growing], **entries}
        if merged == data["plan"][self.growing]:
            return False
        data["plan"] = {**data["plan"], self.growing: merged}
        return True


def require_complete(stage_dir: Location, what: str, fix: str) -> dict[str, Any]:
    """The manifest of a finished stage, or a UserError saying what is missing and how to finish it."""
    data = Manifest(stage_dir).read_if_any()
    if data is None:
        if shard_files(stage_dir):
            raise UserError(missing_manifest_message(stage_dir))
        raise UserError(f"no {what} at {stage_dir}; {fix}")
    if not data.get("complete"):
        missing = data["num_shards"] - len(data["shards"])
        raise UserError(f"{what} at {stage_dir} are incomplete: {missing} of {data['num_shards']} shards missing; {fix}")
    return data


def check_shard(path: Location, record: dict[str, Any], data: bytes | None = None) -> None:
    """The shard file must exist and match its manifest record's sha256 (UserError naming the file).
    `data`: the shard's bytes where they were read already (from a bucket)."""
    if data is None and not storage.is_file(path):
        raise UserError(f"shard {path} is listed in the manifest but missing; run the stage that wrote it again to redo it")
    digest = sha256_file(path) if data is None else sha256_bytes(data)
    if digest != record["sha256"]:
        raise UserError(
            f"shard {path} is corrupted: sha256 {digest[:12]}… does not match the manifest's {record['sha256'][:12]}…; "
            f"delete it and run the stage that wrote it again: only the missing shard is redone"
        )


def verify_stage(stage_dir: Location, data: dict[str, Any], owns: Callable[[int], bool] | None = None) -> None:
    """Check the sha256 of every shard this worker will read (`owns(i)`; None: all) up front, so a
    corrupted input stops a stage before it writes anything. Only its own: a worker of W that checked
    all S shards would make a stage read S x W shards (S^2 under Ray, whose actors enter the stage
    once per shard). Not on a bucket: there each check is a download of the shard (the largest
    request term at scale, bench/s3_run.py). `read_shard` checks each shard it reads before the stage
    writes the output made from it, so nothing is ever written from a corrupted input either."""
    if storage.is_remote(stage_dir):
        return
    for name, record in sorted(data["shards"].items()):
        if owns is None or owns(shard_index(name)):
            check_shard(stage_dir / name, record)


def read_shard(stage_dir: Location, name: str, record: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    """Read one shard after checking its sha256 against the manifest record (from a bucket: one GET,
    the bytes checked and parsed in memory)."""
    path = stage_dir / name
    if storage.is_remote(path):
        try:
            body = storage.read_bytes(path)
        except FileNotFoundError:
            body = None
        if body is None:
            check_shard(path, record)  # raises: missing
        check_shard(path, record, body)
        storage.remember_final(path, body)  # checked: a later read (the round's health) is from memory
        source: Any = body
    else:
        check_shard(path, record)
        source = path
    try:
        return read_parquet(source, columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"shard {path} cannot be read as Parquet: {e}") from None


def iter_stage(stage_dir: Location, what: str, fix: str, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(name, table) of every shard of a complete stage, in shard order, checksums verified."""
    data = require_complete(stage_dir, what, fix)
    for name in sorted(data["shards"]):
        yield name, read_shard(stage_dir, name, data["shards"][name], columns)
