"""The run directory's one storage layer: every read, write, listing, claim and completion record.

A location is a `pathlib.Path` (a local or shared POSIX directory) or a `upath.UPath` over fsspec:
`s3://bucket/prefix` (S3-compatible stores through the standard `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` variables or AWS config files)
or `gs://bucket/prefix` (Google Cloud Storage through Google's default credentials:
`GOOGLE_APPLICATION_CREDENTIALS`, `gcloud auth application-default login`, or a GCE/GKE service
account; an emulator through the standard `STORAGE_EMULATOR_HOST`, without credentials).
The rest of the code composes locations with `/` and calls the functions below, never `open`,
`os.replace` or a lock of its own, so one code path serves both.

What each operation guarantees, on both kinds:
- `write_bytes` / `write_file`: a final name is always a complete object. Locally: a hidden
  temporary file, fsync, rename. On a bucket: one PUT (S3 has no rename, and a PUT is atomic).
- `create`: exclusive create; exactly one of several racing callers gets True. Locally: link(2) of a
  complete temporary file; on S3: `If-None-Match: *` (the object must be non-empty: s3fs drops the
  header for an empty body); on GCS: `ifGenerationMatch=0`.
- `update`: read-modify-write that cannot lose an update. Locally: under an fcntl lock (released by
  the OS when its holder dies, kill -9 included); on a bucket: compare-and-swap on the object's
  version (S3: `If-Match` on the ETag; GCS: `ifGenerationMatch` on the generation), retried.
- `claim`: at most one live holder. Locally: an fcntl lock. On a bucket (no locks: bucket mounts
  such as mountpoint-s3 or goofys lock only node-locally, if at all) a lease object made by `create`,
  renewed by a thread while held, and taken over by compare-and-swap once older than its expiry.
- `upload_tree` / `local_tree`: model and checkpoint directories. Saved locally, then moved (local)
  or uploaded with their completion file last (bucket); read from a verified local cache.

Every failure of the store (a full disk, a refused connection, a missing bucket, bad credentials)
becomes one `UserError` naming the path or URL and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from pipeline.errors import UserError
from pipeline.identity import holder_gone, pid_alive, worker_identity

Location = Union[Path, "UPath"]  # noqa: F821 (upath is imported only for bucket URLs)

REMOTE_SCHEMES = ("s3", "gs")
LEASE_ENV = "EOPD_LEASE_SECONDS"  # how long a bucket lease lives without renewal (default 60 s)
CACHE_ENV = "EOPD_CACHE_DIR"  # local cache of models and checkpoints read from a bucket
_LEASE_DEFAULT = 60.0


# ----------------------------------------------------------------------------- locations


def location(text: str | os.PathLike) -> Location:
    """A local path or a supported bucket URL; any other URL scheme is refused, never taken for a
    local path (`Path("s3://b/x")` would silently be the local folder `s3:/b/x`)."""
    if is_remote(text):
        return text  # type: ignore[return-value]
    if isinstance(text, Path):
        return text.expanduser().resolve()
    s = os.fspath(text)
    if "://" not in s:
        return Path(s).expanduser().resolve()
    scheme = s.split("://", 1)[0].lower()
    if scheme == "file":
        return Path(s[len("file://"):]).resolve()
    if scheme == "gcs":  # fsspec's other name for gs://: one spelling, so `protocol` and messages agree
        scheme, s = "gs", "gs://" + s.split("://", 1)[1]
    if scheme not in REMOTE_SCHEMES:
        raise UserError(f"{s}: URL scheme {scheme}:// is not supported; a run directory or model path is a local path, "
                        f"s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    bucket = s.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise UserError(f"{s}: no bucket in the URL; write {scheme}://BUCKET/PREFIX")
    if scheme == "gs":
        return _gcs_location(s)
    try:
        from upath import UPath
        import s3fs  # noqa: F401
    except ImportError:
        raise UserError(f"{s}: bucket URLs need s3fs and universal_pathlib (pip install 's3fs>=2026.9' universal_pathlib, "
                        f"or reinstall eopd-pipe: they are dependencies)") from None
    # No listing cache: several workers change the bucket, and every "done?" must see the store as it is now.
    # The endpoint is passed as well as read by botocore from AWS_ENDPOINT_URL: fsspec reuses a client
    # made with the same arguments, so one process that moves to another endpoint must not get the old one.
    endpoint = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]} if os.environ.get("AWS_ENDPOINT_URL") else {}
    return UPath(s.rstrip("/"), use_listings_cache=False, skip_instance_cache=False, **endpoint,
                 config_kwargs={"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}})


def _gcs_location(s: str) -> Location:
    try:
        import aiohttp
        import gcsfs  # noqa: F401
        from upath import UPath
    except ImportError:
        raise UserError(f"{s}: gs:// URLs need gcsfs and universal_pathlib (pip install 'gcsfs>=2026.10' universal_pathlib, "
                        f"or reinstall eopd-pipe: they are dependencies)") from None
    # An emulator (STORAGE_EMULATOR_HOST, read by gcsfs on every request) gets no credentials, as
    # google-cloud-storage does. Otherwise Google's default chain and nothing else: gcsfs's own default
    # would fall back to anonymous access, so missing credentials would surface only as a 401 on the
    # first write; "google_default" fails at once, naming the fix (a 15 s metadata-server probe less too).
    token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else "google_default"
    # gcsfs sets no timeout of its own: a silent endpoint would hang a worker for ever.
    return UPath(s.rstrip("/"), use_listings_cache=False, skip_instance_cache=False, token=token,
                 requests_timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60))


def is_remote(p: Any) -> bool:
    return not isinstance(p, (str, Path)) and getattr(p, "protocol", "") in REMOTE_SCHEMES


def looks_like_url(text: str) -> bool:
    return "://" in text


STATS_ENV = "EOPD_STORAGE_STATS"  # a file: each process appends its count of store calls at exit (bench/)
_CALLS: dict[str, int] = {}


class _CountingFS:
    """The filesystem with each call to the store counted by method (one call is one request, or a
    few for a paginated listing or a multipart upload): what bench/s3_run.py reports per round."""

    def __init__(self, fs) -> None:
        self._fs = fs

    def __getattr__(self, name: str):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            _CALLS[name] = _CALLS.get(name, 0) + 1
            return attr(*args, **kwargs)
        return counted


def _write_stats() -> None:
    with open(os.environ[STATS_ENV], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "calls": _CALLS}) + "\n")


def _fs(p: Location):
    try:
        fs = _store(p).filesystem(p)  # gcsfs looks up the credentials here
    except Exception as e:
        raise store_error(p, "connect to", e) from None
    if os.environ.get(STATS_ENV):
        if not _CALLS:
            import atexit

            _CALLS["_"] = 0
            atexit.register(_write_stats)
        return _CountingFS(fs), p.path
    return fs, p.path


def _client_code(e: BaseException) -> str | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = resp.get("Error", {}).get("Code")
            if code:
                return str(code)
        e = e.__cause__ or e.__context__
    return None


def _precondition_failed(e: BaseException) -> bool:
    if isinstance(e, FileExistsError):  # s3fs and gcsfs (HTTP 412) alike
        return True
    code = _client_code(e)
    if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
        return True
    return "pre-conditions you specified did not hold" in str(e)


# ----------------------------------------------------------------------------- the object stores
# What differs between S3 and GCS, and nothing else: the requests that fsspec has no call for (one
# HEAD, one GET with the version, a conditional PUT, a one-key listing), the version token (S3: the
# ETag; GCS: the generation), and the error codes with their fixes. Everything above them (the
# compare-and-swap loop, leases, listings, uploads) is one code path.


class _S3:
    fixes = {
        "NoSuchBucket": "create the bucket or fix its name in the URL",
        "InvalidAccessKeyId": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an AWS profile) to valid credentials",
        "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY does not match the access key; fix the credentials",
        "AccessDenied": "the credentials may not access this bucket; fix the credentials or the bucket policy",
        "Forbidden": "the credentials may not access this bucket; fix the credentials or the bucket policy",
        "403": "the credentials were refused; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an AWS profile) to valid ones",
        "NoCredentials": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)",
    }

    def unreachable(self) -> str:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        return (f"the object store{f' at {endpoint}' if endpoint else ''} does not answer; check AWS_ENDPOINT_URL and that "
                f"the server is up")

    def make_bucket(self, bucket: str) -> str:
        return f"`aws s3 mb s3://{bucket}`"

    def code(self, e: BaseException) -> str | None:
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return "NoCredentials"
        return _client_code(e)

    def filesystem(self, p: Location):
        return p.fs

    def head(self, fs, bucket: str, key: str) -> dict[str, Any]:
        return fs.call_s3("head_object", Bucket=bucket, Key=key)

    def size(self, head: dict[str, Any]) -> int:
        return int(head["ContentLength"])

    def token(self, head: dict[str, Any]) -> str:
        return head["ETag"]

    def get(self, fs, bucket: str, key: str) -> tuple[str, bytes]:
        from fsspec.asyn import sync

        resp = fs.call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return resp["ETag"], sync(fs.loop, resp["Body"].read)
        finally:
            resp["Body"].close()

    def put_if(self, fs, path: str, bucket: str, key: str, data: bytes, token: str | None) -> str | None:
        out = fs.pipe_file(path, data, **({"mode": "create"} if token is None else {"IfMatch": token}))
        return out["ETag"] if isinstance(out, dict) and "ETag" in out else None

    def any_under(self, fs, bucket: str, prefix: str) -> bool:
        found = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return bool(found.get("KeyCount") or found.get("Contents"))

    def reach(self, root: Location, bucket: str, prefix: str) -> None:
        fs, _ = _fs(root)
        # a listing, not HeadBucket: its error says which (NoSuchBucket, InvalidAccessKeyId, ...)
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)

    def listed(self, info: dict[str, Any]) -> tuple[str, str | None]:
        """(version, MD5 in hex or None) of an entry of fs.find(detail=True): a single-part upload's ETag is its MD5."""
        etag = str(info.get("ETag", "")).strip('"')
        return etag, etag if len(etag) == 32 and "-" not in etag else None


