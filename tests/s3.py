"""A real S3 protocol server on loopback (moto's server mode) for tests, as s3fs's own tests use.

    with moto_server() as storage_options:      # or, in a test module:
        fs = s3_filesystem(storage_options)      #   s3 = pytest.fixture(scope="module")(moto_fixture)
        fs.mkdir("bucket")
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import s3fs
from moto.server import ThreadedMotoServer

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server() -> Iterator[dict[str, Any]]:
    """Start the server on a free loopback port with test credentials in the environment; yield the fsspec
    storage_options that reach it (the region, us-east-1, comes from AWS_DEFAULT_REGION)."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with mock.patch.dict(os.environ, CREDENTIALS):
            yield {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    finally:
        server.stop()


def moto_fixture() -> Iterator[dict[str, Any]]:
    """The server as a pytest fixture: `s3 = pytest.fixture(scope="module")(moto_fixture)`."""
    with moto_server() as storage_options:
        yield storage_options


def s3_filesystem(storage_options: dict[str, Any]) -> s3fs.S3FileSystem:
    """A fresh (uncached) s3fs filesystem on the server."""
    return s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
