"""The object-store layer under a :class:`~study.store.location.Bucket`: pyarrow's S3
filesystem, set as a study needs it (one PUT per small file, every request retried with
backoff, no folder markers, no resend of unchanged bytes, every call waiting out an outage for
the study's patience: ``study.store.outage``), and picklable without credentials.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

from study.store import outage

# Attempts per bucket request, with the AWS SDK's standard retry: exponential backoff with jitter
# (base 25 ms, at most 20 s), on throttling (503 SlowDown), server errors and dropped connections.
S3_ATTEMPTS = 10
_CREDENTIALS = ("access_key", "secret_key", "session_token")


def object_store(fs: Any) -> Any:
    """The filesystem a study uses for a bucket. For S3, pyarrow's own, set as a study needs it:

    - ``allow_delayed_open``: a small file is one PutObject, not a multipart upload (create, part,
      complete: three requests);
    - every request retried ``S3_ATTEMPTS`` times with the SDK's exponential backoff (pyarrow's
      default, 3, let 15% of failing requests stop trials). The SDK's default strategy, not its
      "standard" one: that one also spends a retry quota per client (5 per retry, 1 back per
      success), which a long-lived filesystem runs dry when a quarter of requests fail, and then
      it retries nothing;
    - no directory markers: Ray creates every parent folder of every file it uploads, one PUT
      each, and a prefix is a folder on S3 as soon as an object is under it.

    It pickles without credentials (each process, Ray's workers too, takes them from its own
    environment, as pyarrow does from a URI) and with these settings. Other stores are as pyarrow
    opens them."""
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    _, args = fs.__reduce__()
    options = {k: v for k, v in args[0].items() if k not in _CREDENTIALS}
    return pafs.PyFileSystem(_ObjectStore(options))


def _s3(options: dict[str, Any]) -> Any:
    import pyarrow.fs as pafs

    # background_writes off: a write is sent from the thread that closes the file (_Upload), never
    # queued to pyarrow's IO threads, which pyarrow's own copy_files (Ray's uploads) may all hold
    return pafs.S3FileSystem(**{**options, "allow_delayed_open": True, "background_writes": False,
                                "retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_ATTEMPTS)})


try:
    import pyarrow.fs as _pafs

    _Handler: Any = _pafs.FileSystemHandler
except ImportError:  # pragma: no cover - pyarrow is a dependency
    _Handler = object


class _Upload:
    """A file written to the bucket: held until it is closed, then sent in one request, unless
    this process sent exactly these bytes to this key last (then nothing is sent)."""

    def __init__(self, store: "_ObjectStore", path: str, metadata: Any) -> None:
        import io

        self.store, self.path, self.metadata, self.buffer = store, path, metadata, io.BytesIO()
        self.closed = False

    def write(self, data: Any) -> int:
        return self.buffer.write(data)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.buffer.tell()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        data = self.buffer.getvalue()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if self.store.sent.get(self.path) == digest:
            return

        def put() -> None:
            with self.store.fs.open_output_stream(self.path, metadata=self.metadata) as f:
                f.write(data)

        self.store.patiently(put, self.path)
        self.store.sent[self.path] = digest


class _ObjectStore(_Handler):
    """pyarrow's S3 filesystem, through ``pyarrow.fs.PyFileSystem`` (see :func:`object_store`).

    ``patience``: how long each call waits out an outage; None: this process's
    (``outage.patience()``). A copy pickled for another process (Ray hands the study's filesystem
    to its trials) carries the patience it had here plus ``outage.WORKER_GRACE_S``."""

    def __init__(self, options: dict[str, Any], patience: float | None = None) -> None:
        self.options = options
        self.patience = patience
        self.fs = _s3(options)
        # What this process last uploaded to each key (a digest): Ray uploads its whole driver
        # folder at every sync of its state, every trial's logs included, so a study in a bucket
        # sent each finished trial's files again and again (quadratic in trials, BENCHMARKS §8b).
        self.sent: dict[str, bytes] = {}

    def __reduce__(self) -> tuple:
        return (_ObjectStore, (self.options, self._patience() + outage.WORKER_GRACE_S))

    def _patience(self) -> float:
        return outage.patience() if self.patience is None else self.patience

    def patiently(self, call: Callable[[], Any], path: str) -> Any:
        """``call()``, waiting out an outage of the bucket (``study.store.outage``)."""
        return outage.patiently(call, uri="s3://" + path.split("/", 1)[0], patience=self._patience())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ObjectStore) and other.options == self.options

    def __hash__(self) -> int:
        return hash(repr(sorted(self.options.items())))

    def get_type_name(self) -> str:
        return "s3"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list:
        return self.patiently(lambda: self.fs.get_file_info(paths), paths[0] if paths else "")

    def get_file_info_selector(self, selector: Any) -> list:
        return self.patiently(lambda: self.fs.get_file_info(selector), selector.base_dir)

    def create_dir(self, path: str, recursive: bool) -> None:
        pass  # a prefix needs no marker object

    def delete_dir(self, path: str) -> None:
        self._forget(path.rstrip("/") + "/")
        self.patiently(lambda: self.fs.delete_dir(path), path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._forget(path.rstrip("/") + "/")
        self.patiently(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok), path)

    def _forget(self, prefix: str) -> None:
        for key in [k for k in self.sent if k.startswith(prefix)]:
            del self.sent[key]

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to empty a whole bucket")

    def delete_file(self, path: str) -> None:
        self.sent.pop(path, None)
        self.patiently(lambda: self.fs.delete_file(path), path)

    def move(self, src: str, dest: str) -> None:
        self.sent.pop(src, None)
        self.sent.pop(dest, None)
        self.patiently(lambda: self.fs.move(src, dest), src)

    def copy_file(self, src: str, dest: str) -> None:
        self.sent.pop(dest, None)
        self.patiently(lambda: self.fs.copy_file(src, dest), src)

    def open_input_stream(self, path: str) -> Any:
        return self._read_whole(path)

    def open_input_file(self, path: str) -> Any:
        return self._read_whole(path)

    def _read_whole(self, path: str) -> Any:
        """The object, read whole within one patient call (a stream read later, outside it, would
        meet an outage unguarded): a study's objects are small (rows, checkpoints of MBs)."""
        import pyarrow as pa

        def read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return f.read()

        return pa.BufferReader(self.patiently(read, path))

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        import pyarrow as pa

        return pa.PythonFile(_Upload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.fs.open_append_stream(path, metadata=metadata)
