"""Run and resume studies: Tuner + OptunaSearch (SQLite) + ASHA + resources + FailureConfig.

A study lives in ``<storage>/<name>/``::

    study.json     the StudySpec, so ``resume`` rebuilds the same trainable and settings
    optuna.db      the Optuna study (SQLite), named after the study; optuna-dashboard opens it
    tune/          Ray Tune's experiment: trial logs (TensorBoard event files), checkpoints, state
    trials/ epochs/ digits/   the Parquet results table (study.results)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from study import results
from study.errors import StudyError, StudyInterrupted
from study.spec import StudySpec
from study.trainable import TrialFailed, train_trial

TUNE_DIR = "tune"
OPTUNA_DB = "optuna.db"
SPEC_FILE = "study.json"

Printer = Callable[[str], None]


@dataclass
class StudyResult:
    name: str
    folder: Path
    trials: Any  # pandas DataFrame of the trials table
    best: dict[str, Any] | None
    wall_seconds: float


# --------------------------------------------------------------------------- storage

def study_folder(spec_or_storage: StudySpec | str, name: str | None = None) -> Path:
    if isinstance(spec_or_storage, StudySpec):
        storage, name = spec_or_storage.storage, spec_or_storage.name
    else:
        storage = spec_or_storage
    if "://" in storage and not storage.startswith("file://"):
        raise StudyError(
            f"--storage {storage}: the results table and Optuna database are written by the driver to a "
            "local or mounted folder (NFS); give that folder here (see README, 'Running on a cluster')"
        )
    return Path(storage.removeprefix("file://")).expanduser().resolve() / str(name)


def check_writable(folder: Path) -> None:
    """Fail before any trial starts when the storage cannot take a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise StudyError(f"storage {folder} is not writable ({exc.strerror or exc}): choose another --storage") from exc


def write_spec(folder: Path, spec: StudySpec) -> None:
    tmp = folder / f".{SPEC_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(spec.to_dict(), indent=2))
    os.replace(tmp, folder / SPEC_FILE)


def read_spec(storage: str, name: str) -> StudySpec:
    folder = study_folder(storage, name)
    path = folder / SPEC_FILE
    if not path.is_file():
        raise StudyError(f"no study {name!r} in {storage} (no {path}); start it with `vae-study run`")
    try:
        return StudySpec.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise StudyError(f"{path} is damaged ({exc}); the study cannot be resumed") from exc


# --------------------------------------------------------------------------- Ray

