"""What a trial's report to Tune holds, and what the driver keeps of it.

A trial reports to Tune only where a decision is made or someone is watching: at ASHA's rungs
(where it may be stopped), at its last epoch, and at least every ``REPORT_EVERY_S`` seconds
(the progress table). Each report is its newest epoch's result, and carries the epochs trained
since the previous report under ``CARRIED`` (a JSON list, so Tune's loggers pass it by as text;
``study.results.epochs.each_epoch`` reads them back).
A round trip to the driver per epoch cost each slot 0.8 s in the README's study, and the
driver's CPU per result (Tune's own bookkeeping most of it) is taken from the trials on a small
machine (BENCHMARKS §3, §3b).

Here: the loggers that write one line per epoch (TensorBoard, CSV, JSON; the trackers' callbacks
in ``study.runner.trackers``), what Tune keeps of a finished trial (``Trim``), and the results Tune
reads only when asked for (``lazy_results``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ray.tune import Callback, ResultGrid
from ray.tune.analysis import ExperimentAnalysis
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

from study.results import each_epoch

REPORT_EVERY_S = 5.0  # the driver's VAE_STUDY_REPORT_EVERY_S overrides it (0: every epoch)


def report_every_s() -> float:
    """The longest a trial goes without reporting, read where the study starts (the driver) and
    handed to its trials, so every node of a cluster reports at the driver's pace."""
    import os

    raw = os.environ.get("VAE_STUDY_REPORT_EVERY_S")
    try:
        return max(0.0, float(raw)) if raw else REPORT_EVERY_S
    except ValueError:
        return REPORT_EVERY_S


class PerEpoch:
    """A mixin for a Tune ``LoggerCallback``: each epoch a result carries is logged as a result
    of its own, with step = epoch, as if the trial had reported every epoch."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        for r in each_epoch(result):
            super().log_trial_result(iteration, trial, r)  # type: ignore[misc]


class EpochCSV(PerEpoch, CSVLoggerCallback):
    """Tune's ``progress.csv``, a row per epoch."""


class EpochJSON(PerEpoch, JsonLoggerCallback):
    """Tune's ``result.json``, a line per epoch."""


class EpochTBX(PerEpoch, TBXLoggerCallback):
    """Tune's TensorBoard event files, a point per epoch."""


def loggers() -> list[Any]:
    """Tune's three default loggers, per epoch. Passed to Tune, they take the place of its own
    (Tune adds a default logger only when none of its kind is there)."""
    out: list[Any] = [EpochCSV(), EpochJSON()]
    try:
        out.append(EpochTBX())
    except ImportError:  # tensorboardX missing: Tune would only warn too
        pass
    return out


# What Tune keeps of a finished trial's results (Trim): where it is, and its values of the metrics a
# study ranks on, last and best (``ResultGrid``'s ``metrics`` and ``get_best_result`` read these).
KEPT = ("trial_id", "epoch", "training_iteration", "done", "time_total_s", "timestamp", "date",
        "val_elbo", "val_recon", "val_kl", "val_mse", "val_loss",
        "best_val_elbo", "best_val_recon", "best_val_kl", "best_val_mse", "best_epoch")


