"""Refit, as scikit-learn's searches do: the winner's configuration trained again on training plus
validation images, for the winner's best epoch count, then evaluated on the test split.

The search chose the configuration on validation alone; the refit only adds the validation images
to training once nothing is left to choose. It is recorded as its own trials row: ``status`` is
``refit`` (never ranked with the search's trials), ``refit_of`` names the winner, ``trial_id`` is
``refit-<winner>``. Its per-digit test rows go to the digits table under that id, and its weights
to ``refit/<winner>/model.pt`` in the study; it has no epoch rows. It runs as a Ray task with one
trial's resources, so on a cluster it runs where trials run (a GPU node), and hands its checkpoint
back to the driver, which writes it to the study's storage (a folder or a bucket).
"""
from __future__ import annotations

from typing import Any, Callable

import pandas as pd
from ray.tune import Callback

from study import results
from study.results.rows import now, test_rows, trials_row
from study.spec import RECORDED, StudySpec
from study.store import Location

PREFIX = "refit-"
STATUS = results.REFIT


def refit_values(fixed: dict[str, Any], winner: pd.Series) -> dict[str, Any]:
    """The refit's TrainConfig values: the study's fixed values, the winner's own parameters,
    and ``epochs`` = the winner's best epoch."""
    values = dict(fixed)
    for k in RECORDED:
        v = winner.get(f"param_{k}")
        if v is not None and not (isinstance(v, float) and pd.isna(v)):
            values[k] = v.item() if hasattr(v, "item") else v
    values["epochs"] = int(winner["best_epoch"])
    return values


def refit_cpus(spec: StudySpec, wait_s: float = 3.0) -> float:
    """CPUs (and torch threads) for the refit. It trains alone once the search is over, so on the
    study's own local runtime a CPU refit takes every CPU free there rather than one trial's
    share, which left the other slots idle (BENCHMARKS §3c). On a cluster (``--address``) and on
    a GPU it keeps a trial's: Ray's free CPUs are the cluster's, not one node's. The search's
    last actors are released a moment after it ends: up to ``wait_s`` is given for the CPUs to
    come back (without the wait, a 4-trial study's refit here found one CPU of two free)."""
    if spec.gpus_per_trial or spec.address is not None:
        return spec.cpus_per_trial
    import time

    import ray

    deadline = time.monotonic() + wait_s
    total = float(int(ray.cluster_resources().get("CPU", 0.0)))
    free = float(int(ray.available_resources().get("CPU", 0.0)))
    while free < total and time.monotonic() < deadline:
        time.sleep(0.05)
        free = float(int(ray.available_resources().get("CPU", 0.0)))
    return max(float(spec.cpus_per_trial), free)


def refit_id(winner_id: str) -> str:
    return f"{PREFIX}{winner_id}"


def _refit_task(values: dict[str, Any], threads: int) -> dict[str, Any]:
    """Runs in a Ray worker: train on train+val, keep the last epoch, evaluate on test."""
    import tempfile
    from pathlib import Path

    import torch

    from study.results.rows import node_facts
    from study.runner.trainable import TRIAL_MODES
    from vae import checkpoint as ckpt_io
    from vae.config import TrainConfig
    from vae.data import load
    from vae.evaluate import evaluate_split
    from vae.train import fit, resolve_device

    torch.set_num_threads(max(1, threads))
    tc = TrainConfig.from_dict(values)
    device = resolve_device(tc.device)
    data = load(tc).train_and_val()
    fitted = fit(tc, data, keep="last")
    out: dict[str, Any] = {
        "status": fitted.status, "error": fitted.error, "epochs": len(fitted.history),
        "train_seconds": fitted.train_seconds, "images_per_second": fitted.images_per_second,
        "facts": node_facts(tc, device),
    }
    if fitted.status != "completed":
        return out
    out["test"] = evaluate_split(fitted.model, data.test, modes=TRIAL_MODES, device=device)
    with tempfile.TemporaryDirectory(prefix="vae-refit-") as tmp:
        path = ckpt_io.save(Path(tmp) / "model.pt", fitted.model, tc, epoch=tc.epochs, refit=True,
                            n_train=len(data.train))
        out["checkpoint"] = path.read_bytes()
    return out


class RefitWorker:
    """The refit's worker process, started while the search's last trials run (a Ray actor): its
    torch import and data load then overlap them, instead of following the search (1.5-2 s on
    this machine, BENCHMARKS §3d)."""

    def warm(self, values: dict[str, Any]) -> int:
        import os

        import torch  # noqa: F401 - the import is the point

        from vae.config import TrainConfig
        from vae.data import load

        load(TrainConfig.from_dict(values))  # memoised in this process
        return os.getpid()

    def fit(self, values: dict[str, Any], threads: int) -> dict[str, Any]:
        return _refit_task(values, threads)