def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to a cluster (``address``) or start a local runtime on 127.0.0.1, no dashboard."""
    import ray

    if ray.is_initialized():
        return
    if address:
        _quiet()
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise StudyError(f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from exc
        return
    # Ray 2.60 on Linux advertises the interface address unless this is set before it starts.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    _quiet()
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="ERROR",
        _node_ip_address="127.0.0.1",
    )


def _quiet() -> None:
    """Our own progress table replaces Ray's and Optuna's chatter."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    # Trial failures are reported, one line each, by our progress table and the trials table.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def slots(spec: StudySpec) -> int:
    """Trials that fit at once on the cluster's CPUs and GPUs."""
    import ray

    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // spec.cpus_per_trial) if spec.cpus_per_trial else 1
    if spec.gpus_per_trial:
        n = min(n, int(res.get("GPU", 0) // spec.gpus_per_trial))
    return max(1, n)


def check_gpus(spec: StudySpec) -> None:
    import ray

    if spec.gpus_per_trial > 0 and ray.cluster_resources().get("GPU", 0) < spec.gpus_per_trial:
        raise StudyError(
            f"--gpus-per-trial {spec.gpus_per_trial:g} asked for, but the Ray cluster has "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs: drop the flag or add GPU workers"
        )


# --------------------------------------------------------------------------- search

def optuna_space(spec: StudySpec) -> dict[str, Any]:
    import optuna.distributions as od

    space: dict[str, Any] = {}
    for name, p in spec.space.items():
        if p["type"] == "int":
            space[name] = od.IntDistribution(int(p["low"]), int(p["high"]), log=bool(p.get("log", False)))
        elif p["type"] == "float":
            space[name] = od.FloatDistribution(float(p["low"]), float(p["high"]), log=bool(p.get("log", False)))
        else:
            space[name] = od.CategoricalDistribution(list(p["choices"]))
    for name, values in spec.grid.items():
        space[name] = od.CategoricalDistribution(list(values))
    return space


def objective_metrics(spec: StudySpec) -> list[str]:
    """Tune metric names: the best-so-far value of each objective (at the best -ELBO epoch)."""
    return [f"best_{m}" for m in spec.objective]


def make_searcher(spec: StudySpec, folder: Path) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / OPTUNA_DB}")
    if spec.grid:
        sampler: Any = optuna.samplers.GridSampler(
            {k: list(v) for k, v in spec.grid.items()}, seed=spec.seed
        )
    else:
        startup = spec.startup_trials if spec.startup_trials is not None else min(10, max(2, spec.trials // 4))
        sampler = optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, n_startup_trials=startup)
    metrics = objective_metrics(spec)
    return OptunaSearch(
        space=optuna_space(spec),
        metric=metrics if spec.multi_objective else metrics[0],
        mode=[spec.mode] * len(metrics) if spec.multi_objective else spec.mode,
        sampler=sampler,
        study_name=spec.name,
        storage=storage,
    )


def make_scheduler(spec: StudySpec) -> Any:
    if spec.scheduler == "none" or spec.multi_objective:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=spec.epochs,
        grace_period=min(spec.grace_period, spec.epochs),
        reduction_factor=spec.reduction_factor,
    )


def asha_rungs(spec: StudySpec) -> list[int]:
    """Epochs at which ASHA may stop a trial (it decides at the first result at or past each rung):
    grace_period * reduction_factor**k up to max_t. Trials persist a checkpoint there."""
    if make_scheduler(spec) is None:
        return []
    rungs, t = [], float(min(spec.grace_period, spec.epochs))
    while t < spec.epochs:
        rungs.append(math.ceil(t))
        t *= spec.reduction_factor
    return rungs


def make_trainable(spec: StudySpec) -> Any:
    from ray import tune

    runtime = {"beta_times_latent": spec.beta_times_latent, "cpus_per_trial": spec.cpus_per_trial,
               "persist_epochs": asha_rungs(spec)}
    fn = tune.with_parameters(train_trial, runtime=runtime)
    return tune.with_resources(fn, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})


# --------------------------------------------------------------------------- callbacks

