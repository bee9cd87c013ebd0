"""The Parquet results table: schema, atomic writers, readers and queries.

Layout, one file per trial per table::

    <root>/<study>/trials/<trial_id>.parquet   one row per trial
    <root>/<study>/epochs/<trial_id>.parquet   one row per trial per epoch
    <root>/<study>/digits/<trial_id>.parquet   one row per trial x split x recon_mode x digit

Writes are atomic: a temporary name in the same folder, then ``os.replace`` (a single PUT on an
object store). Readers take the union of the files' schemas and skip, with a warning, any file
that cannot be read, so a query never sees half a file and one bad file costs only its rows.
pandas, pyarrow, DuckDB and polars read the folders unchanged.
"""
from __future__ import annotations

import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from study.errors import StudyError

SCHEMA_VERSION = 1
TABLES = ("trials", "epochs", "digits")

# Columns every trials file carries, in order; readers union with anything newer.
TRIAL_COLUMNS: dict[str, pa.DataType] = {
    "study": pa.string(),
    "trial_id": pa.string(),
    "status": pa.string(),  # completed | pruned | failed
    "error": pa.string(),
    "param_latent_dim": pa.int64(),
    "param_beta": pa.float64(),
    "param_lr": pa.float64(),
    "param_batch_size": pa.int64(),
    "param_arch": pa.string(),
    "param_hidden": pa.int64(),
    "param_epochs": pa.int64(),
    "param_seed": pa.int64(),
    "dataset": pa.string(),
    "best_epoch": pa.int64(),
    "epochs_run": pa.int64(),
    "val_elbo": pa.float64(),
    "val_recon": pa.float64(),
    "val_kl": pa.float64(),
    "val_mse": pa.float64(),
    "test_elbo": pa.float64(),
    "test_mse": pa.float64(),
    "test_psnr": pa.float64(),
    "objective": pa.float64(),
    "train_seconds": pa.float64(),
    "images_per_second": pa.float64(),
    "setup_seconds": pa.float64(),
    "attempts": pa.int64(),
    "node": pa.string(),
    "hostname": pa.string(),
    "device": pa.string(),
    "precision": pa.string(),
    "torch_version": pa.string(),
    "ray_version": pa.string(),
    "optuna_version": pa.string(),
    "git_sha": pa.string(),
    "checkpoint": pa.string(),
    "started_at": pa.timestamp("us", tz="UTC"),
    "finished_at": pa.timestamp("us", tz="UTC"),
    "schema_version": pa.int64(),
}
EPOCH_COLUMNS: dict[str, pa.DataType] = {
    "study": pa.string(),
    "trial_id": pa.string(),
    "epoch": pa.int64(),
    "train_loss": pa.float64(),
    "train_recon": pa.float64(),
    "train_kl": pa.float64(),
    "val_loss": pa.float64(),
    "val_elbo": pa.float64(),
    "val_recon": pa.float64(),
    "val_kl": pa.float64(),
    "val_mse": pa.float64(),
    "seconds": pa.float64(),
    "val_seconds": pa.float64(),
    "images_per_second": pa.float64(),
}
DIGIT_COLUMNS: dict[str, pa.DataType] = {
    "study": pa.string(),
    "trial_id": pa.string(),
    "split": pa.string(),
    "recon_mode": pa.string(),
    "digit": pa.int64(),
    "n_images": pa.int64(),
    "mse": pa.float64(),
    "psnr": pa.float64(),
}
COLUMNS = {"trials": TRIAL_COLUMNS, "epochs": EPOCH_COLUMNS, "digits": DIGIT_COLUMNS}

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
COMPACTED = "_compacted.parquet"  # one file per table holding many finished trials (see compact)


