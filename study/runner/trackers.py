"""Experiment trackers: MLflow and Weights & Biases, through Ray Tune's own logger callbacks.

``--log-to mlflow`` and ``--log-to wandb`` (``[study] log_to = ["mlflow"]``) add Tune's
``MLflowLoggerCallback`` / ``WandbLoggerCallback`` to a study: one tracker run per trial, with
the trial's parameters and every epoch's metrics (step = epoch). ``vae-study report`` then
logs the report to the winner's run as an artifact.

Both are configured only from the environment, as their own tools are, so no address or key
is ever written into the study: MLflow reads ``MLFLOW_TRACKING_URI`` (and its token
variables), W&B ``WANDB_API_KEY`` or ``WANDB_MODE=offline``, and ``WANDB_PROJECT``,
``WANDB_DIR``. The callbacks run in the driver (W&B's in small actors beside it), so only the
driver's machine needs the variables and the network path to the tracker.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

from study.errors import StudyError
from study.runner.reports import PerEpoch

WANDB_PROJECT = "vae-study"  # when WANDB_PROJECT is not set


def check(log_to: Sequence[str]) -> None:
    """Refuse, in one line, a tracker that is not installed or not configured. Called before a
    study writes anything."""
    for name in log_to:  # the names are checked with the spec (study.spec.TRACKERS)
        try:
            __import__(name)
        except ImportError:
            raise StudyError(f"--log-to {name}: the {name} package is not installed; "
                             f"pip install 'vae-study[{name}]'") from None
    if "mlflow" in log_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise StudyError("--log-to mlflow: set MLFLOW_TRACKING_URI (a server, databricks, or sqlite:///mlflow.db "
                         "for a local store)")
    if "wandb" in log_to and not (os.environ.get("WANDB_API_KEY")
                                  or os.environ.get("WANDB_MODE") in ("offline", "disabled")):
        raise StudyError("--log-to wandb: set WANDB_API_KEY (or WANDB_MODE=offline to keep the runs on this "
                         "machine for `wandb sync`)")


def callbacks(log_to: Sequence[str], study_name: str) -> list[Any]:
    """Ray Tune's logger callbacks for the study's trackers: an MLflow experiment, or a W&B
    group in ``$WANDB_PROJECT``, named after the study."""
    out: list[Any] = []
    if "mlflow" in log_to:
        # tracking_uri None: MLflow reads MLFLOW_TRACKING_URI itself, so it is never pickled
        # into Tune's experiment state with the callback
        out.append(MLflowCallback(experiment_name=study_name, tags={"vae_study": study_name}))
    if "wandb" in log_to:
        out.append(WandbCallback(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), group=study_name))
    return out


def close_stale_runs(log_to: Sequence[str], study_name: str, trials: Any = None,
                     epochs: Callable[[], Any] | None = None) -> int:
    """After a resumed study ends, close the MLflow runs the killed driver left RUNNING.

    A trial whose row the killed driver wrote is finished (it is not run again), but the driver
    may have died between writing the row and closing the trial's run: that run gets the epochs
    it misses from the study's ``epochs`` table and ends FINISHED (FAILED for a failed trial).
    Any other open run belonged to a trial that a resumed trial continued in a new run: it ends
    KILLED, as Optuna's stale trials end FAIL. ``trials`` is the study's trials table (a
    DataFrame), ``epochs`` reads its epochs table (only when a run needs it). Returns how many
    runs were closed; a tracker that cannot be reached costs nothing."""
    if "mlflow" not in log_to:
        return 0
    try:
        import mlflow

        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(study_name)
        if experiment is None:
            return 0
        stale = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
        recorded = {} if trials is None or not len(trials) else dict(zip(trials["trial_id"], trials["status"]))
        table = None
        for run in stale:
            tid = run.data.tags.get("trial_name", "").rsplit("_", 1)[-1]
            if tid in recorded:
                if table is None and epochs is not None:
                    table = epochs()
                _backfill(client, run.info.run_id, table, tid)
                client.set_terminated(run.info.run_id, status="FAILED" if recorded[tid] == "failed" else "FINISHED")
            else:
                client.set_terminated(run.info.run_id, status="KILLED")
        return len(stale)
    except Exception:  # noqa: BLE001 - the study is done; the tracker is extra
        return 0


def _backfill(client: Any, run_id: str, epochs: Any, trial_id: str) -> None:
    """Log to a run the epochs of ``trial_id`` after the last one it holds, step = epoch."""
    import numbers
    import time

    from mlflow.entities import Metric

    if epochs is None or not len(epochs):
        return
    logged = max((int(m.value) for m in client.get_metric_history(run_id, "epoch")), default=0)
    mine = epochs[(epochs["trial_id"] == trial_id) & (epochs["epoch"] > logged)].sort_values("epoch")
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(row["epoch"]))
               for _, row in mine.iterrows() for key, value in row.items()
               if key not in ("study", "trial_id") and isinstance(value, numbers.Real)
               and not isinstance(value, bool) and value == value]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


class MLflowCallback(PerEpoch, MLflowLoggerCallback):
    """Tune's MLflow callback, a metrics step per epoch (a trial's reports carry several)."""


class _WandbRunActor(_WandbLoggingActor):
    """Tune's W&B logging actor (one per trial), whose run is finished whatever stops its loop.
    An offline run keeps its records in memory until ``finish()`` (measured: a run whose
    process dies first leaves a .wandb file of its 7-byte header and no epoch), and Tune's loop
    finishes only when it ends normally: an error in it lost every epoch already logged."""

    def run(self) -> None:
        try:
            super().run()
        except BaseException:
            if self._wandb.run is not None:
                self._wandb.finish(exit_code=1)
            raise


class WandbCallback(PerEpoch, WandbLoggerCallback):
    """Tune's W&B callback, a log entry per epoch (a trial's reports carry several), quiet at
    interpreter exit, and saying when a trial's W&B run failed (Tune drops its logging actors'
    errors, and the study's workers do not print to the driver). Its ``__del__`` calls
    ``ray.is_initialized()``; for a callback that ``resume`` restored it runs only at exit, when
    the ``ray`` module is gone, and Python printed a traceback after the study had finished."""

    _logger_actor_cls = _WandbRunActor

    def _cleanup_logging_actor(self, trial: Any) -> None:
        future = self._trial_logging_futures.get(trial)
        if future is not None:
            ready, _ = ray.wait([future], timeout=0)
            if not ready:
                sys.stderr.write(f"W&B: trial {trial.trial_id}'s run did not finish in time; its logging stopped\n")
            else:
                try:
                    ray.get(future)
                except Exception as exc:  # noqa: BLE001 - the study goes on; the tracker is extra
                    sys.stderr.write(f"W&B: trial {trial.trial_id}'s run failed: {_last_line(exc)}\n")
        super()._cleanup_logging_actor(trial)

    def __del__(self) -> None:
        try:
            super().__del__()
        except Exception:  # noqa: BLE001 - at exit; its actors went with Ray
            pass


def log_report(log_to: Sequence[str], study_name: str, winner_id: str, report_dir: Path,
               say: Callable[[str], None]) -> None:
    """Attach a built report to the winner's tracker run. A tracker that cannot take it costs a
    line, never the report."""
    for name in log_to:
        try:
            where = (_mlflow_report if name == "mlflow" else _wandb_report)(study_name, winner_id, report_dir)
            say(f"report logged to {name}: {where}")
        except Exception as exc:  # noqa: BLE001 - the report is built; the tracker is extra
            say(f"report not logged to {name}: {_last_line(exc)}")


def _last_line(exc: BaseException) -> str:
    """An error in one line: its message's last (a Ray task error ends with the original's)."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _mlflow_report(study_name: str, winner_id: str, report_dir: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None:
        raise StudyError(f"no MLflow experiment {study_name!r} at this MLFLOW_TRACKING_URI")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.trial_name LIKE '%{winner_id}'")
    if not runs:
        raise StudyError(f"no MLflow run of trial {winner_id} in experiment {study_name!r}")
    run_id = runs[0].info.run_id
    for f in _report_files(report_dir):
        client.log_artifact(run_id, str(f), artifact_path="report")
    return f"run {run_id}, artifacts report/"


def _wandb_report(study_name: str, winner_id: str, report_dir: Path) -> str:
    import wandb

    project = os.environ.get("WANDB_PROJECT", WANDB_PROJECT)
    run = wandb.init(project=project, group=study_name, id=winner_id, resume="allow", job_type="report",
                     settings=wandb.Settings(silent=True))
    try:
        artifact = wandb.Artifact(f"report-{study_name}", type="report")
        for f in _report_files(report_dir):
            artifact.add_file(str(f))
        run.log_artifact(artifact)
    finally:
        run.finish()
    return f"project {project}, run {winner_id}, artifact report-{study_name}"


def _report_files(report_dir: Path) -> list[Path]:
    """The report as a reader opens it: index.html, its figures, summary.json (not the cache
    of arrays it was drawn from)."""
    return sorted(p for p in Path(report_dir).iterdir() if p.is_file() and not p.name.startswith("."))