_GCS_CREDENTIALS = ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file or run "
                    "`gcloud auth application-default login` (on GCE/GKE the VM's service account is used; an emulator "
                    "needs STORAGE_EMULATOR_HOST instead)")


class _GCS:
    fixes = {
        "credentials": _GCS_CREDENTIALS,
        "401": f"the credentials were refused; {_GCS_CREDENTIALS}",
        "403": "the credentials may not access this bucket; grant them object access on it (e.g. roles/storage.objectUser) "
               "or fix the credentials",
    }

    def unreachable(self) -> str:
        if emulator := os.environ.get("STORAGE_EMULATOR_HOST"):
            return f"the emulator at STORAGE_EMULATOR_HOST={emulator} does not answer; check that it is up and the address"
        return "Google Cloud Storage does not answer; check the network (STORAGE_EMULATOR_HOST is unset: Google's endpoint)"

    def make_bucket(self, bucket: str) -> str:
        return f"`gcloud storage buckets create gs://{bucket}`"

    def code(self, e: BaseException) -> str | None:
        seen = set()
        while e is not None and id(e) not in seen:  # by type name: gcsfs and google-auth are imported only for gs://
            seen.add(id(e))
            name = type(e).__name__
            if name in ("DefaultCredentialsError", "RefreshError", "NonRetryableError"):
                return "credentials"
            if name == "HttpError" and getattr(e, "code", None):
                return str(e.code)
            if isinstance(e, OSError) and str(e).startswith("Forbidden"):  # gcsfs's form of a 403
                return "403"
            e = e.__cause__ or e.__context__
        return None

    def filesystem(self, p: Location):
        """gcsfs's core GCSFileSystem (the JSON API only), not the class gcsfs >= 2026 registers for gs://:
        ExtendedGcsFileSystem first asks the Storage Control gRPC API for each bucket's layout (zonal or
        hierarchical), and again on every call while it has no answer: a 60 s timeout per call on an
        emulator, a gRPC call per request on GCS without that permission. The conditional writes here are
        JSON API requests, for standard buckets. (Made from the path's options, so a path that was pickled
        gets the same; fsspec keeps one instance per options and thread.)"""
        from gcsfs.core import GCSFileSystem

        if not os.environ.get("GCSFS_DEBUG"):  # gcsfs's own switch for its logging
            # gcsfs logs a traceback at ERROR when it gives up on a request; the caller reports the same
            # failure as one message with the fix (botocore, under s3fs, logs none).
            logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
        return GCSFileSystem(**p.storage_options)

    def head(self, fs, bucket: str, key: str) -> dict[str, Any]:
        return fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)

    def size(self, head: dict[str, Any]) -> int:
        return int(head["size"])

    def token(self, head: dict[str, Any]) -> str:
        return str(head["generation"])

    def get(self, fs, bucket: str, key: str) -> tuple[str, bytes]:
        headers, body = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        return headers["X-Goog-Generation"], body  # the generation of exactly these bytes

    def put_if(self, fs, path: str, bucket: str, key: str, data: bytes, token: str | None) -> str:
        # gcsfs's uploads send no precondition but ifGenerationMatch=0 (mode="create"), so this one request is
        # made here, through gcsfs's session (its credentials, retries, endpoint): a multipart upload, as
        # gcsfs's own small-file upload (fake-gcs-server before 1.55 checks preconditions on these only).
        from urllib.parse import quote

        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps({'name': key})}\r\n"
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n")
        body = head.encode() + data + f"\r\n--{boundary}--".encode()
        out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o", uploadType="multipart",
                      ifGenerationMatch=token or "0", data=body, json_out=True,
                      headers={"Content-Type": f'multipart/related; boundary="{boundary}"'})
        return str(out["generation"])

    def any_under(self, fs, bucket: str, prefix: str) -> bool:
        found = fs.call("GET", "b/{}/o", bucket, prefix=prefix, maxResults=1, json_out=True)
        return bool(found.get("items") or found.get("prefixes"))

    def reach(self, root: Location, bucket: str, prefix: str) -> None:
        # Not through fs.call: gcsfs retries a refused connection 6 times over ~30 s, and the first contact
        # should fail at once. Three quick tries still ride out a blip, or a 429/503 when many tasks start.
        import asyncio

        from fsspec.asyn import sync
        from gcsfs.retry import is_retriable

        fs = self.filesystem(root)  # not _fs's request counter: these are not calls of gcsfs's own
        for attempt in range(3):
            try:
                sync(fs.loop, _gcs_once, fs, "GET", "b/{}/o", bucket, prefix=prefix, maxResults=1)
                return
            except Exception as e:
                if attempt == 2 or not (is_retriable(e) or isinstance(e, asyncio.TimeoutError)):
                    raise
            time.sleep(0.5 * 2 ** attempt)

    def listed(self, info: dict[str, Any]) -> tuple[str, str | None]:
        import base64

        md5 = info.get("md5Hash")  # base64; composite objects have none
        return str(info.get("generation", "")), base64.b64decode(md5).hex() if md5 else None


