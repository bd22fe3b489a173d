"""A real S3 API server for the tests: moto's server (`moto[server]`) on loopback, started once per
session; a fresh bucket per test. boto3 talks to it over HTTP exactly as it talks to AWS.

Import the fixtures into a test module: `from s3_server import moto_s3, s3_store  # noqa: F401`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server of this session; credentials are set in the environment."""
    for k, v in CREDENTIALS.items():
        os.environ.setdefault(k, v)
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto S3 server did not start (is moto[server] installed?):\n{log.read_text()}",
                            pytrace=False)
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_config(moto_s3) -> dict:
    """A store config naming a fresh bucket of its own."""
    import boto3

    bucket = f"dstack-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"type": "s3", "bucket": bucket, "prefix": "artifacts/v1", "region": "us-east-1",
            "endpoint_url": moto_s3}


@pytest.fixture
def s3_store(s3_config):
    from dstack.storage.s3 import S3BlobStore

    return S3BlobStore(s3_config["bucket"], s3_config["prefix"], region=s3_config["region"],
                       endpoint_url=s3_config["endpoint_url"])