def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _param_columns(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("latent_dim", "beta", "lr", "batch_size", "arch", "hidden", "epochs", "seed")
    return {f"param_{k}": config.get(k) for k in keys}


def _error_line(text: str | None) -> str:
    """The most useful line of a Ray error trace: the exception message of the root cause."""
    if not text:
        return "trial failed (no error recorded)"
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(TrialFailed.__name__ + ":") or ".TrialFailed:" in ln:
            return ln.split("TrialFailed:", 1)[1].strip()
    for ln in reversed(lines):
        if ln[:1].isalpha() and ("Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]):
            return ln[:500]
    return lines[-1][:500]


def _trial_error(trial: Any) -> str:
    """The trial's error, read from the driver's local copy (the storage copy syncs later)."""
    path = trial.error_file
    text = None
    if path and os.path.isfile(path):
        with open(path, errors="replace") as f:
            text = f.read()
    return _error_line(text or trial.get_error())


def _make_callbacks(spec: StudySpec, folder: Path, printer: Printer) -> list[Any]:
    from ray.tune import Callback

    class ResultsWriter(Callback):
        """Writes each trial's Parquet rows from the driver: epochs as they come, the rest at the end."""

        def __init__(self) -> None:
            self.epochs: dict[str, dict[int, dict[str, Any]]] = {}
            self.trial_info: dict[str, dict[str, Any]] = {}
            self.reported: set[str] = set()  # trials that reported to this driver

        def _state(self, trial: Any) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
            tid = trial.trial_id
            if tid not in self.epochs:
                # A trial resumed by a new driver: pick up what the old one wrote.
                self.epochs[tid], self.trial_info[tid] = _read_back(folder, tid)
            return self.epochs[tid], self.trial_info[tid]

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _, meta = self._state(trial)
            meta.setdefault("started_at", _now())

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            t0 = time.perf_counter()
            try:
                self._on_result(trial, result)
            finally:
                WRITE_SECONDS[0] += time.perf_counter() - t0

        def _on_result(self, trial: Any, result: dict) -> None:
            epochs, meta = self._state(trial)
            self.reported.add(trial.trial_id)
            epoch = int(result["epoch"])
            epochs[epoch] = {k: result.get(k) for k in results.EPOCH_COLUMNS if k not in ("study", "trial_id")}
            for k in ("node", "hostname", "device", "precision", "torch_version", "param_beta", "setup_seconds"):
                if k in result:
                    meta[k] = result[k]
            if "test_digits" in result:
                meta["digits"] = json.loads(result["test_digits"])
                for k in ("test_elbo", "test_mse", "test_psnr"):
                    meta[k] = result[k]
                results.write_rows(folder.parent, spec.name, "digits", trial.trial_id,
                                   [{"study": spec.name, "trial_id": trial.trial_id, **r} for r in meta["digits"]])
            results.write_rows(folder.parent, spec.name, "epochs", trial.trial_id,
                               [{"study": spec.name, "trial_id": trial.trial_id, **epochs[e]} for e in sorted(epochs)])

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            epochs, _ = self._state(trial)
            max_epochs = int(trial.config.get("epochs", spec.epochs))
            status = "completed" if epochs and max(epochs) >= max_epochs else "pruned"
            self._finish(trial, status, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finish(trial, "failed", _trial_error(trial))

        def _finish(self, trial: Any, status: str, error: str | None) -> None:
            t0 = time.perf_counter()
            try:
                self._write_final(trial, status, error)
            finally:
                WRITE_SECONDS[0] += time.perf_counter() - t0

        def _write_final(self, trial: Any, status: str, error: str | None) -> None:
            tid = trial.trial_id
            if tid not in self.reported and _final_row_exists(folder, tid):
                # Finished before a driver crash, after Ray's last state save: the resumed trial
                # restored its final checkpoint and trained nothing. Keep the row as it was.
                return
            epochs, meta = self._state(trial)
            rows = [epochs[e] for e in sorted(epochs)]
            best = min(rows, key=lambda r: r["val_elbo"] if r["val_elbo"] is not None and math.isfinite(r["val_elbo"]) else math.inf, default=None)
            if best is not None and not (best["val_elbo"] is not None and math.isfinite(best["val_elbo"])):
                best = None
            params = _param_columns(trial.config)
            if "param_beta" in meta:
                params["param_beta"] = meta["param_beta"]
            total_seconds = sum(r["seconds"] or 0 for r in rows)
            n_images = sum((r["images_per_second"] or 0) * (r["seconds"] or 0) for r in rows)
            last = trial.last_result or {}
            row = {
                "status": status,
                "error": error,
                **params,
                "dataset": trial.config.get("dataset"),
                "best_epoch": best["epoch"] if best else None,
                "epochs_run": max(epochs) if epochs else 0,
                **{k: (best[k] if best else None) for k in ("val_elbo", "val_recon", "val_kl", "val_mse")},
                "test_elbo": meta.get("test_elbo"),
                "test_mse": meta.get("test_mse"),
                "test_psnr": meta.get("test_psnr"),
                "objective": last.get(objective_metrics(spec)[0]) if best else None,
                "train_seconds": total_seconds,
                "images_per_second": n_images / total_seconds if total_seconds else None,
                "setup_seconds": meta.get("setup_seconds"),
                # num_failures counts every failure, a final one included
                "attempts": int(trial.num_failures) + (0 if status == "failed" else 1),
                "node": meta.get("node"),
                "hostname": meta.get("hostname"),
                "device": meta.get("device"),
                "precision": meta.get("precision"),
                "torch_version": meta.get("torch_version"),
                "ray_version": _ray_version(),
                "optuna_version": _optuna_version(),
                "git_sha": _GIT_SHA,
                "checkpoint": _checkpoint_path(trial, folder),
                "started_at": meta.get("started_at"),
                "finished_at": _now(),
            }
            results.write_trial(folder.parent, spec.name, tid, row,
                                [{**r} for r in rows], meta.get("digits", []))
            self.epochs.pop(tid, None)
            self.trial_info.pop(tid, None)

    class Progress(Callback):
        """A live table: a line per trial event, and the running trials every few seconds."""

        def __init__(self) -> None:
            self.last_table = 0.0
            self.done = 0

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            printer(f"  start    {trial.trial_id}  {_params_text(trial.config, spec)}")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            now = time.monotonic()
            if self.last_table == 0.0:
                self.last_table = now  # the first table comes after 15 s, when there is news
            elif now - self.last_table >= 15:
                self.last_table = now
                running = [t for t in trials if t.status == "RUNNING" and t.last_result]
                printer(f"  -- {self.done}/{spec.n_trials} done, {len(running)} running --")
                for t in running:
                    r = t.last_result or {}
                    obj = r.get(objective_metrics(spec)[0])
                    printer(f"  running  {t.trial_id}  epoch {r.get('epoch', 0):>3}/{spec.epochs}  "
                            f"{spec.objective[0]} {obj if obj is None else f'{obj:.3f}'}  {_params_text(t.config, spec)}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            r = trial.last_result or {}
            epochs = int(r.get("epoch", 0))
            status = "done" if epochs >= spec.epochs else "pruned"
            obj = r.get(objective_metrics(spec)[0])
            printer(f"  {status:<8} {trial.trial_id}  epoch {epochs:>3}/{spec.epochs}  "
                    f"{spec.objective[0]} {obj if obj is None else f'{obj:.3f}'}  [{self.done}/{spec.n_trials}]")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            printer(f"  failed   {trial.trial_id}  {_trial_error(trial)}  [{self.done}/{spec.n_trials}]")

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            printer(f"  retry    {trial.trial_id}  (attempt {trial.num_failures + 1}, from its last checkpoint)")

    return [ResultsWriter(), Progress()]


_GIT_SHA = git_sha()
# Seconds the driver spent writing Parquet in this process (the study-overhead benchmark reads it).
WRITE_SECONDS = [0.0]


def _ray_version() -> str:
    import ray

    return ray.__version__


def _optuna_version() -> str:
    import optuna

    return optuna.__version__


def _checkpoint_path(trial: Any, folder: Path) -> str | None:
    """The best checkpoint, relative to the study folder when inside it, so a moved or copied
    study folder stays whole."""
    ck = trial.checkpoint
    if ck is None:
        return None
    path = Path(ck.path) / "model.pt"
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _params_text(config: dict[str, Any], spec: StudySpec) -> str:
    keys = list(spec.space) + list(spec.grid)
    parts = []
    for k in keys:
        v = config.get(k)
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _final_row_exists(folder: Path, trial_id: str) -> bool:
    import pyarrow.parquet as pq

    path = folder / "trials" / f"{trial_id}.parquet"
    try:
        return path.is_file() and pq.read_table(path, columns=["status"]).column(0)[0].as_py() in (
            "completed", "pruned", "failed")
    except Exception:  # an unreadable row is rewritten
        return False


def _read_back(folder: Path, trial_id: str) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    import pyarrow.parquet as pq

    epochs: dict[int, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    path = folder / "epochs" / f"{trial_id}.parquet"
    if path.is_file():
        for r in pq.read_table(path).to_pylist():
            epochs[int(r["epoch"])] = {k: r.get(k) for k in results.EPOCH_COLUMNS if k not in ("study", "trial_id")}
    dpath = folder / "digits" / f"{trial_id}.parquet"
    if dpath.is_file():
        meta["digits"] = [{k: r[k] for k in ("split", "recon_mode", "digit", "n_images", "mse", "psnr")}
                          for r in pq.read_table(dpath).to_pylist()]
    return epochs, meta


# --------------------------------------------------------------------------- run / resume

def run(spec: StudySpec, *, overwrite: bool = False, printer: Printer = print) -> StudyResult:
    """Run a new study to completion.

    Raises:
        StudyError: the study exists already (resume it, or pass ``overwrite``), the storage is
            not writable, or the cluster cannot provide what the spec asks for.
    """
    folder = study_folder(spec)
    _refuse_existing(folder, spec, overwrite)
    # Data problems surface here, in the driver, before Ray starts and before anything is written.
    from vae.data import load

    load(spec.base_config())
    check_writable(folder.parent)
    init_ray(spec.address, spec.num_cpus)
    check_gpus(spec)
    with _study_lock(folder, spec.name):
        _refuse_existing(folder, spec, overwrite)  # again, now that no other driver can race us
        if overwrite and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_spec(folder, spec)
        return _fit(spec, folder, printer, restore=False)


def _refuse_existing(folder: Path, spec: StudySpec, overwrite: bool) -> None:
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise StudyError(
            f"study {spec.name!r} already exists in {folder.parent}: resume it with "
            f"`vae-study resume --name {spec.name} --storage {spec.storage}`, pick another --name, or pass --overwrite"
        )


@contextlib.contextmanager
def _study_lock(folder: Path, name: str) -> Iterator[None]:
    """One driver per study: a second `run` or `resume` of the same study fails at once."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder.parent / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StudyError(f"study {name!r} in {folder.parent} is being run by another process right now; "
                         "wait for it, or pick another --name") from None
    try:
        yield
    finally:
        lock.release()


def resume(storage: str, name: str, *, printer: Printer = print, address: str | None = None,
           num_cpus: int | None = None) -> StudyResult:
    """Finish an interrupted study from its Ray experiment state and its Optuna storage."""
    spec = read_spec(storage, name)
    if address is not None or num_cpus is not None:
        spec = StudySpec.from_dict({**spec.to_dict(), "address": address, "num_cpus": num_cpus})
    folder = study_folder(storage, name)
    from ray.tune import Tuner

    if not Tuner.can_restore(str(folder / TUNE_DIR)):
        raise StudyError(f"study {name!r} in {storage} has no Ray experiment state to resume from; run it again with --overwrite")
    check_writable(folder)
    init_ray(spec.address, spec.num_cpus)
    check_gpus(spec)
    with _study_lock(folder, name):
        return _fit(spec, folder, printer, restore=True)


def _fit(spec: StudySpec, folder: Path, printer: Printer, *, restore: bool) -> StudyResult:
    from ray import tune

    t0 = time.perf_counter()
    # Save Ray's experiment state every few seconds (default: 10+), so a killed driver loses less.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "3")
    n_slots = slots(spec)
    concurrent = spec.max_concurrent or n_slots
    trainable = make_trainable(spec)
    if restore:
        tuner = tune.Tuner.restore(str(folder / TUNE_DIR), trainable=trainable,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
        _check_restored_searcher(tuner, spec)
        printer(f"resuming study {spec.name!r} in {folder}")
    else:
        searcher = make_searcher(spec, folder)
        metrics = objective_metrics(spec)
        tuner = tune.Tuner(
            trainable,
            param_space=fixed_params(spec),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=make_scheduler(spec),
                num_samples=spec.n_trials,
                trial_dirname_creator=_trial_dirname,
                max_concurrent_trials=concurrent,
                reuse_actors=True,
                metric=None if spec.multi_objective else metrics[0],
                mode=None if spec.multi_objective else spec.mode,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(folder),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=_make_callbacks(spec, folder, printer),
                verbose=0,
                log_to_file=True,
            ),
        )
        printer(
            f"study {spec.name!r}: {spec.n_trials} trials x up to {spec.epochs} epochs, "
            f"{concurrent} at a time, objective {'+'.join(spec.objective)} ({spec.mode}), "
            f"scheduler {spec.scheduler if not spec.multi_objective else 'none'}; results in {folder}"
        )
    tuner.fit()
    df = results.load(folder, "trials")
    finished = int(df["status"].isin(["completed", "pruned", "failed"]).sum()) if len(df) else 0
    if finished < spec.n_trials:
        # Ray stopped on Ctrl-C and saved its state; the finished trials' rows are all on disk.
        raise StudyInterrupted(
            f"study {spec.name!r} stopped with {finished} of {spec.n_trials} trials finished; finish it with "
            f"`vae-study resume --name {spec.name} --storage {spec.storage}`"
        )
    if restore:
        _close_stale_optuna_trials(folder, spec)
    wall = time.perf_counter() - t0
    best = best_trial(df, spec)
    return StudyResult(spec.name, folder, df, best, wall)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def fixed_params(spec: StudySpec) -> dict[str, Any]:
    """Tune's param_space: every TrainConfig value that is not searched (the searcher adds those)."""
    searched = set(spec.space) | set(spec.grid)
    if spec.beta_times_latent:
        searched.add("beta")
    return {k: v for k, v in spec.base_config().to_dict().items() if k not in searched}


def _check_restored_searcher(tuner: Any, spec: StudySpec) -> None:
    """Guard against ray #30861: a restore must keep the OptunaSearch on our SQLite study."""
    try:
        search_alg = tuner._local_tuner.get_tune_config().search_alg
    except AttributeError:  # pragma: no cover - private API moved
        return
    inner = getattr(search_alg, "searcher", search_alg)
    inner = getattr(inner, "searcher", inner)
    from ray.tune.search.optuna import OptunaSearch

    if not isinstance(inner, OptunaSearch):
        raise StudyError(f"restored study {spec.name!r} lost its Optuna searcher ({type(inner).__name__}); cannot resume safely")


def _close_stale_optuna_trials(folder: Path, spec: StudySpec) -> int:
    """After a resumed study ends, an Optuna trial still RUNNING was asked for by the killed driver
    after Ray last saved its state, and never ran: mark it FAIL so the study reads true."""
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / OPTUNA_DB}")
    study = optuna.load_study(study_name=spec.name, storage=storage)
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        storage.set_trial_system_attr(t._trial_id, "vae_study_note", "asked before a driver crash; never ran")
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)


def compact_study(folder: str | Path) -> dict[str, int]:
    """``results.compact`` under the study's lock: never while a driver is writing."""
    folder = Path(folder).resolve()
    with _study_lock(folder, folder.name):
        return results.compact(folder)


def best_trial(df: Any, spec: StudySpec) -> dict[str, Any] | None:
    """The best completed or pruned trial by the (first) objective; the report's winner too."""
    from analysis.metrics import winner

    if df is None or len(df) == 0:
        return None
    w = winner(df, spec.mode)
    return None if w is None else w.to_dict()


def summary_lines(res: StudyResult, spec: StudySpec) -> list[str]:
    df = res.trials
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    lines = [
        f"study {res.name!r} finished in {res.wall_seconds:.1f} s: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("completed", "pruned", "failed")),
    ]
    b = res.best
    if b:
        params = " ".join(
            f"{k}={b[f'param_{k}']:.4g}" if isinstance(b[f"param_{k}"], float) else f"{k}={b[f'param_{k}']}"
            for k in ("latent_dim", "beta", "lr", "arch") if f"param_{k}" in b
        )
        lines.append(f"best trial {b['trial_id']}: {params}")
        lines.append(
            f"  val -ELBO {b['val_elbo']:.2f} (recon {b['val_recon']:.2f}, KL {b['val_kl']:.2f}) at epoch "
            f"{int(b['best_epoch'])}/{int(b['epochs_run'])}; test MSE {b['test_mse']:.5f}, PSNR {b['test_psnr']:.2f} dB"
        )
        lines.append(f"  checkpoint: {res.folder / b['checkpoint'] if b['checkpoint'] else None}")
    lines.append(f"results: {res.folder}  (vae-study results {res.folder})")
    lines.append(f"optuna:  sqlite:///{res.folder / OPTUNA_DB}  (study name {res.name!r})")
    return lines