async def _gcs_once(fs, method: str, path: str, *args: str, **params: Any) -> None:
    """One request through gcsfs's session and credentials, without its retries; raises as gcsfs does."""
    import aiohttp
    from gcsfs.retry import validate_response

    await fs._set_session()
    timeout = aiohttp.ClientTimeout(total=20, sock_connect=5)
    async with fs.session.request(method, fs._format_path(path, args), params=fs._get_params(params),
                                  headers=fs._get_headers(None), timeout=timeout) as r:
        validate_response(r.status, await r.read(), path, args)


_STORES = {"s3": _S3(), "gs": _GCS()}


def _store(p: Location) -> _S3 | _GCS:
    return _STORES[p.protocol]


# ----------------------------------------------------------------------------- errors


def store_error(p: Location, doing: str, e: BaseException) -> UserError:
    """One message for a failed operation on the store: what, where, and the fix."""
    if isinstance(e, UserError):
        return e
    where = str(p)
    if not is_remote(p):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return UserError(f"could not {doing} {where}: no space left on the device (or the quota is full); free space "
                             f"and run the same command again: what was complete is kept")
        return UserError(f"could not {doing} {where}: {e}; fix that (disk space, permissions) and run the same command "
                         f"again: what was complete is kept")
    store = _store(p)
    code = store.code(e)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if code in store.fixes:
        fix = store.fixes[code]
    elif any(s in f"{type(e).__name__} {text}" for s in ("EndpointConnectionError", "Could not connect", "Connect",
                                                         "Connection refused", "timed out", "Timeout")):
        fix = f"{store.unreachable()}, then run the same command again: what was recorded is kept"
    else:
        fix = "fix that and run the same command again: what was recorded is kept"
    return UserError(f"could not {doing} {where}: {text}; {fix}")


@contextlib.contextmanager
def errors(p: Location, doing: str) -> Iterator[None]:
    """Turn any store failure inside into one UserError about `p`."""
    try:
        yield
    except (UserError, FileNotFoundError, FileExistsError, KeyboardInterrupt):
        raise
    except Exception as e:  # botocore/aiohttp errors do not share a base class with OSError
        raise store_error(p, doing, e) from None


def check_reachable(root: Location) -> None:
    """Fail fast, naming the URL, when a bucket is missing or the credentials or endpoint are wrong."""
    if not is_remote(root):
        return
    store = _store(root)
    bucket, prefix = _bucket_key(root)
    missing = UserError(f"{root}: bucket {bucket!r} does not exist; create it (e.g. {store.make_bucket(bucket)}) or fix "
                        f"the URL")
    try:
        store.reach(root, bucket, prefix)
    except FileNotFoundError:
        raise missing from None
    except Exception as e:
        if store.code(e) == "NoSuchBucket":
            raise missing from None
        raise store_error(root, "reach", e) from None


