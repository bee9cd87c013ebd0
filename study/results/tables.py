"""The Parquet results table: schema, atomic writers, readers and queries.

Layout, one file per trial per table::

    <root>/<study>/trials/<trial_id>.parquet   one row per trial
    <root>/<study>/epochs/<trial_id>.parquet   one row per trial per epoch
    <root>/<study>/digits/<trial_id>.parquet   one row per trial x split x recon_mode x digit

Every file is written whole through ``study.store``: a temporary name in the same folder, then
``os.replace``, or a single PUT on an object store. Readers take the union of the files' schemas and skip, with a warning, any file
that cannot be read, so a query never sees half a file and one bad file costs only its rows.
pandas, pyarrow, DuckDB and polars read the folders unchanged.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, Iterable, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from study.errors import StudyError
from study.spec.space import COLUMNS as PARAM_COLUMNS
from study.store import Location, find_studies

StudyPath = Union[str, "os.PathLike[str]", Location]  # a folder, or an s3:// / gs:// URI

SCHEMA_VERSION = 1
TABLES = ("trials", "epochs", "digits")

# Columns every trials file carries, in order; readers union with anything newer.
TRIAL_COLUMNS: dict[str, pa.DataType] = {
    "study": pa.string(),
    "trial_id": pa.string(),
    "status": pa.string(),  # completed | pruned | failed | refit (study.runner.refit: not a trial of the search)
    "refit_of": pa.string(),  # a refit row: the winner whose configuration it retrained
    "error": pa.string(),
    **{column: getattr(pa, arrow)() for column, arrow in PARAM_COLUMNS.items()},  # study.spec.space
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
    # in the trial, up to its last report: waiting in tune.report, and persisting checkpoints
    "report_seconds": pa.float64(),
    "checkpoint_seconds": pa.float64(),
    "attempts": pa.int64(),
    "restored_from_epoch": pa.int64(),  # the checkpoint the last attempt continued from (0: none)
    "node": pa.string(),
    "hostname": pa.string(),
    "device": pa.string(),
    "pack": pa.string(),  # the pack it trained in (study.runner.packing); null: it trained alone
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
    "pack_members": pa.int64(),  # members trained in the pack's round beside this epoch (null: alone)
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
# One file per table holding many finished trials (see compact). Its name starts with neither '_'
# nor '.', which pyarrow's and polars' folder readers skip. Studies compacted by older versions
# hold _compacted.parquet, which is read the same way.
COMPACTED = "compacted.parquet"
_COMPACTED_NAMES = (COMPACTED, "_compacted.parquet")


def _is_compacted(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] in _COMPACTED_NAMES
FINISHED = ("completed", "pruned")  # statuses of trials that produced a usable model
REFIT = "refit"  # the status of a refit row (study.runner.refit): the winner retrained, not a trial of the search


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


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_rows(study: StudyPath, table: str, trial_id: str, rows: list[dict[str, Any]]) -> str:
    """Write one trial's rows of one table, whole (replacing what was there)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    if not _SAFE_ID.match(trial_id) or f"{trial_id}.parquet" in _COMPACTED_NAMES:
        raise ValueError(f"unsafe trial id {trial_id!r}")
    rel = f"{table}/{trial_id}.parquet"
    Location(study).write_bytes(rel, parquet_bytes(_arrow_table(table, rows)))
    return rel


def write_trial(
    study: StudyPath,
    trial_id: str,
    trial: dict[str, Any],
    epochs: list[dict[str, Any]],
    digits: list[dict[str, Any]],
) -> None:
    """Write a finished trial's three tables. The trials row goes last: its presence means done."""
    loc = Location(study)
    base = {"study": loc.name, "trial_id": trial_id}
    write_rows(loc, "epochs", trial_id, [{**base, **r} for r in epochs])
    write_rows(loc, "digits", trial_id, [{**base, **r} for r in digits])
    write_rows(loc, "trials", trial_id, [{**base, "schema_version": SCHEMA_VERSION, **trial}])


def table_files(path: StudyPath, table: str) -> list[tuple[Location, str]]:
    """(study folder, relative path) of each Parquet file of ``table`` under ``path`` (a study
    folder, or a root of studies) that holds rows to read: in a compacted folder, the compacted
    file and the trials' own files written since it (a bucket keeps the ones it covers: see
    :func:`compact`)."""
    out = []
    for study in find_studies(Location(path)):
        files = study.files_modified(table, ".parquet")
        compacted = sorted((files[n] is not None, files[n] or 0, n) for n in _COMPACTED_NAMES if n in files)
        newest = compacted[-1][2] if compacted else None  # an older version's name, or both
        since = files[newest] if newest else None
        out += [(study, f"{table}/{name}") for name, mtime in sorted(files.items())
                if name == newest or (not _is_compacted(name) and (since is None or mtime is None or mtime >= since))]
    return out


