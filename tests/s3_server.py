"""A local S3-compatible server for the tests: moto's server mode in a subprocess on 127.0.0.1, on a free port,
with bounded waits, always stopped; and the storage options that reach it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

START_TIMEOUT = 60  # seconds for the server to answer, on a loaded 2-core machine


@dataclass(frozen=True)
class S3:
    endpoint: str

    def options(self, **overrides: str) -> dict[str, str]:
        """Lance storage options for this server (any key and secret: moto accepts them)."""
        return {"aws_endpoint": self.endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
                "aws_region": "us-east-1", "allow_http": "true"} | overrides

    def bucket(self, name: str) -> str:
        """Create a bucket; its URI."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(**env: str) -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 (`env`: its settings, e.g. INITIAL_NO_AUTH_ACTION_COUNT="0" to check
    credentials), stopped on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto's server exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not answer in {START_TIMEOUT} s") from None
                time.sleep(0.1)
        yield S3(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