# ----------------------------------------------------------------------------- what this process knows

# Objects that this process knows final (bucket only): their bytes, or None where it knows only that
# they exist. A request costs ~4 ms of CPU here (client and server, bench/RESULTS.md) and a billed
# call at scale; a persistent run would otherwise re-read each round's config, shards, complete
# manifests and metrics several times. Bounded: objects over _FINAL_OBJECT are kept as None.
_FINAL: OrderedDict[str, bytes | None] = OrderedDict()
_FINAL_LOCK = threading.Lock()
_FINAL_BYTES, _FINAL_OBJECT = 64 << 20, 16 << 20
_final_bytes = 0
# (version token, bytes) of each object this process last read or wrote by `update`: its next update
# tries a conditional PUT on that version before any GET (a stale one costs the failed PUT only).
# Bounded like _FINAL (a 1,000-shard manifest is ~250 kB, two a round): the least recent go first.
_VERSIONS: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
_versions_bytes = 0


def _set_version(p: Location, token: str, body: bytes) -> None:
    global _versions_bytes
    with _FINAL_LOCK:
        _drop_version(str(p))
        _VERSIONS[str(p)] = (token, body)
        _versions_bytes += len(body)
        while _versions_bytes > _FINAL_BYTES:
            _drop_version(next(iter(_VERSIONS)))


def _drop_version(key: str) -> None:
    global _versions_bytes
    old = _VERSIONS.pop(key, None)
    if old is not None:
        _versions_bytes -= len(old[1])


def remember_final(p: Location, data: bytes | None = None) -> None:
    """Declare object `p` final: it holds `data` (None: it exists, bytes not kept) and no one changes
    or deletes it while this process runs, other than this process through this module, which then
    forgets it. Later `is_file`, `size` and `read_bytes` of `p` make no request. For what is final by
    the run directory's rules: a shard under its final name (checked by sha256), a complete manifest,
    a complete student, a finished round's metrics, the frozen config. Locally nothing is kept."""
    global _final_bytes
    if not is_remote(p):
        return
    if data is not None and len(data) > _FINAL_OBJECT:
        data = None
    key = str(p)
    with _FINAL_LOCK:
        old = _FINAL.pop(key, None)
        _final_bytes -= len(old or b"")
        _FINAL[key] = data
        _final_bytes += len(data or b"")
        while _final_bytes > _FINAL_BYTES:
            _, dropped = _FINAL.popitem(last=False)
            _final_bytes -= len(dropped or b"")


def _final(p: Location) -> tuple[bool, bytes | None]:
    """(whether `p` is known final, its bytes where kept)."""
    with _FINAL_LOCK:
        key = str(p)
        if key not in _FINAL:
            return False, None
        _FINAL.move_to_end(key)
        return True, _FINAL[key]


def _changing(p: Location, tree: bool = False) -> None:
    """This process is about to write or delete `p` (`tree`: everything under it): forget what it knew."""
    global _final_bytes
    key = str(p)
    with _FINAL_LOCK:
        keys = [key]
        if tree:
            under = key.rstrip("/") + "/"
            keys += [k for k in (*_FINAL, *_VERSIONS) if k.startswith(under)]
        for k in keys:
            _final_bytes -= len(_FINAL.pop(k, None) or b"")
            _drop_version(k)


# ----------------------------------------------------------------------------- reads


def _bucket_key(p: Location) -> tuple[str, str]:
    bucket, _, key = p.path.partition("/")
    return bucket, key


def is_file(p: Location) -> bool:
    """Whether the file or object exists. On a bucket one HEAD (fsspec's isfile adds a listing for a
    missing key, and answers False when the store cannot be reached: that must be an error)."""
    if not is_remote(p):
        return p.is_file()
    if _final(p)[0]:
        return True
    try:
        _head(p)
        return True
    except FileNotFoundError:
        return False


def _head(p: Location) -> dict[str, Any]:
    """The HEAD of object `p` (GCS: its metadata), as the store gives it; FileNotFoundError when it is not there."""
    fs, _ = _fs(p)
    with errors(p, "look up"):
        return _store(p).head(fs, *_bucket_key(p))


def is_dir(d: Location) -> bool:
    """Whether directory/prefix `d` exists. On a bucket a prefix exists through its objects: one
    listing of at most one key (fsspec's isdir answers False when the store cannot be reached: that
    must be an error; it also takes an object `d` for a directory)."""
    if not is_remote(d):
        return d.is_dir()
    fs, _ = _fs(d)
    bucket, key = _bucket_key(d)
    try:
        with errors(d, "list"):
            return _store(d).any_under(fs, bucket, f"{key.rstrip('/')}/" if key else "")
    except FileNotFoundError:  # no such bucket
        return False


def size(p: Location) -> int:
    """The file's or object's size in bytes (one HEAD on a bucket); FileNotFoundError when it is not there."""
    if not is_remote(p):
        return p.stat().st_size
    data = _final(p)[1]
    if data is not None:
        return len(data)
    return _store(p).size(_head(p))


def read_bytes(p: Location) -> bytes:
    """The whole object; FileNotFoundError when it is not there."""
    if not is_remote(p):
        return p.read_bytes()
    known, data = _final(p)
    if data is not None:
        return data
    data = _get(p)[1]
    if known:
        remember_final(p, data)
    return data


def _get(p: Location) -> tuple[str, bytes]:
    """(version token, body) of an object in one GET (s3fs's cat_file adds a HEAD; info + cat would be
    two requests and could pair one version's token with another's body)."""
    fs, _ = _fs(p)
    with errors(p, "read"):
        return _store(p).get(fs, *_bucket_key(p))


def read_text(p: Location) -> str:
    return read_bytes(p).decode()


def names(d: Location, pattern: str = "*") -> list[str]:
    """Sorted names of the entries of directory/prefix `d` that match `pattern` (fnmatch)."""
    return _listing(d, pattern, dirs_only=False)


