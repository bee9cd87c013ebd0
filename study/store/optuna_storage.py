"""The Optuna study's storage: Optuna's journal file in the study folder (a working copy in a
local cache, published as snapshots, for a study in a bucket), its mend after a driver killed
mid-append, a study's older SQLite file, and PostgreSQL/MySQL URLs in libpq's forms.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from study.errors import StudyError
from study.store.layout import OPTUNA_DB, OPTUNA_LOG
from study.store import outage
from study.store.location import Location

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
        table (``study.runner.restore``), so it need not follow every trial; uploaded at every event,
        its bytes grew with the square of the trials (BENCHMARKS §8).

        Where the storage fails (an outage past the study's patience), the study stops on it
        (``outage.give_up``), and a study that has given up publishes nothing more: the last
        snapshot stands, and ``resume`` mends what it lacks."""
        if not self.published or not self.path.is_file() or outage.gave_up() is not None:
            return
        try:
            self._publish(force)
        except StudyError as exc:
            outage.give_up(exc)

    def _publish(self, force: bool) -> None:
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
