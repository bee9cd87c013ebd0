"""A real S3 endpoint on 127.0.0.1: moto's ThreadedMotoServer, as Ray's own storage tests use it.

pyarrow, boto3 and Ray's workers find it through AWS_ENDPOINT_URL; the keys are dummies, and the
secret is a marker that tests look for in everything a study writes.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

BUCKET = "studies"
SECRET = "s3cr3t-never-written-anywhere"


@contextmanager
def s3_server(host: str = "127.0.0.1") -> Iterator[dict[str, str]]:
    """Start the endpoint on ``host``, create the bucket, and yield the environment that reaches it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def bucket_keys(prefix: str = "") -> list[str]:
    import boto3

    s3 = boto3.client("s3")
    keys, token = [], None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = s3.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(keys)
        token = page["NextContinuationToken"]


def get_object(key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