def subdirs(d: Location, pattern: str = "*") -> list[str]:
    """Names of the sub-directories (prefixes) of `d` matching `pattern`."""
    return _listing(d, pattern, dirs_only=True)


def _listing(d: Location, pattern: str, dirs_only: bool) -> list[str]:
    import fnmatch

    if not is_remote(d):
        return sorted(p.name for p in d.glob(pattern) if not dirs_only or p.is_dir()) if d.is_dir() else []
    fs, path = _fs(d)
    with errors(d, "list"):
        try:
            found = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
    return sorted(n for n in (f["name"].rstrip("/").rsplit("/", 1)[-1] for f in found
                              if not dirs_only or f["type"] == "directory") if fnmatch.fnmatch(n, pattern))


def sha256_of(p: Location) -> str:
    if not is_remote(p):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()
    return hashlib.sha256(read_bytes(p)).hexdigest()


# ----------------------------------------------------------------------------- writes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(final: Path) -> Path:
    # Leading dot: globs like "*.parquet" (datasets, pandas) never pick up a half-written file.
    # Host and pid name the writer, so a cleanup removes only files of writers that are gone; the
    # thread's native id (unique among live threads; get_ident() % 100000 could repeat) its thread.
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_native_id()}")


_FOREIGN_TMP_SECONDS = 3600  # a temporary file of another machine's writer is stale after this long


def _tmp_writer_alive(p: Path) -> bool:
    """Whether the process that writes temporary file `p` may still be at work: on this machine its
    pid still runs; on another, the file changed within the last hour. (Two array tasks that start
    at once both write the prompt cache: neither may delete the other's file, seen under Slurm.)"""
    try:
        host, pid, _ = p.name.split(".tmp-", 1)[1].rsplit("-", 2)
        pid = int(pid)
    except ValueError:
        return False  # not a name of ours (or an older one): stale
    if host != socket.gethostname():
        try:
            return time.time() - p.stat().st_mtime < _FOREIGN_TMP_SECONDS
        except OSError:
            return False
    return pid_alive(pid)


def remove_stale_tmp(final: Location) -> None:
    """Temporary files that a killed writer left beside `final` (local only: a bucket has none);
    those of live writers are left alone."""
    if not is_remote(final):
        for p in final.parent.glob(f".{final.name}.tmp-*"):
            if _tmp_writer_alive(p):
                continue
            with contextlib.suppress(OSError):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()


def write_file(final: Location, fill: Callable[[Path], None], before_commit: Callable[[], None] | None = None,
               doing: str = "write", exclusive: bool = False) -> bool:
    """`fill(path)` writes a local file; it then becomes `final`, complete or not at all.

    Locally the file is written beside `final` and renamed; for a bucket it is written to a local
    temporary file and uploaded in one PUT. `exclusive` (a bucket only): the PUT is a conditional
    create, so an object already at `final` is kept as it is, and False is returned. A worker
    whose lease was taken over while it computed (it froze, or lost the store for a while) must
    not replace the shard its successor wrote and recorded: that record's checksum names those
    bytes. Locally the fcntl lock is never lost while its holder lives, so a rename is enough."""
    if not is_remote(final):
        tmp = tmp_name(final)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fill(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if before_commit is not None:
                before_commit()
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise store_error(final, doing, e) from None
            raise
        return True
    with tempfile.TemporaryDirectory(prefix="eopd-put-") as d:
        tmp = Path(d) / final.name
        fill(tmp)
        if before_commit is not None:
            before_commit()
        data = tmp.read_bytes()
    if not exclusive:
        _put(final, data, doing)
        return True
    try:
        with errors(final, doing):
            _put_if(final, data, None)
    except Exception as e:
        if not _precondition_failed(e):
            raise
        remember_final(final)  # created once, never replaced: final (someone else's bytes)
        return False
    remember_final(final, data)
    return True


def write_bytes(final: Location, data: bytes, doing: str = "write") -> None:
    """`final` holds `data`, complete, or is unchanged."""
    if is_remote(final):
        _put(final, data, doing)
        return
    write_file(final, lambda tmp: tmp.write_bytes(data), doing=doing)


def write_text(final: Location, text: str, doing: str = "write") -> None:
    write_bytes(final, text.encode(), doing)


def _put(final: Location, data: bytes, doing: str) -> None:
    _changing(final)
    fs, path = _fs(final)
    with errors(final, doing):
        fs.pipe_file(path, data)


def _put_if(p: Location, data: bytes, token: str | None) -> str | None:
    """One conditional PUT: create `p` (token None) or replace the version `token` of it. Raises a
    precondition failure (`_precondition_failed`) when another writer came first. Returns the new
    version's token where the store's answer names it."""
    _changing(p)
    fs, path = _fs(p)
    bucket, key = _bucket_key(p)
    return _store(p).put_if(fs, path, bucket, key, data, token)


def create(p: Location, data: bytes) -> bool:
    """Create `p` holding `data` unless it exists; True for the one caller that created it."""
    if not data:
        raise ValueError("create() needs a non-empty body: s3fs sends no If-None-Match for an empty one")
    if is_remote(p):
        try:
            with errors(p, "create"):
                _put_if(p, data, None)
            return True
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(p)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, p)  # atomic, fails if `p` exists: readers never see a partial file
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise store_error(p, "create", e) from None
    finally:
        tmp.unlink(missing_ok=True)


def _etag_and_body(p: Location) -> tuple[str | None, bytes | None]:
    try:
        return _get(p)
    except FileNotFoundError:
        return None, None


_UPDATES: dict[str, int] = {}  # per path: how many `update`s this process has made
_UPDATED = threading.Condition()


def updates(p: Location) -> int:
    """How many `update`s of `p` this process has made so far (see `wait_for_update`)."""
    with _UPDATED:
        return _UPDATES.get(str(p), 0)


def wait_for_update(p: Location, seen: int, timeout: float) -> int:
    """Wait until this process has made more than `seen` updates of `p` (another of its threads
    recorded something there), or `timeout` seconds; returns `updates(p)`. A thread that polls an
    object this process also writes is then woken at once, not at its next poll."""
    with _UPDATED:
        _UPDATED.wait_for(lambda: _UPDATES.get(str(p), 0) > seen, timeout)
        return _UPDATES.get(str(p), 0)