def study_dir(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / name


def _arrow_table(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    known = COLUMNS[table]
    extra = sorted({k for r in rows for k in r} - set(known))
    arrays, names = [], []
    for col in [*known, *extra]:
        typ = known.get(col)
        values = [r.get(col) for r in rows]
        if typ is not None and not pa.types.is_floating(typ):
            values = [None if _missing(v) else v for v in values]  # rows that came through pandas
        arrays.append(pa.array(values, type=typ) if typ is not None else pa.array(values))
        names.append(col)
    return pa.Table.from_arrays(arrays, names=names)


def _missing(value: Any) -> bool:
    return value is None or value is pd.NaT or (isinstance(value, float) and value != value)


def write_rows(root: str | os.PathLike, study: str, table: str, trial_id: str, rows: list[dict[str, Any]]) -> Path:
    """Atomically (re)write one trial's rows of one table."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    if not _SAFE_ID.match(trial_id):
        raise ValueError(f"unsafe trial id {trial_id!r}")
    folder = study_dir(root, study) / table
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{trial_id}.parquet"
    tmp = folder / f".{trial_id}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(_arrow_table(table, rows), tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_trial(
    root: str | os.PathLike,
    study: str,
    trial_id: str,
    trial: dict[str, Any],
    epochs: list[dict[str, Any]],
    digits: list[dict[str, Any]],
) -> None:
    """Write a finished trial's three tables. The trials row goes last: its presence means done."""
    base = {"study": study, "trial_id": trial_id}
    write_rows(root, study, "epochs", trial_id, [{**base, **r} for r in epochs])
    write_rows(root, study, "digits", trial_id, [{**base, **r} for r in digits])
    write_rows(root, study, "trials", trial_id, [{**base, "schema_version": SCHEMA_VERSION, **trial}])


def table_files(path: str | os.PathLike, table: str) -> list[Path]:
    """The Parquet files of ``table`` under ``path``: a study folder, or a root of studies."""
    path = Path(path)
    if (path / table).is_dir():
        folders = [path / table]
    else:
        folders = sorted(p / table for p in path.iterdir() if (p / table).is_dir()) if path.is_dir() else []
    return [f for folder in folders for f in sorted(folder.glob("*.parquet"))]


def find_studies(path: str | os.PathLike) -> list[Path]:
    """Study folders at ``path``: the folder itself if it is one, else its children that are."""
    path = Path(path)
    if _is_study(path):
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if _is_study(p))
    return []


def _is_study(p: Path) -> bool:
    return p.is_dir() and ((p / "study.json").is_file() or (p / "trials").is_dir())


def load(path: str | os.PathLike, table: str = "trials", *, on_skip: Any = None) -> pd.DataFrame:
    """Read one table of a study folder (or of every study under a root) as a DataFrame.

    Works while a study runs: only complete files exist under their final names. Schemas are
    unioned across files; a file that cannot be read is skipped and reported through
    ``on_skip(path, reason)`` (default: a warning).

    Raises:
        StudyError: the folder does not exist or holds no study.
    """
    if table not in TABLES:
        raise StudyError(f"unknown table {table!r}: choose one of {', '.join(TABLES)}")
    path = Path(path)
    if not path.exists():
        raise StudyError(f"results folder {path} does not exist")
    if not find_studies(path):
        raise StudyError(f"{path} holds no study (no study.json or trials/ folder); pass a study folder or its root")
    merged = read_arrow(path, table, on_skip=on_skip)
    return _empty_frame(table) if merged is None else merged.to_pandas()


def read_arrow(path: str | os.PathLike, table: str, *, on_skip: Any = None) -> pa.Table | None:
    """The union of a table's files under ``path`` as one Arrow table (None when there are none)."""
    tables = []
    files = table_files(path, table)
    # A trial's own file wins over its rows in a compacted file (a trial rewritten after
    # compaction, or the moment between writing the compacted file and removing the originals).
    own = {(f.parent, f.stem) for f in files if f.name != COMPACTED}
    for f in files:
        try:
            t = pq.read_table(f)
        except Exception as exc:  # corrupt or foreign file: report it, keep the rest
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if on_skip is not None:
                on_skip(f, reason)
            else:
                warnings.warn(f"skipped unreadable results file {f}: {reason}", stacklevel=2)
            continue
        if f.name == COMPACTED:
            shadowed = [stem for parent, stem in own if parent == f.parent]
            if shadowed:
                import pyarrow.compute as pc

                t = t.filter(pc.invert(pc.is_in(t.column("trial_id"), value_set=pa.array(shadowed))))
        tables.append(t)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def compact(study: str | os.PathLike) -> dict[str, int]:
    """Merge a study's per-trial files into one ``_compacted.parquet`` per table.

    The rows do not change (``load`` returns the same frame before and after). The compacted
    file is written atomically first, then the per-trial files it holds are removed; readers
    prefer a trial's own file, so no moment shows a row twice. Returns files merged per table.
    """
    folder = Path(study)
    if not (folder / "trials").is_dir():
        raise StudyError(f"{folder} holds no study results to compact")
    merged: dict[str, int] = {}
    for table in TABLES:
        tdir = folder / table
        if not tdir.is_dir():
            continue
        singles = [f for f in sorted(tdir.glob("*.parquet")) if f.name != COMPACTED]
        if not singles:
            merged[table] = 0
            continue
        arrow = read_arrow(folder, table)
        tmp = tdir / f".{COMPACTED}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            pq.write_table(arrow, tmp)
            os.replace(tmp, tdir / COMPACTED)
        finally:
            if tmp.exists():
                tmp.unlink()
        for f in singles:
            f.unlink()
        merged[table] = len(singles)
    return merged


def _empty_frame(table: str) -> pd.DataFrame:
    return pa.schema(list(COLUMNS[table].items())).empty_table().to_pandas()


def query(
    df: pd.DataFrame,
    *,
    where: str | None = None,
    sort: str | None = None,
    desc: bool = False,
    top: int | None = None,
    columns: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Filter (a SQL WHERE clause, run by DuckDB), sort, cut and select columns.

    Raises:
        StudyError: unknown column, or a WHERE clause DuckDB cannot parse.
    """
    cols = list(columns) if columns else None
    for c in ([sort] if sort else []) + (cols or []):
        if c not in df.columns:
            raise StudyError(f"unknown column {c!r}; columns are: {', '.join(df.columns)}")
    if where:
        import duckdb

        con = duckdb.connect()
        try:
            con.register("t", df)
            df = con.execute(f"SELECT * FROM t WHERE {where}").df()
        except duckdb.Error as exc:
            msg = str(exc).splitlines()[0]
            raise StudyError(f"invalid --where {where!r}: {msg}") from exc
        finally:
            con.close()
    if sort:
        df = df.sort_values(sort, ascending=not desc, na_position="last", kind="stable")
    if top is not None:
        if top < 1:
            raise StudyError(f"--top {top} must be at least 1")
        df = df.head(top)
    if cols:
        df = df[cols]
    return df.reset_index(drop=True)
