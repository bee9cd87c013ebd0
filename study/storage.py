"""The one place that reads and writes a study's files: a local or mounted folder, or a bucket.

A :class:`Location` is a folder on a file system (``/data/studies``, ``file:///data/studies``)
or a prefix in an object store (``s3://bucket/prefix``, ``gs://bucket/prefix``), reached
through ``pyarrow.fs``. pyarrow finds credentials itself: the standard AWS variables,
``AWS_ENDPOINT_URL``, the instance role, or Google's application-default credentials. They are
never stored, pickled or printed by this module.

Every write is whole: on a file system a temporary name in the same folder, then
``os.replace``; on an object store one PUT. A reader never sees half a file.

A study lives in ``<storage>/<name>/``::

    study.json       the StudySpec, so ``resume`` rebuilds the same trainable and settings
    optuna.log       the Optuna study (Optuna's journal file; optuna.db, SQLite, for a study made
                     before it); on a bucket, a snapshot of the driver's working copy
    tune/            Ray Tune's experiment: trial logs (TensorBoard event files), checkpoints, state
    trials/ epochs/ digits/   the Parquet results table (study.results)
    report/          index.html, PNGs, summary.json, cache/
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import posixpath
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

from study.errors import StudyError

SPEC_FILE = "study.json"
OPTUNA_DB = "optuna.db"  # a study from before the journal: SQLite
OPTUNA_LOG = "optuna.log"  # Optuna's journal file (JournalFileBackend), appended to
TUNE_DIR = "tune"
REPORT_DIR = "report"
REMOTE_SCHEMES = ("s3", "gs")
# A study in a bucket: Ray uploads trial logs and TensorBoard files this often (its default is 300 s).
BUCKET_SYNC_EVERY_S = 5


@runtime_checkable
class Store(Protocol):
    """What a study's storage can do. Callers ask it; none checks what kind it is.

    Two implementations: :class:`Folder` (a file system, local or mounted) and :class:`Bucket`
    (an object store through ``pyarrow.fs``). Adding a backend means one class and its tests.
    """

    uri: str
    name: str
    over_network: bool  # every read, write and listing is a request: batch writes, fetch reads at once
    visible_everywhere: bool  # every node of a cluster sees the same files without a shared mount

    def __truediv__(self, rel: str) -> "Store": ...
    @property
    def parent(self) -> "Store": ...
    def read_bytes(self, rel: str) -> bytes: ...
    def write_bytes(self, rel: str, data: bytes) -> None: ...
    def exists(self, rel: str = "") -> bool: ...
    def files(self, rel: str = "", suffix: str = "") -> list[str]: ...
    def files_modified(self, rel: str = "", suffix: str = "") -> dict[str, Any]: ...
    def folders(self, rel: str = "") -> list[str]: ...
    def delete(self, rel: str) -> None: ...
    def local_path(self, rel: str = "") -> Path | None: ...
    def working_path(self, rel: str) -> Path: ...
    def has_content(self) -> bool: ...
    def lock(self) -> contextlib.AbstractContextManager[None]: ...
    def ray_storage(self) -> dict[str, Any]: ...




class Location:
    """A folder, local or in a bucket, with whole-file reads and writes relative to it.

    Args:
        where: a path, ``file://`` URI, or ``s3://`` / ``gs://`` URI.
    """

    over_network = False
    visible_everywhere = False

    def __new__(cls, where: str | os.PathLike | "Location" | None = None) -> "Location":
        if where is None:  # unpickling: __setstate__ fills it in
            return object.__new__(cls)
        scheme, path = (where.scheme, where.path) if isinstance(where, Location) else _parse(str(where))
        if cls is Location:
            cls = Bucket if scheme in REMOTE_SCHEMES else Folder
        loc = object.__new__(cls)
        loc.scheme, loc.path, loc._fs = scheme, path, None
        return loc

    def __init__(self, where: str | os.PathLike | "Location" | None = None) -> None:
        pass  # made whole by __new__, which picks the kind

    # ------------------------------------------------------------------ identity

    @property
    def uri(self) -> str:
        """``/abs/path`` for a file system, ``s3://bucket/prefix`` for a bucket."""
        return self.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> "Location":
        return self._with_path(posixpath.dirname(self.path.rstrip("/")) or self.path)

    def __truediv__(self, rel: str) -> "Location":
        return self._with_path(self._join(rel))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __getstate__(self) -> dict[str, Any]:
        # A pyarrow file system is rebuilt where it is used, from the environment there.
        return {"scheme": self.scheme, "path": self.path, "_fs": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__class__ = Bucket if self.scheme in REMOTE_SCHEMES else Folder  # a Location pickled before the kinds

    def _with_path(self, path: str) -> "Location":
        loc = object.__new__(type(self))
        loc.scheme, loc.path, loc._fs = self.scheme, path, self._fs
        return loc

    def _join(self, rel: str) -> str:
        rel = rel.strip("/")
        return posixpath.join(self.path, rel) if rel else self.path

    @property
    def fs(self) -> Any:
        """The ``pyarrow.fs.FileSystem`` behind this location."""
        if self._fs is None:
            self._fs = self._open_fs()
        return self._fs

    def _open_fs(self) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ queries

    def _info(self, rel: str = "") -> Any:
        try:
            return self.fs.get_file_info(self._join(rel))
        except OSError as exc:
            raise StudyError(f"cannot read {self.uri}/{rel}: {_first_line(exc)}") from None

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        """A folder; on an object store, a prefix that holds at least one object."""
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.Directory

    def stat(self, rel: str = "") -> tuple[int, int]:
        """(size in bytes, modification time in ns) of a file."""
        info = self._info(rel)
        return int(info.size or 0), int(info.mtime_ns or 0)

    def _list(self, rel: str, *, recursive: bool, limit_one: bool = False) -> list[Any]:
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._join(rel), allow_not_found=True, recursive=recursive))
        except OSError as exc:
            raise StudyError(f"cannot list {self.uri}/{rel}: {_first_line(exc)}") from None
        return infos[:1] if limit_one else infos

    def files(self, rel: str = "", suffix: str = "") -> list[str]:
        """Names of the files directly in folder ``rel`` that end in ``suffix``, sorted."""
        return sorted(self.files_modified(rel, suffix))

    def files_modified(self, rel: str = "", suffix: str = "") -> dict[str, Any]:
        """The files of :meth:`files`, each with its modification time (from the same listing)."""
        import pyarrow.fs as pafs

        return {i.base_name: i.mtime for i in self._list(rel, recursive=False)
                if i.type == pafs.FileType.File and i.base_name.endswith(suffix)}

    def folders(self, rel: str = "") -> list[str]:
        """Names of the folders directly in folder ``rel``, sorted."""
        import pyarrow.fs as pafs

        return sorted(i.base_name for i in self._list(rel, recursive=False) if i.type == pafs.FileType.Directory)

    def walk(self, rel: str = "") -> list[str]:
        """Paths of every file under ``rel``, relative to this location, sorted."""
        import pyarrow.fs as pafs

        base = self.path.rstrip("/") + "/"
        return sorted(i.path[len(base):] if i.path.startswith(base) else i.path
                      for i in self._list(rel, recursive=True) if i.type == pafs.FileType.File)

    # ------------------------------------------------------------------ whole-file reads and writes

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._join(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if not self.exists(rel):
                raise FileNotFoundError(f"{self.uri}/{rel}") from None
            raise StudyError(f"cannot read {self.uri}/{rel}: {_first_line(exc)}") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file: a reader sees the old one or the new one, never a part."""
        try:
            self._write_whole(self._join(rel), data)
        except OSError as exc:
            raise StudyError(f"cannot write {self.uri}/{rel}: {_first_line(exc)}") from None

    def _write_whole(self, target: str, data: bytes) -> None:
        raise NotImplementedError

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def upload(self, src: str | os.PathLike, rel: str) -> None:
        """Copy a local file here, whole."""
        self.write_bytes(rel, Path(src).read_bytes())

    def download(self, rel: str, dest: str | os.PathLike) -> Path:
        """Copy a file from here to a local path, whole (a temporary name, then ``os.replace``)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(self.read_bytes(rel))
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._join(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StudyError(f"cannot delete {self.uri}/{rel}: {_first_line(exc)}") from None

    def delete_tree(self, rel: str = "") -> None:
        """Remove a folder and everything in it (nothing happens if it does not exist)."""
        if not self.exists(rel):
            return
        try:
            self.fs.delete_dir(self._join(rel))
        except OSError as exc:
            raise StudyError(f"cannot delete {self.uri}/{rel}: {_first_line(exc)}") from None

    def ensure_dir(self, rel: str = "") -> None:
        """Make the folder where folders exist (a bucket has none to make)."""

    def check_writable(self) -> None:
        """Fail before any trial starts when the storage cannot take a file; writes nothing that stays."""
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            self._probe_write(probe)
        except OSError as exc:
            raise StudyError(f"storage {self.uri} is not writable ({_first_line(exc)}): choose another --storage"
                             + self._unwritable_hint) from None

    _unwritable_hint = ""

    def _probe_write(self, probe: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ what callers ask instead of its kind

    def local_path(self, rel: str = "") -> Path | None:
        """A path this process can open for ``rel``, or None where files are not on this machine."""
        return None

    def working_path(self, rel: str) -> Path:
        """Where this process works on ``rel`` as a local file (SQLite needs one): the file itself
        where it is local, else a per-user cache file kept for this location."""
        local = self.local_path(rel)
        if local is not None:
            return local
        from vae.data import cache_dir

        return cache_dir() / "stores" / self._key() / rel

    def _key(self) -> str:
        return hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    def has_content(self) -> bool:
        """The folder exists and holds something."""
        return self.is_dir()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One process at a time: a second one fails at once (:class:`StudyError`). The lock is a
        file beside a local folder; for a bucket, a file in the per-user cache, so it holds
        against processes on this machine only."""
        from filelock import FileLock, Timeout

        path = self._lock_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StudyError(f"study {self.name!r} in {self.parent} is being run by another process right now; "
                             "wait for it, or pick another --name") from None
        try:
            yield
        finally:
            lock.release()

    def _lock_path(self) -> Path:
        from vae.data import cache_dir

        return cache_dir() / "locks" / f"{self._key()}.lock"

    def ray_storage(self) -> dict[str, Any]:
        """Ray Tune's ``RunConfig`` arguments that put an experiment here."""
        return {"storage_path": self.uri}


class Folder(Location):
    """A folder on a file system: local, or mounted (NFS, EFS) where every node has it."""

    def _open_fs(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()

    def _write_whole(self, target: str, data: bytes) -> None:
        # a temporary name in the same folder, then os.replace
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def ensure_dir(self, rel: str = "") -> None:
        try:
            os.makedirs(self._join(rel), exist_ok=True)
        except OSError as exc:
            raise StudyError(f"storage {self.uri} is not writable ({_first_line(exc)}): "
                             "choose another --storage") from None

    def _probe_write(self, probe: str) -> None:
        # Only probe inside a folder that exists: creating one would leave it behind.
        path = os.path.join(self.nearest_existing_dir(), probe)
        try:
            with open(path, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def nearest_existing_dir(self) -> str:
        """This folder, or the closest one above it that exists."""
        path = self.path
        while not os.path.isdir(path):
            if os.path.exists(path):
                raise NotADirectoryError(20, "Not a directory", path)
            up = os.path.dirname(path)
            if up == path:
                break
            path = up
        return path

    def local_path(self, rel: str = "") -> Path | None:
        return Path(self._join(rel))

    def has_content(self) -> bool:
        return self.is_dir() and any(Path(self.path).iterdir())

    def _lock_path(self) -> Path:
        return Path(self.path).parent / f".{self.name}.lock"


_BUCKET_FS: dict[tuple, Any] = {}


class Bucket(Location):
    """A prefix in an object store (``s3://``, ``gs://``), through ``pyarrow.fs``: every node
    with credentials sees it; every read, write and listing is a request."""

    over_network = True
    visible_everywhere = True
    _unwritable_hint = ", or check the bucket name and your credentials"

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}"

    def _open_fs(self) -> Any:
        # One per bucket per process: opening one asks the bucket's region (a request), and it
        # remembers what it sent (object_store)
        key = (self.scheme, self.path.split("/", 1)[0], os.environ.get("AWS_ENDPOINT_URL"))
        if key not in _BUCKET_FS:
            import pyarrow.fs as pafs

            try:
                fs, _ = pafs.FileSystem.from_uri(self.uri)
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with one line
                raise StudyError(f"cannot open storage {self.uri}: {_first_line(exc)}") from None
            _BUCKET_FS[key] = object_store(fs)
        return _BUCKET_FS[key]

    def _write_whole(self, target: str, data: bytes) -> None:
        with self.fs.open_output_stream(target) as f:  # one PUT
            f.write(data)

    def is_dir(self, rel: str = "") -> bool:
        """A prefix that holds at least one object."""
        return super().is_dir(rel) and bool(self._list(rel, recursive=False, limit_one=True))

    def _probe_write(self, probe: str) -> None:
        with self.fs.open_output_stream(self._join(probe)) as f:
            f.write(b"\0" * 1024)
        self.delete(probe)

    def ray_storage(self) -> dict[str, Any]:
        from ray import tune

        # Ray writes through the study's own filesystem (object_store: one PUT per small file,
        # retried requests, no directory markers); trial logs and TensorBoard files go to the
        # bucket too, not only checkpoints.
        return {"storage_path": self.path, "storage_filesystem": self.fs,
                "sync_config": tune.SyncConfig(sync_period=BUCKET_SYNC_EVERY_S, sync_artifacts=True)}


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
        with self.store.fs.open_output_stream(self.path, metadata=self.metadata) as f:
            f.write(data)
        self.store.sent[self.path] = digest


class _ObjectStore(_Handler):
    """pyarrow's S3 filesystem, through ``pyarrow.fs.PyFileSystem`` (see :func:`object_store`)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.fs = _s3(options)
        # What this process last uploaded to each key (a digest): Ray uploads its whole driver
        # folder at every sync of its state, every trial's logs included, so a study in a bucket
        # sent each finished trial's files again and again (quadratic in trials, BENCHMARKS §8b).
        self.sent: dict[str, bytes] = {}

    def __reduce__(self) -> tuple:
        return (_ObjectStore, (self.options,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ObjectStore) and other.options == self.options

    def __hash__(self) -> int:
        return hash(repr(sorted(self.options.items())))

    def get_type_name(self) -> str:
        return "s3"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> list:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        pass  # a prefix needs no marker object

    def delete_dir(self, path: str) -> None:
        self._forget(path.rstrip("/") + "/")
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._forget(path.rstrip("/") + "/")
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def _forget(self, prefix: str) -> None:
        for key in [k for k in self.sent if k.startswith(prefix)]:
            del self.sent[key]

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to empty a whole bucket")

    def delete_file(self, path: str) -> None:
        self.sent.pop(path, None)
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.sent.pop(src, None)
        self.sent.pop(dest, None)
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.sent.pop(dest, None)
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        import pyarrow as pa

        return pa.PythonFile(_Upload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.fs.open_append_stream(path, metadata=metadata)


RDB_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "mysql": "mysql+pymysql"}


def check_rdb_url(url: str) -> str:
    """An Optuna database URL as a study may record it: postgresql:// (or mysql://) in any form
    libpq documents that carries no secret: a user with no or an empty password, a host, a
    port, several ``host:port`` for failover, a Unix-domain socket directory (``?host=/path``,
    or percent-encoded as the host), ``sslmode`` and other options; host and database may be
    left to libpq's defaults. A password (libpq takes it from PGPASSWORD or ~/.pgpass) is
    refused. Returns the URL; a refusal never echoes it, which may hold the secret."""
    from urllib.parse import parse_qsl, urlsplit

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    base = scheme.split("+", 1)[0]
    if base not in RDB_DRIVERS:
        raise StudyError("--optuna-storage: give a postgresql://user@host:port/database (or mysql://) URL; "
                         "a study's own SQLite file is the default")
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    password = userinfo.partition(":")[2]
    query = parse_qsl(parts.query, keep_blank_values=True)
    if password or any(k.lower() == "password" and v for k, v in query):
        raise StudyError(f"--optuna-storage {base}://…: a password in the URL is refused (it would be written "
                         "into study.json and logs); give it through PGPASSWORD or ~/.pgpass")
    try:
        _host_list(hosts)
    except ValueError:
        raise StudyError(f"--optuna-storage {base}://…: the URL does not parse (host:port?), "
                         f"e.g. {base}://user@db.example.com:5432/studies") from None
    return url


def _host_list(hosts: str) -> list[tuple[str, str]]:
    """libpq's ``host[:port][,host[:port]...]``, hosts unquoted (a socket directory may be
    percent-encoded), IPv6 in brackets. Raises ValueError on a bad port."""
    from urllib.parse import unquote

    out = []
    for item in hosts.split(",") if hosts else []:
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(port)
        out.append((unquote(host), port))
    return out


def _sqlalchemy_url(url: str) -> str:
    """The URL for SQLAlchemy: postgresql:// goes through psycopg 3 (the `postgres` extra).
    SQLAlchemy reads one plain host from the URL's host part, so a socket directory, or
    several hosts, go to the query as psycopg takes them (``?host=...&host=...``); an empty
    password is dropped, so that libpq looks for one in PGPASSWORD and ~/.pgpass."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    def join(netloc: str, query: str) -> str:  # urlunsplit drops an empty netloc's '//'
        return f"{scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")

    parts = urlsplit(url)
    scheme = RDB_DRIVERS.get(parts.scheme.lower(), parts.scheme)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    listed = _host_list(hosts)
    plain = len(listed) <= 1 and all(not h.startswith("/") and "%" not in hosts for h, _ in listed)
    if scheme.startswith("mysql") or plain:
        return join(f"{user}@{hosts}" if at else hosts, parts.query)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if len(listed) == 1:
        host, port = listed[0]
        query = [("host", host), *([("port", port)] if port else []), *query]
    else:
        query = [("host", f"{h}:{p}" if p else h) for h, p in listed] + query
    return join(f"{user}@" if user else "", urlencode(query, safe="/:,"))


class OptunaDB:
    """Where a study's Optuna storage is: by default Optuna's journal file (``optuna.log``) in
    the study folder, worked on in a per-user cache and published as snapshots when the study
    is in a bucket; or a PostgreSQL/MySQL database every driver reaches (``--optuna-storage``),
    used directly. A study made before the journal keeps its SQLite file (``optuna.db``).

    The journal is appended to, one line per change, never rewritten: measured alone, 0.6 ms of
    CPU per trial against SQLite's 18 (BENCHMARKS §3e). One driver writes it (the study's lock);
    optuna-dashboard opens the file as it is, under Optuna's own file lock.

    Args:
        study: the study's folder (local or in a bucket).
        rdb: the database URL (no password), or None for the study's own file.
    """

    PUBLISH_EVERY_S = 30.0
    STALE_LOCK_S = 1.0  # Optuna's journal lock is held for one append: older, its holder died
    _file: str | None = None  # OptunaDBs pickled before the journal: found when first asked

    def __init__(self, study: Location, rdb: str | None = None) -> None:
        self.study = study
        self.rdb = rdb
        self.publish_seconds = 0.0  # time spent publishing snapshots in this process
        self.publishes = 0
        self.published_at = -math.inf
        self._open: Any = None  # the driver's journal storage, made once

    @property
    def file(self) -> str:
        """The study's own file: ``optuna.log``, or ``optuna.db`` for a study that has one and no journal."""
        if self._file is None:
            old = not self.study.is_file(OPTUNA_LOG) and self.study.is_file(OPTUNA_DB)
            self._file = OPTUNA_DB if old else OPTUNA_LOG
        return self._file

    @property
    def journal(self) -> bool:
        return self.rdb is None and self.file == OPTUNA_LOG

    @property
    def path(self) -> Path:
        """The working copy: the study's own file where it is local, else a per-user cache file."""
        return self.study.working_path(self.file)

    @property
    def published(self) -> bool:
        """The working copy is a copy: snapshots of it are what the study keeps."""
        return self.rdb is None and self.study.local_path(self.file) is None

    @property
    def url(self) -> str:
        """What ``optuna.load_study`` (through :func:`open_optuna`) and optuna-dashboard take: the
        database's SQLAlchemy URL, or the working copy's path (``sqlite:///`` for an old study)."""
        if self.rdb:
            return _sqlalchemy_url(self.rdb)
        return str(self.path) if self.journal else f"sqlite:///{self.path}"

    def storage(self) -> Any:
        """The storage this driver writes to (hold the study's lock first)."""
        import optuna

        if self.rdb:
            try:
                # pool_pre_ping: a driver outlives idle connections a database or proxy drops
                return optuna.storages.RDBStorage(self.url, engine_kwargs={"pool_pre_ping": True})
            except Exception as exc:  # noqa: BLE001 - sqlalchemy's and the driver's errors, said in one line
                raise StudyError(f"cannot open the Optuna database {self.display}: {_rdb_reason(exc)}") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.journal:
            return optuna.storages.RDBStorage(self.url)
        if self._open is None:
            mend_journal(self.path, self.STALE_LOCK_S)
            self._open = journal_storage(self.path)
        return self._open

    @property
    def display(self) -> str:
        """Where the storage is, for messages (the URL holds no password: check_rdb_url)."""
        return self.rdb or str(self.study / self.file)

    def has_study(self, name: str) -> bool:
        import optuna

        if not self.rdb and not self.path.is_file():
            return False
        return name in {s.study_name for s in optuna.get_all_study_summaries(self.storage(), include_best_trial=False)}

    def delete_study(self, name: str) -> None:
        import optuna

        if self.has_study(name):
            optuna.delete_study(study_name=name, storage=self.storage())

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """One driver per study on a shared database, on any machine: a PostgreSQL advisory
        lock (MySQL: GET_LOCK) held by one connection while the study runs; the database frees
        it when that driver's connection ends, a crash included. Taken before Ray starts, its
        connection is also the check that the database is reachable (host, password, driver).
        The SQLite file needs none: the study folder's lock covers it."""
        if not self.rdb:
            yield
            return
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        key = int.from_bytes(hashlib.sha256(f"vae-study:{name}".encode()).digest()[:8], "big", signed=True)
        mysql = self.url.startswith("mysql")
        try:
            engine = sa.create_engine(self.url, poolclass=NullPool)
            conn = engine.connect()
            got = conn.execute(sa.text("SELECT GET_LOCK(:k, 0)" if mysql else "SELECT pg_try_advisory_lock(:k)"),
                               {"k": f"vae-study:{name}" if mysql else key}).scalar()
        except Exception as exc:  # noqa: BLE001
            raise StudyError(f"cannot open the Optuna database {self.display}: {_rdb_reason(exc)}") from None
        if not got:
            conn.close()
            engine.dispose()
            raise StudyError(f"study {name!r} is running from another driver on {self.display}; wait for it, "
                             "or stop it first (one driver per study)")
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                conn.execute(sa.text("SELECT RELEASE_LOCK(:k)" if mysql else "SELECT pg_advisory_unlock(:k)"),
                             {"k": f"vae-study:{name}" if mysql else key})
            conn.close()
            engine.dispose()

    def reset(self) -> None:
        """A new study: a journal, and no working copy left from an earlier study at the same URI."""
        self._file, self._open = OPTUNA_LOG, None
        if self.rdb is None and self.study.local_path(OPTUNA_LOG) is None:
            for name in (OPTUNA_LOG, OPTUNA_DB):
                for suffix in ("", "-journal", "-wal", "-shm", ".lock"):
                    Path(f"{self.study.working_path(name)}{suffix}").unlink(missing_ok=True)

    def fetch(self) -> bool:
        """Resume: replace the working copy with the published snapshot. False if there is none."""
        if self.rdb:
            return True
        if not self.published:
            return self.path.is_file()
        if not self.study.is_file(self.file):
            return False
        file = self.file
        self.reset()
        self._file = file
        self.study.download(file, self.path)
        return True

    def publish(self, *, force: bool = True) -> None:
        """Upload a consistent snapshot of the working copy, whole (nothing to do where it is
        local). Unless ``force``, at most every ``PUBLISH_EVERY_S``: the snapshot is a copy
        for optuna-dashboard and for ``resume``, which mends what it lacks from the trials
        table (``study.restore``), so it need not follow every trial; uploaded at every event,
        its bytes grew with the square of the trials (BENCHMARKS §8)."""
        if not self.published or not self.path.is_file():
            return
        if not force and time.monotonic() - self.published_at < self.PUBLISH_EVERY_S:
            return
        self.published_at = time.monotonic()
        t0 = time.perf_counter()
        if self.journal:  # whole lines only: this driver is the one writer, between its appends
            data = self.path.read_bytes()
            self.study.write_bytes(OPTUNA_LOG, data[:data.rfind(b"\n") + 1])
        else:
            snap = self.path.with_name(f".{OPTUNA_DB}.{uuid.uuid4().hex[:8]}.snapshot")
            try:
                with contextlib.closing(sqlite3.connect(self.path)) as src, \
                        contextlib.closing(sqlite3.connect(snap)) as dst:
                    src.backup(dst)
                self.study.upload(snap, OPTUNA_DB)
            finally:
                snap.unlink(missing_ok=True)
        self.publish_seconds += time.perf_counter() - t0
        self.publishes += 1

    @contextlib.contextmanager
    def read_copy(self) -> Iterator[Any]:
        """The study's Optuna storage to read from (the database; the study's file; a temporary
        download of its snapshot), or None when there is none. Writes nothing to the study."""
        if self.rdb:
            yield self.url
            return
        if not self.published:
            yield open_optuna(self.url) if self.path.is_file() else None
            return
        if not self.study.is_file(self.file):
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="vae-optuna-") as tmp:
            copy = self.study.download(self.file, Path(tmp) / self.file)
            yield open_optuna(str(copy) if self.journal else f"sqlite:///{copy}")

    def __getstate__(self) -> dict[str, Any]:
        return {"study": self.study, "rdb": self.rdb, "_file": self._file, "publish_seconds": 0.0, "publishes": 0,
                "published_at": -math.inf, "_open": None}


def journal_storage(path: str | os.PathLike) -> Any:
    """Optuna's journal storage on a file, with Optuna's own file lock (as optuna-dashboard opens
    it), appended to without an fsync each time (:func:`_journal_backend`)."""
    import optuna

    return optuna.storages.JournalStorage(_journal_backend()(str(path)))


@functools.lru_cache(maxsize=1)
def _journal_backend() -> type:
    """Optuna's ``JournalFileBackend``, less its fsync after every append (8 per trial: 8.5% of a
    1,000-trial driver's main thread, BENCHMARKS §3e). A study survives its driver's kill, whose
    writes the kernel keeps, not the machine's crash: its Parquet rows are not synced either. A
    future Optuna without the attributes used here gets its own append back."""
    import json

    from optuna.storages.journal import JournalFileBackend

    class Journal(JournalFileBackend):
        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            lock, path = getattr(self, "_lock", None), getattr(self, "_file_path", None)
            if lock is None or path is None:
                return super().append_logs(logs)
            data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode("utf-8")
            lock.acquire()
            try:
                with open(path, "ab") as f:
                    f.write(data)
            finally:
                lock.release()
            return None

    return Journal


def open_optuna(where: str) -> Any:
    """What ``optuna.load_study`` takes for ``where``: a database URL as it is (``sqlite:///``,
    ``postgresql://``), a journal file's path as Optuna's journal storage on it."""
    return where if "://" in where else journal_storage(where)


def mend_journal(path: Path, stale_s: float) -> None:
    """Make a journal a driver killed mid-append left whole again, before this driver appends:
    cut a last line it did not finish (Optuna's reader skips it, but an append after it would
    join the two into one unreadable line), and free the file lock it held (Optuna would wait
    30 s for it) if older than ``stale_s``."""
    lock = Path(f"{path}.lock")
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.lstat().st_mtime > stale_s:
            lock.unlink()
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            chunk = f.read(end - start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                end = start + at + 1
                break
            end = start
        if end != size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


def _rdb_reason(exc: BaseException) -> str:
    """The driver's own reason, one line (libpq's messages name no password)."""
    seen = exc.__cause__ or exc.__context__ or exc
    if isinstance(exc, ModuleNotFoundError) or isinstance(seen, ModuleNotFoundError):
        missing = getattr(exc, "name", None) or getattr(seen, "name", "")
        return f"its driver is not installed ({missing}): pip install 'vae-study[postgres]'"
    lines = [ln.strip() for ln in str(getattr(exc, "orig", None) or exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def study_location(storage: str | os.PathLike | Location, name: str) -> Location:
    """The folder of study ``name`` under a storage root."""
    return Location(storage) / name


def is_study(loc: Location) -> bool:
    return loc.is_file(SPEC_FILE) or loc.is_dir("trials")


def find_studies(loc: Location) -> list[Location]:
    """Study folders at ``loc``: the folder itself if it is one, else its children that are."""
    if is_study(loc):
        return [loc]
    return [loc / n for n in loc.folders() if is_study(loc / n)]


def _parse(where: str) -> tuple[str, str]:
    if "://" not in where:
        return "file", str(Path(where).expanduser().resolve())
    scheme, _, rest = where.partition("://")
    scheme = scheme.lower()
    if scheme == "file":
        return "file", str(Path(rest).expanduser().resolve())
    if scheme not in REMOTE_SCHEMES:
        raise StudyError(f"storage {where!r}: unknown scheme {scheme}://; use a folder, s3://bucket/prefix or "
                         "gs://bucket/prefix")
    rest = rest.strip("/")
    if "@" in rest.split("/")[0]:
        # Never echo it: the part before '@' would be a key.
        raise StudyError(f"storage {scheme}://…: credentials in the URI are refused; give them through the "
                         "environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, an instance role) or gcloud's default login")
    if "?" in rest:
        raise StudyError(f"storage {scheme}://{rest.split('?')[0]}?…: options in the URI are refused; set "
                         "AWS_ENDPOINT_URL / AWS_DEFAULT_REGION in the environment instead")
    if not rest or rest.split("/")[0] in ("", ".", ".."):
        raise StudyError(f"storage {where!r} names no bucket: use {scheme}://bucket/prefix")
    return scheme, rest


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