def load(path: StudyPath, table: str = "trials", *, on_skip: Any = None) -> pd.DataFrame:
    """Read one table of a study folder (or of every study under a root) as a DataFrame.

    ``path`` is a folder or an ``s3://`` / ``gs://`` URI. Works while a study runs: only complete
    files exist under their final names. Schemas are unioned across files; a file that cannot be
    read is skipped and reported through ``on_skip(path, reason)`` (default: a warning).

    Raises:
        StudyError: the folder does not exist or holds no study.
    """
    if table not in TABLES:
        raise StudyError(f"unknown table {table!r}: choose one of {', '.join(TABLES)}")
    loc = Location(path)
    if not loc.exists():
        raise StudyError(f"results folder {loc} does not exist")
    if not find_studies(loc):
        raise StudyError(f"{loc} holds no study (no study.json or trials/ folder); pass a study folder or its root")
    merged = read_arrow(loc, table, on_skip=on_skip)
    return _empty_frame(table) if merged is None else merged.to_pandas()


def read_arrow(path: StudyPath, table: str, *, on_skip: Any = None) -> pa.Table | None:
    """The union of a table's files under ``path`` as one Arrow table (None when there are none)."""
    for attempt in range(5):
        files = table_files(path, table)
        # A trial's own file wins over its rows in a compacted file (a trial rewritten after
        # compaction, or the moment between writing the compacted file and removing the originals).
        own: dict[Location, list[str]] = {}
        for study, rel in files:
            if not _is_compacted(rel):
                own.setdefault(study, []).append(rel.rsplit("/", 1)[1].removesuffix(".parquet"))
        # Read in batches, each merged into one table as it is read: a one-row table read from
        # its own file holds some 60 KB (a buffer per column), 0.6 GB over 10,000 trials.
        parts, gone = [], False
        for i in range(0, len(files), READ_BATCH):
            batch = files[i:i + READ_BATCH]
            got = _read_all(batch)
            # A file listed but gone when read was merged by ``compact`` meanwhile: list again
            # (the last time, it is reported and skipped as an unreadable file is).
            if attempt < 4 and any(isinstance(g, FileNotFoundError) for g in got):
                gone = True
                break
            part = _union(batch, got, on_skip, own)
            if part is not None:
                parts.append(part.combine_chunks() if len(batch) > 1 else part)
        if not gone:
            break
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")


READ_BATCH = 256  # files read before they are merged into one table (``read_arrow``)


def _union(files: list[tuple[Location, str]], got: list[pa.Table | BaseException], on_skip: Any,
           own: dict[Location, list[str]]) -> pa.Table | None:
    tables = []
    for (study, rel), one in zip(files, got):
        if isinstance(one, BaseException):  # corrupt or foreign file: report it, keep the rest
            reason = str(one).splitlines()[0] if str(one) else type(one).__name__
            where = study.local_path(rel) or f"{study.uri}/{rel}"
            if on_skip is not None:
                on_skip(where, reason)
            else:
                warnings.warn(f"skipped unreadable results file {where}: {reason}", stacklevel=2)
            continue
        if _is_compacted(rel) and own.get(study):
            import pyarrow.compute as pc

            one = one.filter(pc.invert(pc.is_in(one.column("trial_id"), value_set=pa.array(own[study]))))
        tables.append(one)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def _read_one(study: Location, rel: str) -> pa.Table | BaseException:
    try:
        local = study.local_path(rel)
        if local is not None:
            # One open file: read_table(path) opens it again for the pages, and a writer's
            # os.replace in between pairs the old footer with the new file's pages.
            # (ParquetFile reads one file at half read_table's cost, which sets up a dataset; one
            # thread, since a file of a few rows is not worth handing out column by column.)
            with open(local, "rb") as f:
                return pq.ParquetFile(pa.BufferReader(f.read())).read(use_threads=False)
        return pq.ParquetFile(pa.BufferReader(study.read_bytes(rel))).read(use_threads=False)
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return exc


def _read_all(files: list[tuple[Location, str]]) -> list[pa.Table | BaseException]:
    """Read files in order; a bucket's many small objects are fetched concurrently."""
    if len(files) > 1 and any(study.over_network for study, _ in files):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(lambda f: _read_one(*f), files))
    return [_read_one(*f) for f in files]


