"""An S3 server for the tests: moto's, on the loopback interface, on a port the OS picks."""

from __future__ import annotations

import contextlib
import os
import socket

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never ask the cloud's instance-metadata address for credentials: only 127.0.0.1 is contacted.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@contextlib.contextmanager
def s3_server():
    """Yields the endpoint URL of a fresh moto S3 server (stopped afterwards)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # fsspec keeps one S3FileSystem per set of arguments, and the endpoint comes from the environment, not
    # the arguments: without this, a module's tests would reach the server an earlier module stopped.
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_environment(bucket: str = "lab"):
    """A fresh server with `bucket` made, and the environment (credentials, endpoint) pointing at it."""
    import pytest

    with s3_server() as url, pytest.MonkeyPatch.context() as patch:
        for key, value in ENV.items():
            patch.setenv(key, value)
        patch.setenv("AWS_ENDPOINT_URL", url)
        make_bucket(url, bucket)
        yield url


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
