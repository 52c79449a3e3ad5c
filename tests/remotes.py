"""Remote targets for the conformance suite (tests/test_remote.py): a file:// directory and a bucket on
a real S3-compatible server (moto's standalone server on 127.0.0.1), behind one small interface."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import pytest

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_moto(extra_env=None):
    """A moto S3 server on 127.0.0.1: (process, endpoint URL); the test fails if it does not start."""
    from campaigns.common import Failure
    from campaigns.common import start_moto as start

    try:
        return start(extra_env)
    except Failure as e:
        pytest.fail(str(e))


@dataclass
class Target:
    """Where a test's remote lives, and how the CLI and the API reach it."""

    kind: str  # "file" or "s3"
    url: str
    endpoint: str | None = None
    env: dict = field(default_factory=lambda: dict(os.environ))

    @property
    def args(self) -> list[str]:
        """Extra CLI arguments for `remote add` and `clone`."""
        return ["--endpoint-url", self.endpoint] if self.endpoint else []

    def backend(self, create: bool = False):
        from mvc.remote.backends import open_remote

        return open_remote(self.url, create=create, endpoint_url=self.endpoint)

    def packs(self) -> list[str]:
        try:
            return [k for k in self.backend().list("packs/") if k.endswith(".pack")]
        except Exception:  # the remote is not made yet
            return []

    def ref(self, branch: str = "main") -> bytes | None:
        try:
            return self.backend().get(f"refs/heads/{branch}")
        except Exception:
            return None

    def overwrite(self, key: str, data: bytes) -> None:
        """Replace a stored key behind mvc's back (as damage on the server would)."""
        if self.kind == "file":
            with open(os.path.join(self.url[len("file://"):], *key.split("/")), "wb") as f:
                f.write(data)
        else:
            import boto3

            bucket, _, prefix = self.url[len("s3://"):].partition("/")
            boto3.client("s3", endpoint_url=self.endpoint).put_object(
                Bucket=bucket, Key=f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key, Body=data)
