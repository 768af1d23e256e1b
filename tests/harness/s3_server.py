"""moto's S3 server (from PyPI) in a process of its own on 127.0.0.1, and the AWS variables that
point the standard clients (boto3, tensorstore's s3 driver) at it: for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

from tests.harness.local_world import free_port

BUCKET = "mimo-ckpt-tests"
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
       "MIMO_CKPT_REMOTE_TIMEOUT_S": "20"}


class MotoServer:
    """moto's S3 server in a process of its own, on 127.0.0.1."""

    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=dict(os.environ, **env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)

    def make_bucket(self) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=BUCKET)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def s3_server() -> Iterator[MotoServer]:
    """A running server with the test bucket, and this process's environment pointing at it
    (restored on exit); processes started meanwhile inherit it."""
    saved = {k: os.environ.get(k) for k in [*AWS, "AWS_ENDPOINT_URL", "MIMO_CKPT_STORAGE_SPEC"]}
    os.environ.update(AWS)
    os.environ.pop("MIMO_CKPT_STORAGE_SPEC", None)
    moto = MotoServer()
    try:
        os.environ["AWS_ENDPOINT_URL"] = moto.endpoint  # the standard variable; tensorstore alone ignores it
        moto.make_bucket()
        yield moto
    finally:
        moto.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