def warms_early(spec: StudySpec) -> bool:
    """A warm refit worker is started for a CPU study on its own local runtime: it holds no CPU
    while it waits (0 CPUs), and trains once the search has freed them all (``refit_cpus``)."""
    return bool(spec.refit) and not spec.multi_objective and spec.address is None and not spec.gpus_per_trial


class RefitWarmer(Callback):
    """Starts the refit's worker once a slot goes idle for good: every trial has been made and
    none waits. Its actor handle is not part of Tune's saved state; a resumed study starts its own."""

    def __init__(self, spec: StudySpec, fixed: dict[str, Any]) -> None:
        self.spec, self.fixed = spec, fixed
        self.worker: Any = None

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._maybe_start(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._maybe_start(trials)

    def _maybe_start(self, trials: list) -> None:
        if self.worker is not None or not warms_early(self.spec) or len(trials) < self.spec.n_trials:
            return
        if any(t.status == "PENDING" for t in trials):
            return
        import ray

        self.worker = ray.remote(RefitWorker).options(num_cpus=0, max_restarts=0).remote()
        self.worker.warm.remote(self.fixed)

    def take(self) -> Any:
        """The warm worker (or None), handed over once."""
        worker, self.worker = self.worker, None
        return worker

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "worker": None}


def run_refit(spec: StudySpec, study: Location, trials: pd.DataFrame, fixed: dict[str, Any],
              printer: Callable[[str], None] = print, worker: Any = None) -> dict[str, Any] | None:
    """Refit the study's winner unless it is refitted already (a resumed study); returns its row.

    Nothing is refitted for a multi-objective study (no single winner), with ``refit`` off, or
    when no trial finished with a usable model. ``worker``: a warm ``RefitWorker`` to train in
    (else a Ray task starts a worker of its own); it is stopped here either way.
    """
    try:
        return _run_refit(spec, study, trials, fixed, printer, worker)
    finally:
        if worker is not None:
            import ray

            ray.kill(worker)


def _run_refit(spec: StudySpec, study: Location, trials: pd.DataFrame, fixed: dict[str, Any],
               printer: Callable[[str], None], worker: Any) -> dict[str, Any] | None:
    import ray

    if not spec.refit or spec.multi_objective:
        return None
    win = results.winner(trials, spec.mode)  # the search's best: a refit row is never ranked
    if win is None or pd.isna(win.get("best_epoch")):
        return None
    tid = refit_id(str(win["trial_id"]))
    existing = trials[trials["trial_id"] == tid]
    if len(existing):
        return existing.iloc[0].to_dict()
    values = refit_values(fixed, win)
    started = now()
    cpus = refit_cpus(spec)
    where = "a worker warmed during the search" if worker is not None else "a new worker"
    printer(f"refit: trial {win['trial_id']}'s configuration on training + validation images, "
            f"{values['epochs']} epochs, {int(cpus)} CPU thread{'s' if int(cpus) != 1 else ''}, in {where}")
    out = None
    if worker is not None:
        try:
            out = ray.get(worker.fit.remote(values, int(cpus)))
        except ray.exceptions.RayActorError:  # it died: a task of its own, as without one
            out = None
    if out is None:
        task = ray.remote(_refit_task).options(num_cpus=cpus, num_gpus=spec.gpus_per_trial,
                                               max_retries=spec.max_failures)
        out = ray.get(task.remote(values, int(cpus)))
    done = out["status"] == "completed"
    facts, digits, checkpoint = dict(out["facts"]), [], None
    if done:
        metrics, digits = test_rows(out["test"])
        facts.update(metrics)
        checkpoint = f"refit/{win['trial_id']}/model.pt"
        study.write_bytes(checkpoint, out["checkpoint"])
    row = trials_row(
        status=STATUS, refit_of=str(win["trial_id"]), error=None if done else f"refit failed: {out['error']}",
        values=values, facts=facts, attempts=1,
        checkpoint=checkpoint, started_at=started,
        results={"best_epoch": out["epochs"] if done else None, "epochs_run": out["epochs"],
                 "train_seconds": out["train_seconds"], "images_per_second": out["images_per_second"]},
    )
    # No epoch rows: the epochs table stays the search's (its validation columns would be
    # measured on training images here); the row carries the refit's training seconds.
    results.write_trial(study, tid, row, [], digits)
    if row.get("test_psnr") is not None:
        printer(f"refit {tid}: test MSE {row['test_mse']:.5f}, PSNR {row['test_psnr']:.2f} dB "
                f"(the winner itself: {win['test_mse']:.5f}, {win['test_psnr']:.2f} dB)")
    else:
        printer(f"refit {tid}: {row['error']}")
    return {"trial_id": tid, **row}