def read_trial(study: StudyPath, table: str, trial_id: str) -> pa.Table | None:
    """One trial's rows of ``table``: its own file, else its rows in the compacted file."""
    loc = Location(study)
    for rel in (f"{table}/{trial_id}.parquet", *(f"{table}/{n}" for n in _COMPACTED_NAMES)):
        if not loc.is_file(rel):
            continue
        got = _read_one(loc, rel)
        if isinstance(got, BaseException):
            continue
        if _is_compacted(rel):
            import pyarrow.compute as pc

            got = got.filter(pc.equal(got.column("trial_id"), trial_id))
            if got.num_rows == 0:
                continue
        return got
    return None


def drop_orphans(study: StudyPath, trial_ids: set[str]) -> list[str]:
    """Remove the epoch and digit rows of trials not in ``trial_ids`` (the study's trials table):
    trials a killed driver started after Ray last saved its state, which the resumed study never
    knew. Call only when every trial of the study has finished. Returns the trial ids removed."""
    loc = Location(study)
    gone = []
    for table in ("epochs", "digits"):
        for name in loc.files(table, ".parquet"):
            tid = name.removesuffix(".parquet")
            if not _is_compacted(name) and tid not in trial_ids:
                loc.delete(f"{table}/{name}")
                gone.append(tid)
    return sorted(set(gone))


def compact(study: StudyPath) -> dict[str, int]:
    """Merge a study's per-trial files into one ``compacted.parquet`` per table.

    The rows do not change (``load`` returns the same frame before and after). The compacted
    file is written whole first; readers prefer a trial's own file, so no moment shows a row
    twice. In a folder the per-trial files it holds are then removed. In a bucket they stay,
    and readers skip the ones older than the compacted file (:func:`table_files`): removing them
    cost four requests each (pyarrow looks before it deletes, and marks the folder after),
    three times a study's trials in all. Returns the files merged per table.
    """
    loc = Location(study)
    if not loc.is_dir("trials"):
        raise StudyError(f"{loc} holds no study results to compact")
    merged: dict[str, int] = {}
    for table in TABLES:
        singles = [rel for _, rel in table_files(loc, table) if not _is_compacted(rel)]  # the legacy name too
        if not singles:
            merged[table] = 0
            continue
        arrow = read_arrow(loc, table)
        loc.write_bytes(f"{table}/{COMPACTED}", parquet_bytes(arrow))
        if not loc.over_network:
            for rel in singles:
                loc.delete(rel)
            for name in _COMPACTED_NAMES[1:]:  # an older version's compacted file, merged now
                loc.delete(f"{table}/{name}")
        merged[table] = len(singles)
    return merged


# --------------------------------------------------------------------------- winner and ranking

def search_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials of the search: every row but the winner's refit (``status = 'refit'``)."""
    return trials[trials["status"] != REFIT] if len(trials) else trials


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials that produced a usable model (completed or pruned, with a finite objective)."""
    ok = trials["status"].isin(FINISHED) & trials["objective"].notna() & np.isfinite(trials["objective"].astype(float))
    return trials[ok]


def rank(trials: pd.DataFrame, mode: str = "min") -> pd.DataFrame:
    """Usable trials, best first by the study objective (ties: lower val -ELBO, then trial id)."""
    ok = finished(trials)
    return ok.sort_values(["objective", "val_elbo", "trial_id"], ascending=[mode == "min", True, True], kind="stable")


def best_first(trials: pd.DataFrame, modes: dict[str, str]) -> pd.DataFrame:
    """Rows best first by the objective of each row's study (``modes``: study name -> "min" or
    "max"; "min" when unknown); rows without a finite objective (failed, running) last."""
    sign = trials["study"].map(lambda s: -1.0 if modes.get(s) == "max" else 1.0).astype(float)
    key = pd.to_numeric(trials["objective"], errors="coerce") * sign
    key = key.where(np.isfinite(key)).reset_index(drop=True)
    return trials.iloc[key.sort_values(na_position="last", kind="stable").index]


def study_modes(path: StudyPath) -> dict[str, str]:
    """Each study's direction ("min" or "max") under ``path``, from its study.json."""
    import json

    modes = {}
    for study in find_studies(Location(path)):
        try:
            modes[study.name] = json.loads(study.read_bytes("study.json")).get("mode", "min")
        except Exception:  # noqa: BLE001 - a study without a readable spec ranks as "min"
            modes[study.name] = "min"
    return modes


def winner(trials: pd.DataFrame, mode: str = "min") -> pd.Series | None:
    """The study's winner: the best usable trial by the study objective (validation only)."""
    ranked = rank(trials, mode)
    return None if ranked.empty else ranked.iloc[0]


def winners_by_latent(trials: pd.DataFrame, mode: str = "min") -> pd.DataFrame:
    """The best trial for each latent size present, ordered by latent size."""
    ranked = rank(trials, mode)
    best = ranked.groupby("param_latent_dim", sort=True).head(1)
    return best.sort_values("param_latent_dim").reset_index(drop=True)


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