def _updated(p: Location) -> None:
    with _UPDATED:
        _UPDATES[str(p)] = _UPDATES.get(str(p), 0) + 1
        _UPDATED.notify_all()


def update(p: Location, change: Callable[[bytes | None], bytes | None], lock_dir: Location | None = None) -> bytes | None:
    """Read-modify-write of one small object that no concurrent update can lose.

    `change(old)` gets the current bytes (None: no object) and returns the new bytes, or None to
    leave it as it is; it may run more than once (on a bucket, after losing a race). Returns what
    the object holds afterwards."""
    if not is_remote(p):
        from filelock import FileLock

        lock_dir = lock_dir if lock_dir is not None else p.parent / ".locks"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock_dir / f"{p.name}.lock")):
                old = p.read_bytes() if p.exists() else None
                new = change(old)
                if new is None:
                    return old
                write_bytes(p, new)
        except OSError as e:
            raise store_error(p, "update", e) from None
    else:
        new, _ = _compare_and_swap(p, change)
    _updated(p)
    return new


def _compare_and_swap(p: Location, change: Callable[[bytes | None], bytes | None]) -> tuple[bytes | None, str | None]:
    """`update` on a bucket: (what the object holds afterwards, its version token where the store
    named it). The version this process last read or wrote there (`_VERSIONS`) is tried before any
    GET; a stale one costs the failed conditional PUT only, and a decision taken on it (`change`
    refuses, or has nothing to change) is taken again on the object as it is."""
    delay = 0.02
    with _FINAL_LOCK:
        known = _VERSIONS.get(str(p))
    for _ in range(200):
        guess = known is not None
        if guess:
            (etag, old), known = known, None
        else:
            with errors(p, "read"):
                etag, old = _etag_and_body(p)
        try:
            new = change(old)
        except Exception:
            if guess:
                continue
            raise
        if new is None:
            if guess:
                continue
            if etag is not None and old is not None:
                _set_version(p, etag, old)
            return old, etag
        try:
            with errors(p, "update"):
                token = _put_if(p, new, etag)
            if token is not None:
                _set_version(p, token, new)
            return new, token
        except Exception as e:
            if not _precondition_failed(e):
                raise
        if guess:
            continue  # only our guess was stale: read now
        time.sleep(delay * (0.5 + random.random()))  # another writer won: read again
        delay = min(delay * 2, 1.0)
    raise UserError(f"could not update {p}: 200 compare-and-swap attempts lost to other writers; run the same command again")


def append_text(p: Location, text: str) -> None:
    """Append to a small log file (metrics.jsonl, timings.jsonl). On a bucket: a whole-object
    compare-and-swap (S3 has no append), so concurrent appenders lose no line."""
    if not is_remote(p):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a") as f:
                f.write(text)
        except OSError as e:
            raise store_error(p, "append to", e) from None
        return
    update(p, lambda old: (old or b"") + text.encode())


APPEND_ENV = "EOPD_APPEND_SECONDS"  # how often a bucket Appender writes its queued lines, unless flushed
_APPEND_DEFAULT = 2.0


class Appender:
    """A log that one process appends lines to (a round's train/metrics.jsonl, under its training
    claim), started as `text` (what a resumed run keeps of it; written now).

    Locally each line is appended at once, as `append_text`. On a bucket an append is a rewrite of
    the whole object (a GET and a conditional PUT, ~10 ms even on loopback), so the caller's
    thread only queues its line: a background thread writes what is queued at most every
    EOPD_APPEND_SECONDS (default 2; `status` sees a line that much later), with a conditional PUT
    on the version it wrote last (no GET; another writer in between makes it read and retry,
    losing no line). `flush()` returns once every queued line is in the store: callers flush before
    anything that assumes the lines are there (a checkpoint, from which a resumed run keeps the
    lines up to its step), and a kill loses only lines after the last flush."""

    def __init__(self, p: Location, text: str = "") -> None:
        self.path = p
        self._thread: threading.Thread | None = None
        remove_stale_tmp(p)  # left by a writer that was killed
        if not is_remote(p):
            write_text(p, text)
            return
        try:
            self.interval = float(os.environ.get(APPEND_ENV, _APPEND_DEFAULT))
        except ValueError:
            raise UserError(f"{APPEND_ENV}={os.environ[APPEND_ENV]!r} is not a number of seconds") from None
        data = text.encode()
        _changing(p)
        fs, path = _fs(p)
        with errors(p, "write"):
            out = fs.pipe_file(path, data)
        # S3 names the new version in the answer; otherwise the first write reads it (one GET)
        token = out.get("ETag") if isinstance(out, dict) else None
        if token:
            _set_version(p, token, data)
        self._queued: list[str] = []
        self._writing = False
        self._flushes = 0  # callers waiting in flush(): write now
        self._closed = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="eopd-appender", daemon=True)
        self._thread.start()

    def write(self, text: str) -> None:
        if self._thread is None:
            append_text(self.path, text)
            return
        with self._cond:
            self._raise_error()
            self._queued.append(text)
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every line written so far is in the store; raises the store's error, if any."""
        if self._thread is None:
            return
        with self._cond:
            self._flushes += 1
            self._cond.notify_all()
            try:
                while (self._queued or self._writing) and self._error is None and self._thread.is_alive():
                    self._cond.wait(1.0)
            finally:
                self._flushes -= 1
            self._raise_error()

    def close(self) -> None:
        """Flush, then end the writer thread."""
        if self._thread is None:
            return
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(timeout=60)

    def finished(self) -> None:
        """The log is whole (its round is trained, the Appender closed): this process reads it from
        memory from now on (`remember_final`)."""
        if self._thread is not None:
            with _FINAL_LOCK:
                body = _VERSIONS.get(str(self.path), (None, None))[1]
            remember_final(self.path, body)

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the error that ends the block is the one to report
            self.close()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error if isinstance(self._error, UserError) else store_error(self.path, "append to", self._error)

    def _run(self) -> None:
        last = time.monotonic()  # the start was a write
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._queued and (self._flushes or self._closed or now >= last + self.interval):
                        break
                    if self._closed:
                        return
                    self._cond.wait(last + self.interval - now if self._queued else None)
                text, self._queued, self._writing = "".join(self._queued), [], True
            try:
                new = text.encode()
                _compare_and_swap(self.path, lambda old: (old or b"") + new)
            except BaseException as e:  # noqa: BLE001 -- handed to the caller's next write or flush
                with self._cond:
                    self._error, self._writing = e, False
                    self._cond.notify_all()
                return
            last = time.monotonic()
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def remove(p: Location) -> None:
    """Delete a file or object if it is there."""
    if not is_remote(p):
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            raise store_error(p, "delete", e) from None
        return
    _changing(p)
    fs, path = _fs(p)
    with errors(p, "delete"), contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def remove_tree(p: Location) -> None:
    if not is_remote(p):
        shutil.rmtree(p, ignore_errors=True)
        return
    _changing(p, tree=True)
    fs, path = _fs(p)
    with errors(p, "delete"), contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def move(src: Location, dst: Location) -> None:
    """Rename locally; on a bucket copy then delete (S3 has no rename)."""
    if not is_remote(src):
        try:
            os.replace(src, dst)
        except OSError as e:
            raise store_error(src, "move", e) from None
        return
    _changing(src)
    _changing(dst)
    fs, path = _fs(src)
    with errors(src, "move"):
        fs.copy(path, _fs(dst)[1])
        fs.rm_file(path)


