"""Tune callbacks -> Parquet rows: the results recorder, around ``study.results.rows``.

The driver writes every row (through ``study.results`` and so ``study.store``): a trial's
epochs as they are reported, its per-digit test metrics when a checkpoint carries them, and its
trials row when it ends. The trials row is written last; its presence means the trial is done.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

from ray.tune import Callback

from study.results import rows, tables
from study.errors import StudyError
from study.results.epochs import each_epoch
from study.store import outage
from study.store import Location

Printer = Callable[[str], None]
_META_KEYS = (*rows.NODE_KEYS, *rows.META_KEYS, "trained_with")
_EPOCH_KEYS = [k for k in tables.EPOCH_COLUMNS if k not in ("study", "trial_id")]
_DIGIT_KEYS = ("split", "recon_mode", "digit", "n_images", "mse", "psnr")


def error_line(text: str | None) -> str:
    """The most useful line of a Ray error trace: the exception message of the root cause."""
    if not text:
        return "trial failed (no error recorded)"
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("TrialFailed:") or ".TrialFailed:" in ln:
            return ln.split("TrialFailed:", 1)[1].strip()
    for ln in reversed(lines):
        head = ln.split(":")[0]
        if ln[:1].isalpha() and ("Error" in head or "Exception" in head):
            return ln[:500]
    return lines[-1][:500]


def trial_error(trial: Any) -> str:
    """The trial's error, read from the driver's local copy (the storage copy syncs later)."""
    path = trial.error_file
    text = None
    if path and os.path.isfile(path):
        with open(path, errors="replace") as f:
            text = f.read()
    return error_line(text or trial.get_error())



def _storage_guarded(method: Callable[..., None]) -> Callable[..., None]:
    """A Tune callback whose storage fails (an outage past the study's patience, a write refused)
    stops the study through its own error path, said in one line (``study.store.outage.give_up``),
    never with a traceback out of Tune; once the study has given up, nothing more is recorded
    (what is not recorded is not finished: ``resume`` continues it)."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> None:
        if outage.gave_up() is not None:
            return
        try:
            method(self, *args, **kwargs)
        except StudyError as exc:
            outage.give_up(exc)

    return guarded


class _TrialLog:
    """What the driver has heard of one trial: its epochs and facts about where it ran."""

    def __init__(self, epochs: dict[int, dict[str, Any]], meta: dict[str, Any]) -> None:
        self.epochs = epochs
        self.meta = meta
        self.written = len(epochs)  # epoch rows in storage
        self.written_at = 0.0


class ResultsRecorder(Callback):
    """Writes each trial's Parquet rows from the driver: epochs as reports bring them, the rest at the end.

    In a local folder a trial's epoch rows are rewritten at every epoch. In a bucket, where each
    write is a PUT, at most every ``BUCKET_EPOCHS_EVERY_S`` seconds per trial, and always before
    Ray records a new checkpoint of it: a trial resumed from epoch k re-reports the epochs after
    k, so the rows up to k must already be stored.

    A trial's trials row is written last, and it is the one record that the trial is finished
    (``study.runner.restore``): once it is written, ``on_recorded(trial_id, row)`` tells the searcher.

    Args:
        study: the study's folder (local or in a bucket).
        spec: the study's spec (its name, objective and epochs).
    """

    BUCKET_EPOCHS_EVERY_S = 10.0

    def __init__(self, study: Location, spec: Any) -> None:
        from study.results.retention import Retention

        self.study = study
        self.spec = spec
        self.retention = Retention(study, spec.keep, spec.mode)  # what a finished trial keeps
        self.logs: dict[str, _TrialLog] = {}
        self.resumed = False  # a new driver of an interrupted study: the old one's rows may exist
        self.write_seconds = 0.0  # time the driver spent writing (the study benchmark reads it)
        self.on_recorded: Callable[[str, dict[str, Any]], None] | None = None  # the driver's; not saved

    def attach(self, study: Location) -> None:
        """Write to this study folder (a resumed study may have been moved since it was pickled)."""
        self.study = study
        self.logs = {}
        self.resumed = True
        if "retention" not in self.__dict__:  # a study saved before there was a policy
            from study.results.retention import Retention

            self.retention = Retention(study, self.spec.keep, self.spec.mode)
        self.retention.attach(study)
        self.write_seconds = 0.0

    def _log(self, trial: Any) -> _TrialLog:
        tid = trial.trial_id
        if tid not in self.logs:
            # A trial resumed by a new driver picks up what the old one wrote; in a new study
            # there is nothing to read (on a bucket, that saves requests at every trial start).
            self.logs[tid] = _read_back(self.study, tid) if self.resumed else _TrialLog({}, {})
        return self.logs[tid]

    @_storage_guarded
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trial).meta.setdefault("started_at", rows.now())

    @_storage_guarded
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        t0 = time.perf_counter()
        log = self._log(trial)
        for r in each_epoch(result):  # the epochs the report carries, then its own
            log.epochs[int(r["epoch"])] = {k: r.get(k) for k in _EPOCH_KEYS}
        log.meta.update({k: result[k] for k in _META_KEYS if k in result})
        if "test_digits" in result:
            log.meta["digits"] = json.loads(result["test_digits"])
            log.meta.update({k: result[k] for k in ("test_elbo", "test_mse", "test_psnr")})
            base = {"study": self.spec.name, "trial_id": trial.trial_id}
            tables.write_rows(self.study, "digits", trial.trial_id, [{**base, **r} for r in log.meta["digits"]])
        if not self.study.over_network or time.monotonic() - log.written_at >= self.BUCKET_EPOCHS_EVERY_S:
            self._write_epochs(trial.trial_id, log)
        self.write_seconds += time.perf_counter() - t0

    @_storage_guarded
    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        log = self.logs.get(trial.trial_id)
        if log is not None and log.written < len(log.epochs):
            t0 = time.perf_counter()
            self._write_epochs(trial.trial_id, log)
            self.write_seconds += time.perf_counter() - t0

    def _write_epochs(self, trial_id: str, log: _TrialLog) -> None:
        base = {"study": self.spec.name, "trial_id": trial_id}
        tables.write_rows(self.study, "epochs", trial_id, [{**base, **log.epochs[e]} for e in sorted(log.epochs)])
        log.written, log.written_at = len(log.epochs), time.monotonic()

    @_storage_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log = self._log(trial)
        done = bool(log.epochs) and max(log.epochs) >= int(trial.config.get("epochs", self.spec.epochs))
        self._finish(trial, "completed" if done else "pruned", None)

    @_storage_guarded
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "failed", trial_error(trial))

    def _finish(self, trial: Any, status: str, error: str | None) -> None:
        t0 = time.perf_counter()
        tid = trial.trial_id
        log = self._log(trial)
        epochs = [log.epochs[e] for e in sorted(log.epochs)]
        values = {**trial.config, **(log.meta.get("trained_with") or {})}  # what it trained with
        row = rows.trials_row(
            status=status, error=error, values=values, facts=log.meta,
            results=rows.trial_results(epochs, status=status, objective=self.spec.objective[0],
                                       select=self.spec.select),
            # num_failures counts every failure, a final one included
            attempts=int(trial.num_failures) + (0 if status == "failed" else 1),
            checkpoint=checkpoint_path(trial, self.study), started_at=log.meta.get("started_at"),
        )
        tables.write_trial(self.study, tid, row, epochs, log.meta.get("digits", []))
        self.logs.pop(tid, None)
        self.write_seconds += time.perf_counter() - t0
        if self.on_recorded is not None:
            self.on_recorded(tid, row)
        t0 = time.perf_counter()
        self.retention.finished(tid, row)
        self.write_seconds += time.perf_counter() - t0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "on_recorded": None}


def checkpoint_path(trial: Any, study: Location) -> str | None:
    """The best checkpoint's ``model.pt``, relative to the study folder when inside it, so a moved
    or copied study (a folder or a bucket prefix) stays whole."""
    ck = trial.checkpoint
    if ck is None:
        return None
    path = f"{str(ck.path).rstrip('/')}/model.pt"
    prefix = study.path.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def _read_back(study: Location, trial_id: str) -> _TrialLog:
    epochs: dict[int, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    ep = tables.read_trial(study, "epochs", trial_id)
    for r in ep.to_pylist() if ep is not None else []:
        epochs[int(r["epoch"])] = {k: r.get(k) for k in _EPOCH_KEYS}
    dg = tables.read_trial(study, "digits", trial_id)
    if dg is not None:
        meta["digits"] = [{k: r[k] for k in _DIGIT_KEYS} for r in dg.to_pylist()]
    return _TrialLog(epochs, meta)
