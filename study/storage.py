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
    optuna.db        the Optuna study (SQLite); on a bucket, a snapshot of the driver's working copy
    tune/            Ray Tune's experiment: trial logs (TensorBoard event files), checkpoints, state
    trials/ epochs/ digits/   the Parquet results table (study.results)
    report/          index.html, PNGs, summary.json, cache/
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from study.errors import StudyError

SPEC_FILE = "study.json"
OPTUNA_DB = "optuna.db"
TUNE_DIR = "tune"
REPORT_DIR = "report"
REMOTE_SCHEMES = ("s3", "gs")


class Location:
    """A folder, local or in a bucket, with whole-file reads and writes relative to it.

    Args:
        where: a path, ``file://`` URI, or ``s3://`` / ``gs://`` URI.
    """

    def __init__(self, where: str | os.PathLike | "Location") -> None:
        if isinstance(where, Location):
            self.scheme, self.path = where.scheme, where.path
        else:
            self.scheme, self.path = _parse(str(where))
        self._fs: Any = None

    # ------------------------------------------------------------------ identity

    @property
    def remote(self) -> bool:
        """True for an object store (``s3://``, ``gs://``)."""
        return self.scheme in REMOTE_SCHEMES

    @property
    def uri(self) -> str:
        """``/abs/path`` for a file system, ``s3://bucket/prefix`` for a bucket."""
        return f"{self.scheme}://{self.path}" if self.remote else self.path

    @property
    def local(self) -> Path | None:
        """The folder as a local ``Path``, or None on an object store."""
        return None if self.remote else Path(self.path)

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

    def _with_path(self, path: str) -> "Location":
        loc = Location.__new__(Location)
        loc.scheme, loc.path, loc._fs = self.scheme, path, self._fs
        return loc

    def _join(self, rel: str) -> str:
        rel = rel.strip("/")
        return posixpath.join(self.path, rel) if rel else self.path

    @property
    def fs(self) -> Any:
        """The ``pyarrow.fs.FileSystem`` behind this location."""
        if self._fs is None:
            import pyarrow.fs as pafs

            if not self.remote:
                self._fs = pafs.LocalFileSystem()
            else:
                try:
                    self._fs, _ = pafs.FileSystem.from_uri(self.uri)
                except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with one line
                    raise StudyError(f"cannot open storage {self.uri}: {_first_line(exc)}") from None
        return self._fs

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

        info = self._info(rel)
        if info.type != pafs.FileType.Directory:
            return False
        if not self.remote:
            return True
        return bool(self._list(rel, recursive=False, limit_one=True))

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
        import pyarrow.fs as pafs

        return sorted(i.base_name for i in self._list(rel, recursive=False)
                      if i.type == pafs.FileType.File and i.base_name.endswith(suffix))

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
        """Write a whole file: a temporary name then ``os.replace`` locally; one PUT on a bucket."""
        target = self._join(rel)
        try:
            if self.remote:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
                return
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            raise StudyError(f"cannot write {self.uri}/{rel}: {_first_line(exc)}") from None

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
        """Create the folder on a file system (a bucket has no folders to create)."""
        if not self.remote:
            try:
                os.makedirs(self._join(rel), exist_ok=True)
            except OSError as exc:
                raise StudyError(f"storage {self.uri} is not writable ({_first_line(exc)}): "
                                 "choose another --storage") from None

    def check_writable(self) -> None:
        """Fail before any trial starts when the storage cannot take a file; writes nothing that stays."""
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            if self.remote:
                with self.fs.open_output_stream(self._join(probe)) as f:
                    f.write(b"\0" * 1024)
            else:
                # Only probe inside a folder that exists: creating one would leave it behind.
                folder = self._nearest_existing_dir()
                path = os.path.join(folder, probe)
                try:
                    with open(path, "wb") as f:
                        f.write(b"\0" * 65536)
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    if os.path.exists(path):
                        os.unlink(path)
                return
        except OSError as exc:
            raise StudyError(f"storage {self.uri} is not writable ({_first_line(exc)}): "
                             "choose another --storage" + (", or check the bucket name and your credentials"
                                                           if self.remote else "")) from None
        self.delete(probe)

    def _nearest_existing_dir(self) -> str:
        path = self.path
        while not os.path.isdir(path):
            if os.path.exists(path):
                raise NotADirectoryError(20, "Not a directory", path)
            up = os.path.dirname(path)
            if up == path:
                break
            path = up
        return path


class OptunaDB:
    """Where a study's Optuna SQLite file is worked on, and where it is kept.

    Args:
        study: the study's folder (local or in a bucket).
    """

    def __init__(self, study: Location) -> None:
        self.study = study
        self.publish_seconds = 0.0  # time spent publishing snapshots in this process
        self.publishes = 0

    @property
    def path(self) -> Path:
        """The working copy: the study's own file on a file system, else a per-study local cache file."""
        if self.study.local is not None:
            return self.study.local / OPTUNA_DB
        from vae.data import cache_dir

        key = hashlib.sha256(self.study.uri.encode()).hexdigest()[:16]
        return cache_dir() / "optuna" / key / OPTUNA_DB

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def storage(self) -> Any:
        import optuna

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(self.url)

    def reset(self) -> None:
        """A new study: no working copy left from an earlier study at the same URI."""
        if self.study.remote:
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def fetch(self) -> bool:
        """Resume: replace the working copy with the published snapshot. False if there is none."""
        if not self.study.remote:
            return self.path.is_file()
        if not self.study.is_file(OPTUNA_DB):
            return False
        self.reset()
        self.study.download(OPTUNA_DB, self.path)
        return True

    def publish(self) -> None:
        """Upload a consistent snapshot of the working copy, whole (no-op on a file system)."""
        if not self.study.remote or not self.path.is_file():
            return
        t0 = time.perf_counter()
        snap = self.path.with_name(f".{OPTUNA_DB}.{uuid.uuid4().hex[:8]}.snapshot")
        try:
            with contextlib.closing(sqlite3.connect(self.path)) as src, contextlib.closing(sqlite3.connect(snap)) as dst:
                src.backup(dst)
            self.study.upload(snap, OPTUNA_DB)
        finally:
            snap.unlink(missing_ok=True)
        self.publish_seconds += time.perf_counter() - t0
        self.publishes += 1

    @contextlib.contextmanager
    def read_copy(self) -> Iterator[Path | None]:
        """A local file to read the study from (a temporary download on a bucket), or None."""
        if not self.study.remote:
            yield self.path if self.path.is_file() else None
            return
        if not self.study.is_file(OPTUNA_DB):
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="vae-optuna-") as tmp:
            yield self.study.download(OPTUNA_DB, Path(tmp) / OPTUNA_DB)

    def __getstate__(self) -> dict[str, Any]:
        return {"study": self.study, "publish_seconds": 0.0, "publishes": 0}


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