def mkdir(p: Location) -> None:
    """A directory locally; nothing on a bucket (prefixes exist through their objects)."""
    if not is_remote(p):
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store_error(p, "create the directory", e) from None


# ----------------------------------------------------------------------------- directories (models, checkpoints)


def upload_tree(local: Path, dest: Location, last: str, doing: str = "write", cache: bool = False,
                before_last: Callable[[], object] | None = None) -> None:
    """Make directory `dest` hold the files of `local`, with `last` (a completion file: config.json,
    COMPLETE) written after all others, so `dest/last` exists only once `dest` is whole. Locally
    `local` must be a sibling of `dest` (same filesystem): it is renamed into place.
    `cache` (a bucket): `local` then becomes the verified local copy that `local_tree(dest)` gives,
    as if downloaded (one listing instead of the download: the persistent run samples from the
    student it has just uploaded); it must lie in `cache_root()` (`scratch_dir` is there).
    `before_last`: called (and its exception raised) before `dest` becomes complete: what must be
    whole first (the round's checkpoint, uploading meanwhile) is waited for there."""
    if not is_remote(dest):
        if before_last is not None:
            before_last()
        try:
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(local, dest)
            _fsync_dir(dest.parent)
        except OSError as e:
            raise store_error(dest, doing, e) from None
        return
    _changing(dest, tree=True)
    fs, path = _fs(dest)
    files = {f.relative_to(local).as_posix(): str(f) for f in local.rglob("*") if f.is_file()}
    if is_file(dest / last):  # an older complete copy: it stops being complete first
        with errors(dest, doing):
            fs.rm_file(f"{path}/{last}")
    rest = sorted(rel for rel in files if rel != last)
    with errors(dest, doing):
        if rest:  # at once (fsspec uploads a list of files concurrently): only `last` must come after them
            fs.put([files[rel] for rel in rest], [f"{path}/{rel}" for rel in rest])
    if before_last is not None:
        before_last()
    with errors(dest, doing):
        if last in files:
            fs.put_file(files[last], f"{path}/{last}")
    if last in files:
        remember_final(dest / last, Path(files[last]).read_bytes())  # complete now, and stays so
    if cache:
        adopt_into_cache(local, dest)


def _tree_entries(src: Location) -> tuple[list[tuple[str, int, str, str | None]], Path]:
    """(relative name, size, version token, MD5 or None) of every object under directory `src`, and
    the cache directory that holds exactly these versions (`local_tree`)."""
    fs, path = _fs(src)
    listing = fs.find(path, detail=True)
    store = _store(src)
    entries = sorted((k[len(path) + 1:], int(v["size"]), *store.listed(v)) for k, v in listing.items())
    digest = hashlib.sha256(json.dumps([str(src), [e[:3] for e in entries]]).encode()).hexdigest()[:20]
    return entries, cache_root() / "objects" / digest


def _matches(f: Path, nbytes: int, md5: str | None) -> bool:
    return f.stat().st_size == nbytes and (not md5 or hashlib.md5(f.read_bytes()).hexdigest() == md5)


def adopt_into_cache(local: Path, src: Location) -> None:
    """Move `local` into the cache as the copy of `src`, if the objects listed under `src` are
    exactly its files (names, sizes, MD5 where the store gives one: the checks of a download).
    Otherwise (another writer in between) nothing is adopted; `local_tree` then downloads."""
    with errors(src, "list"):
        entries, out = _tree_entries(src)
    mine = {f.relative_to(local).as_posix(): f for f in local.rglob("*") if f.is_file()}
    if sorted(mine) != [e[0] for e in entries] or (out / ".eopd-complete").is_file():
        return
    if not all(_matches(mine[rel], nbytes, md5) for rel, nbytes, _, md5 in entries):
        return
    (local / ".eopd-complete").write_text("ok")
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # another process made the same copy first
        os.replace(local, out)


def scratch_dir(dest: Location, label: str) -> Path:
    """Where to build a directory that becomes `dest` through `upload_tree`: beside it locally (so
    the final step is a rename), in the local cache for a bucket."""
    if not is_remote(dest):
        d = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(d, ignore_errors=True)
        d.parent.mkdir(parents=True, exist_ok=True)
        return d
    d = cache_root() / "scratch" / f"{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_root() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "eopd-pipe")
    root.mkdir(parents=True, exist_ok=True)
    return root


