"""A real S3 server on loopback for the storage tests: moto's standalone server (`moto[server]`).

A plain module like `ray_nodes`: `tests/conftest.py`'s session fixture `s3_bucket` starts it once.
moto rather than SeaweedFS: it is a pure-Python wheel already in the test environment (no server
binary to download and supervise), starts in milliseconds in a thread of the test process, and
speaks the S3 REST protocol over real HTTP, so pyarrow's S3 client (the one Ray Train and
`sde_ray.storage` use) talks to it exactly as to AWS: signed requests, multipart uploads, ranged
GETs. Its state lives in memory and ends with the process.
"""

from __future__ import annotations

import logging
import os

import pyarrow.fs as pafs

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sde-ray-test", "AWS_SECRET_ACCESS_KEY": "sde-ray-test",
               "AWS_REGION": "us-east-1"}


class S3Server:
    """moto's server on 127.0.0.1 (a port the OS hands out) and the environment that points the
    AWS SDKs (pyarrow's included) at it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def create_bucket(self, name: str) -> str:
        """An empty bucket; returns its `s3://` URL."""
        host = self.endpoint.removeprefix("http://")
        pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                          allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.server.stop()


def export_env(env: dict[str, str]) -> dict[str, str | None]:
    """Sets `env` in os.environ (inherited by Ray nodes started later); returns the previous values."""
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    return previous


def restore_env(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