class Trim(Callback):
    """Once a trial has finished, its results are in the study's tables: Tune's copy of its last
    result (about 60 values, the carried epochs and the per-digit test metrics among them) and
    its running statistics of every value are cut to :data:`KEPT`. Tune writes every trial's
    copy into its experiment state every few seconds (48 KB a trial, 48 MB at 1,000 trials,
    uploaded whole to a bucket at each sync: BENCHMARKS §3e). Put last among the callbacks, so
    that every other one has seen the trial whole."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trim(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trim(trial)


def trim(trial: Any) -> None:
    meta = trial.run_metadata
    meta.last_result = _kept(meta.last_result)
    meta.metric_analysis = _kept(meta.metric_analysis)
    meta.metric_n_steps = {}  # windows for running averages: no result comes any more
    # each kept checkpoint holds the full result it was reported with (Ray's private record: if
    # a Ray release moves it, it is left whole)
    manager = meta.checkpoint_manager
    for r in [*getattr(manager, "_checkpoint_results", []), getattr(manager, "_latest_checkpoint_result", None)]:
        if r is not None and isinstance(getattr(r, "metrics", None), dict):
            r.metrics = _kept(r.metrics)
    meta.invalidate_cache()


def _kept(values: dict | None) -> dict:
    return {k: v for k, v in (values or {}).items() if k in KEPT}


class _TrialFrames(Mapping):
    """Tune's per-trial DataFrames (each trial's ``result.json``, read back whole), read when one
    is asked for instead of all at once. Tune's eager read, at the end of every run and at every
    resume, took 0.9 ms and held 73 KB a trial (measured at 300 trials: 0.7 GB at 10,000), and
    on a bucket three requests a trial. Every epoch of every trial is in the study's tables."""

    def __init__(self, analysis: Any) -> None:
        self._analysis = analysis
        self._trials = {t.trial_id: t for t in analysis.trials}
        self._read: dict[str, Any] = {}

    def __getitem__(self, trial_id: str) -> Any:
        if trial_id not in self._read:
            trial = self._trials[trial_id]
            try:
                self._read[trial_id] = self._analysis._fetch_trial_dataframe(trial)
            except Exception as exc:  # noqa: BLE001 - as Tune does: warn, and an empty frame
                import logging

                import pandas as pd

                logging.getLogger(__name__).warning("Failed to read the results of %s: %r", trial, exc)
                self._read[trial_id] = pd.DataFrame()
        return self._read[trial_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._trials)

    def __len__(self) -> int:
        return len(self._trials)


class _Results(Sequence):
    """A ResultGrid's results, each made (its DataFrame read) when first asked for."""

    def __init__(self, grid: Any) -> None:
        self._grid, self._trials, self._made = grid, grid._experiment_analysis.trials, {}

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self._trials))[i]  # negative indices; IndexError past the end
        if i not in self._made:
            self._made[i] = self._grid._trial_to_result(self._trials[i])
        return self._made[i]

    def __len__(self) -> int:
        return len(self._trials)


class LazyAnalysis(ExperimentAnalysis):
    """Tune's ExperimentAnalysis, reading a trial's DataFrame when it is asked for."""

    def _fetch_trial_dataframes(self) -> Any:
        return _TrialFrames(self)


class LazyGrid(ResultGrid):
    """Tune's ResultGrid, making a trial's Result (and reading its DataFrame) when it is asked for."""

    def __init__(self, experiment_analysis: Any) -> None:  # noqa: D107 - ResultGrid's, lazily
        self._experiment_analysis = experiment_analysis
        self._results = _Results(self)


@contextlib.contextmanager
def lazy_results() -> Iterator[None]:
    """While it is open, the ``ResultGrid`` that ``Tuner.fit`` returns, and the analysis that
    ``Tuner.restore`` loads, read a trial's DataFrame when it is asked for (``_TrialFrames``),
    not every trial's at once. Ray builds both from names in its modules, which point at the
    subclasses above while it is open; a Ray release that moves them gets Tune's eager read."""
    from ray.tune import tune as tune_module
    from ray.tune.impl import tuner_internal

    names = ((tune_module, "ExperimentAnalysis", LazyAnalysis), (tuner_internal, "ExperimentAnalysis", LazyAnalysis),
             (tuner_internal, "ResultGrid", LazyGrid))
    if not all(getattr(m, n, None) is base for (m, n, _), base in
               zip(names, (ExperimentAnalysis, ExperimentAnalysis, ResultGrid))) or \
            not hasattr(ExperimentAnalysis, "_fetch_trial_dataframe"):
        yield
        return
    for m, n, lazy in names:
        setattr(m, n, lazy)
    try:
        yield
    finally:
        tune_module.ExperimentAnalysis = tuner_internal.ExperimentAnalysis = ExperimentAnalysis
        tuner_internal.ResultGrid = ResultGrid