def local_tree(src: Location, what: str = "directory") -> Path:
    """A local copy of directory `src`: `src` itself when local; for a bucket a cached download,
    keyed by the URL and the objects' versions (S3: ETags; GCS: generations) and sizes, verified file by
    file (size, and MD5 where the store gives one) and made visible by rename once whole. A second call
    with the same content is free."""
    if not is_remote(src):
        return src
    fs, path = _fs(src)
    with errors(src, f"read the {what}"):
        entries, out = _tree_entries(src)
    if not entries:
        raise UserError(f"{what} {src} does not exist (no objects under that prefix); check the URL")
    if (out / ".eopd-complete").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tmp.mkdir(parents=True)
        with errors(src, f"download the {what}"):
            for rel, nbytes, _, md5 in entries:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{path}/{rel}", str(target))
                if not _matches(target, nbytes, md5):
                    raise UserError(f"{src}/{rel}: the download does not match the object (size or MD5); run again")
        (tmp / ".eopd-complete").write_text("ok")
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same download first
            if not (out / ".eopd-complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- claims


def lease_seconds() -> float:
    try:
        return float(os.environ.get(LEASE_ENV, _LEASE_DEFAULT))
    except ValueError:
        raise UserError(f"{LEASE_ENV}={os.environ[LEASE_ENV]!r} is not a number of seconds") from None


class Claim:
    """A held claim on one unit of work (a shard, a round's training). `release()` frees it;
    `lost` tells whether a bucket lease was taken over while held (after missing its renewals)."""

    def __init__(self, p: Location) -> None:
        self.path = p
        self.lost = False

    def release(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class _LockClaim(Claim):
    """An OS file lock, with the holder's identity and a heartbeat written in the lock file: /proc/locks
    names only holders on this machine, so `status` on another node of a shared filesystem (a Slurm
    task, a Ray actor elsewhere) reads who holds it, and whether it is alive, from the heartbeat."""

    def __init__(self, p: Path, lock) -> None:
        super().__init__(p)
        self._lock = lock
        self.ttl = lease_seconds()
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._heartbeat, name="eopd-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, body: bytes | None = None) -> None:
        # flock: writing through another descriptor keeps the lock
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, body if body is not None else _heartbeat(self.ttl))
            finally:
                os.close(fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self._beat()

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._beat(b"")  # released: nobody's heartbeat (a lock file is kept for the next claimer)
        self._lock.release()


class _Lease(Claim):
    """A lease object on a bucket: `{"owner", "worker", "renewed", "expires_s"}`, renewed every
    third of its life by a daemon thread with a compare-and-swap on its own version token."""

    def __init__(self, p: Location, owner: str, etag: str, ttl: float) -> None:
        super().__init__(p)
        self.owner, self._etag, self.ttl = owner, etag, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="eopd-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._etag = _put_token(self.path, _heartbeat(self.ttl, owner=self.owner), self._etag)
            except Exception as e:
                if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                    self.lost = True  # taken over: the other worker redoes the shard; records stay single
                    return
                # the store is unreachable for now: keep trying; the work's own writes will report it

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost:
            return
        with contextlib.suppress(Exception):
            if _store(self.path).token(_head(self.path)) == self._etag:
                fs, path = _fs(self.path)
                fs.rm_file(path)


def _put_token(p: Location, data: bytes, token: str | None) -> str:
    """`_put_if`, then the new object's version token (one HEAD more where the answer did not name it)."""
    new = _put_if(p, data, token)
    return new if new is not None else _store(p).token(_head(p))


def _heartbeat(ttl: float, **fields: str) -> bytes:
    """A claim's record, rewritten while it is held (a lease object's body; a lock file's contents)."""
    return json.dumps({**fields, "worker": worker_identity(), "renewed": time.time(), "expires_s": ttl}).encode()


def claim_age(held: dict[str, Any]) -> tuple[float, bool]:
    """(seconds since a claim's last heartbeat, whether it has expired): the one rule for a lease
    object, a lock file's heartbeat and `status`. Expired once older than the `expires_s` it names,
    or at once when its holder is seen gone (same machine, dead process). Raises KeyError, TypeError
    or ValueError for a record that is not a claim's."""
    age = time.time() - float(held["renewed"])
    return age, age > float(held.get("expires_s", lease_seconds())) or holder_gone(held.get("worker", {}))


def claim(p: Location) -> Claim | None:
    """Claim `p` for this process, without waiting; None when another live worker holds it."""
    if not is_remote(p):
        from filelock import FileLock, Timeout

        p.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(p), thread_local=False)  # released by another thread (the shard writer)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return _LockClaim(p, lock)
    ttl = lease_seconds()
    owner = uuid.uuid4().hex
    for _ in range(3):  # the holder may release between our create and our read: try again
        try:
            with errors(p, "create the lease"):
                return _Lease(p, owner, _put_token(p, _heartbeat(ttl, owner=owner), None), ttl)
        except Exception as e:
            if not _precondition_failed(e):
                raise
        with errors(p, "read the lease"):
            etag, body = _etag_and_body(p)
        if etag is not None:
            break
    else:
        return None
    try:
        expired = claim_age(json.loads(body))[1]
    except (ValueError, KeyError, TypeError, AttributeError):
        expired = True  # not a lease of ours: treat as stale
    if not expired:
        return None
    try:
        with errors(p, "take over the lease"):
            return _Lease(p, owner, _put_token(p, _heartbeat(ttl, owner=owner), etag), ttl)
    except Exception as e:
        if _precondition_failed(e):
            return None  # another worker took it over first
        raise


def leases(d: Location) -> list[dict[str, Any]]:
    """The lease objects under `d` (a bucket's `.locks/`): name, worker, age in seconds, expired."""
    out = []
    if not is_remote(d):
        return out
    for name in names(d, "*.lock"):
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            held = json.loads(read_bytes(d / name))
            age, expired = claim_age(held)
            out.append({"name": name, "worker": held.get("worker", {}), "age_s": age, "expired": expired})
    return out
