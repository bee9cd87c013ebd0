"""Where a study lives: a local or mounted folder, or a prefix in a bucket, and the one place
that reads and writes its files.

A :class:`Location` is a folder on a file system (``/data/studies``, ``file:///data/studies``)
or a prefix in an object store (``s3://bucket/prefix``, ``gs://bucket/prefix``), reached
through ``pyarrow.fs`` (``study.store.objectstore``). pyarrow finds credentials itself: the
standard AWS variables, ``AWS_ENDPOINT_URL``, the instance role, or Google's application-default
credentials. They are never stored, pickled or printed by this module.

Every write is whole: on a file system a temporary name in the same folder, then
``os.replace``; on an object store one PUT. A reader never sees half a file. What a study
folder holds is named in ``study.store.layout``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

from study.errors import StorageUnreachable, StudyError
from study.store.layout import SPEC_FILE
from study.store.objectstore import object_store

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
        except StorageUnreachable:  # said whole: the study stops on it
            raise
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
        except StorageUnreachable:  # said whole: the study stops on it
            raise
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
        except StorageUnreachable:  # said whole: the study stops on it
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
        except StorageUnreachable:  # said whole: the study stops on it
            raise
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
        except StorageUnreachable:  # said whole: the study stops on it
            raise
        except OSError as exc:
            raise StudyError(f"cannot delete {self.uri}/{rel}: {_first_line(exc)}") from None

    def delete_tree(self, rel: str = "") -> None:
        """Remove a folder and everything in it (nothing happens if it does not exist)."""
        if not self.exists(rel):
            return
        try:
            self.fs.delete_dir(self._join(rel))
        except StorageUnreachable:  # said whole: the study stops on it
            raise
        except OSError as exc:
            raise StudyError(f"cannot delete {self.uri}/{rel}: {_first_line(exc)}") from None

    def ensure_dir(self, rel: str = "") -> None:
        """Make the folder where folders exist (a bucket has none to make)."""

    def check_writable(self) -> None:
        """Fail before any trial starts when the storage cannot take a file; writes nothing that stays."""
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            self._probe_write(probe)
        except StorageUnreachable:  # said whole: the study stops on it
            raise
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
        except StorageUnreachable:  # said whole: the study stops on it
            raise
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
