"""A real S3 endpoint on 127.0.0.1: moto's ThreadedMotoServer, as Ray's own storage tests use it.

pyarrow, boto3 and Ray's workers find it through AWS_ENDPOINT_URL; the keys are dummies, and the
secret is a marker that tests look for in everything a study writes.
"""
from __future__ import annotations

import logging
import os
import random
import re
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

BUCKET = "studies"
SECRET = "s3cr3t-never-written-anywhere"


@contextmanager
def s3_server(host: str = "127.0.0.1") -> Iterator[dict[str, str]]:
    """Start the endpoint on ``host``, create the bucket, and yield the environment that reaches it."""
    with s3_endpoint(host) as (env, _):
        yield env


# What a study's requests are about, by the key they name (the first pattern that matches).
KINDS = (("checkpoint", r"/tune/trial_[^/]+/checkpoint_"), ("trial logs", r"/tune/trial_"),
         ("tune state", r"/tune/"), ("parquet", r"/(trials|epochs|digits)/"), ("optuna", r"/optuna\.(db|log)"),
         ("other", r""))


class _Faulty:
    """moto's WSGI app behind a counter of every request (by method and by what it is about) and,
    with ``faults`` > 0, a share of requests answered 503 SlowDown or 500 InternalError, or with
    the connection dropped, before moto sees them. During an outage (:meth:`outage`) every
    request is answered so."""

    def __init__(self, app: Any, faults: float, seed: int) -> None:
        self.app, self.faults, self.rng, self.lock = app, faults, random.Random(seed), threading.Lock()
        self.counts: Counter = Counter()
        self.down: tuple[float, float] | None = None  # (start, end), monotonic: every request fails
        self.down_after: tuple[str, float] | None = None  # (key pattern, seconds): an outage on the first match

    def outage(self, seconds: float, *, after: str | None = None) -> None:
        """The bucket unreachable for ``seconds``: now, or from the first request whose path
        matches ``after`` (that request fails too)."""
        import time

        with self.lock:
            if after is None:
                self.down = (time.monotonic(), time.monotonic() + seconds)
            else:
                self.down_after = (after, seconds)

    def __call__(self, environ: dict, start_response: Any) -> Any:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        size = int(environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH") or environ.get("CONTENT_LENGTH") or 0)
        kind = next(k for k, pattern in KINDS if re.search(pattern, path))
        with self.lock:
            self.counts.update({"requests": 1, method: 1, f"{method} {kind}": 1})
            if os.environ.get("VAE_S3_COUNT_NAMES"):  # which files: a name with its trial and numbers masked
                name = re.sub(r"[0-9a-f]{8}|\d+", "N", path.rsplit("/", 1)[-1]) or path
                self.counts[f"name {method} {kind}: {name} {environ.get('QUERY_STRING', '').split('=')[0]}"] += 1
            if method == "PUT":
                self.counts["put_bytes"] += size
            import time

            now = time.monotonic()
            if self.down_after is not None and re.search(self.down_after[0], path):
                self.down, self.down_after = (now, now + self.down_after[1]), None
                self.counts["outage started"] = 1
            in_outage = self.down is not None and self.down[0] <= now < self.down[1]
            if in_outage:
                self.counts["outage requests"] += 1
            fault = in_outage or (self.faults and self.rng.random() < self.faults)
            how = self.rng.choice(("slowdown", "internal", "drop")) if fault else None
        if how is None:
            return self.app(environ, start_response)
        with self.lock:
            self.counts[f"fault {how}"] += 1
        if how == "drop":
            sock = environ.get("werkzeug.socket")
            if sock is not None:
                import socket

                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            start_response("500 Internal Server Error", [("Content-Length", "0")])  # never reaches the client
            return []
        code, status = ("SlowDown", "503 Slow Down") if how == "slowdown" else ("InternalError", "500 Internal Server Error")
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]


@contextmanager
def s3_endpoint(host: str = "127.0.0.1", *, faults: float = 0.0, seed: int = 0,
                control: list | None = None) -> Iterator[tuple[dict[str, str], Counter]]:
    """Like :func:`s3_server`, and yields the requests' counter too (``requests``, per method, per
    method and kind, ``put_bytes``, ``fault ...``); ``faults``: the share of requests that fail.
    ``control``: a list the fault layer is appended to (its :meth:`_Faulty.outage`)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    wrapped = _Faulty(DomainDispatcherApplication(create_backend_app), faults, seed)
    if control is not None:
        control.append(wrapped)

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:
            self._server = make_server(self._ip_address, self._port, wrapped, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    # one log line per request otherwise, and one per dropped connection
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL if faults else logging.ERROR)
    server = Server(ip_address=host, port=0, verbose=False)
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

        faults, wrapped.faults = wrapped.faults, 0.0  # the bucket is made without faults
        # moto's backends live in this process, not in the server: empty them, or a second
        # endpoint in the same test session shows the first one's objects
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"), timeout=30).read()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        wrapped.faults = faults
        wrapped.counts.clear()
        yield env, wrapped.counts
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


def stored_bytes(prefix: str = "") -> int:
    import boto3

    s3 = boto3.client("s3")
    total, token = 0, None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = s3.list_objects_v2(**kw)
        total += sum(o["Size"] for o in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return total
        token = page["NextContinuationToken"]
