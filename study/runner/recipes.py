"""Run and resume studies, each a short recipe read top to bottom: the spec, its store, the
cluster's checks, the search and Tune's Tuner, then the winner's refit and the compaction.

The pieces come from the rooms below (``study/__init__.py`` maps them): ``study.store`` (every
file a study keeps), ``study.spec`` (what the user said), ``study.results`` (the rows and their
recorder), ``study.search`` (Optuna and ASHA), ``study.cluster`` (Ray, resources and the checks
that a study's storage is visible); and from beside this module: ``progress`` (the lines a user
watches), ``trainable`` (one trial), ``refit``, ``restore`` (Tune's side of a resume).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from study import cluster, results
from study.errors import StorageUnreachable, StudyError, StudyInterrupted
from study.spec import StudySpec, read_spec, write_spec
from study.spec.space import RECONSTRUCTION_SPACE, describe
from study.store import TUNE_DIR, Location, OptunaDB, outage, study_location

Printer = Callable[[str], None]
# How often Ray saves its experiment state (and, for a study in a bucket, uploads it): Tune's
# "auto", every 10 s or more, so that the saves take at most 5% of the driver's time. Each save
# holds every trial (10 KB a trial): every 3 s, at 10,000 trials it took 10% of the driver's main
# thread (BENCHMARKS §3e). A killed driver loses no finished trial to a staler state: the trials
# rows are the truth, and ``resume`` makes Ray's state agree with them (``study.runner.restore``).
# ``TUNE_GLOBAL_CHECKPOINT_S`` in the environment overrides it.
STATE_EVERY_S = "auto"
KEEP_CHECKPOINTS = 2  # per trial: see the CheckpointConfig below


@dataclass
class StudyResult:
    name: str
    location: Location
    trials: Any  # pandas DataFrame of the trials table
    best: dict[str, Any] | None
    wall_seconds: float
    write_seconds: float = 0.0  # the driver's Parquet writes
    publish_seconds: float = 0.0  # the driver's Optuna snapshots (a study in a bucket)
    publishes: int = 0
    refit: dict[str, Any] | None = None  # the refit's trials row (study.runner.refit), if one was made
    result_grid: Any = None  # Ray Tune's ResultGrid of this run (or of this resume)
    optuna_storage: str | None = None  # where the Optuna study is: a database URL, or the journal file's path

    def optuna_study(self) -> Any:
        """The study's Optuna study, loaded from its storage (every trial, its intermediate
        values per epoch, pruned trials as PRUNED)."""
        import optuna

        from study.store import open_optuna

        return optuna.load_study(study_name=self.name, storage=open_optuna(self.optuna_storage))

    @property
    def folder(self) -> Path | str:
        """The study folder: a Path on a file system, the URI on a bucket."""
        return self.location.local_path() or self.location.uri

    @property
    def any_finished(self) -> bool:
        return bool(len(self.trials)) and bool(self.trials["status"].isin(results.FINISHED).any())

    def first_error(self) -> str | None:
        failed = self.trials[self.trials["status"] == "failed"] if len(self.trials) else self.trials
        return None if failed.empty else str(failed.sort_values("finished_at")["error"].iloc[0])


def fixed_params(spec: StudySpec) -> dict[str, Any]:
    """Tune's param_space: every TrainConfig value that is not searched (the searcher adds those)."""
    return {k: v for k, v in spec.base_config().to_dict().items() if k not in spec.varied}


def pack_line(spec: StudySpec) -> str:
    """How a packed study trains, said in its first lines."""
    where = (f"the trials sharing a GPU ({spec.gpus_per_trial:g} each)" if spec.gpus_per_trial
             else "the trials on one node's CPUs")
    return (f"pack: up to {spec.pack} of {where} train as one stacked model, each still its own trial "
            "(--no-pack trains each alone)")


def make_trainable(spec: StudySpec) -> Any:
    from ray import tune

    from study.runner.reports import report_every_s
    from study.search import asha_rungs
    from study.runner.trainable import train_trial

    runtime = {"beta_times_latent": spec.beta_times_latent, "cpus_per_trial": spec.cpus_per_trial, "select": spec.select,
               "persist_epochs": asha_rungs(spec), "report_every_s": report_every_s(), "pack": spec.pack,
               "study": spec.name}
    fn = tune.with_parameters(train_trial, runtime=runtime)
    return tune.with_resources(fn, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})


# --------------------------------------------------------------------------- run / resume

def run(spec: StudySpec, *, overwrite: bool = False, printer: Printer = print,
        callbacks: Sequence[Any] = ()) -> StudyResult:
    """Run a new study to completion: spec, store, cluster checks, search and Tune, then the
    winner's refit and the compaction of its tables.

    Args:
        spec: the study (``study.build_spec``).
        overwrite: replace a study of that name in that storage.
        printer: where progress lines go (``print``; a list's ``append`` to keep them).
        callbacks: Ray Tune callbacks (``ray.tune.Callback``) to run beside the study's own.

    Raises:
        StudyError: the study exists already (resume it, or pass ``overwrite``), the storage is
            not writable or not visible to the nodes that run trials, or the cluster cannot
            provide what the spec asks for. Nothing is written before these checks pass.
        StorageUnreachable: the study's bucket did not answer for longer than its
            ``storage_patience``; the study stopped cleanly and ``resume`` finishes it.
    """
    _check_trackers(spec)
    study = study_location(spec.storage, spec.name)
    _refuse_existing(study, spec, overwrite)
    study.parent.check_writable()
    db = OptunaDB(study, spec.optuna_storage)
    with db.lock(spec.name), contextlib.ExitStack() as held:  # a shared database: one line before Ray starts
        held.enter_context(_storage_watch(spec, study, printer))
        view = _connect(spec, study, check_data=True)
        if spec.sampler == "tpe" and spec.constant_liar is None:  # study.json records what ran
            concurrent = spec.max_concurrent or cluster.default_concurrency(spec, view)
            spec = dataclasses.replace(spec, constant_liar=concurrent > 1)
        held.enter_context(study.lock())
        _refuse_existing(study, spec, overwrite)  # again, now that no other driver can race us
        if db.rdb and not overwrite and db.has_study(spec.name):
            raise StudyError(f"an Optuna study {spec.name!r} is in {db.display} already: choose another name, "
                             "or pass --overwrite to replace it")
        return _start(spec, study, view, db, printer, list(callbacks), clear=overwrite)


def resume(storage: str, name: str, *, printer: Printer = print, address: str | None = None,
           num_cpus: int | None = None, shared_storage: bool | None = None,
           storage_patience: float | None = None, callbacks: Sequence[Any] = ()) -> StudyResult:
    """Finish an interrupted study from its Ray experiment state and its Optuna storage, wherever
    its driver was killed (``study.runner.restore``). A study killed before Tune saved any state (no
    trial had started) is started from its ``study.json``. ``callbacks``: Ray Tune callbacks for
    the rest of the study, beside the ones it had.

    Resuming restores Ray Tune's own pickled experiment state (``tune/``): only resume a
    study folder or bucket you trust.
    """
    from study.runner.restore import has_tune_state

    spec = read_spec(storage, name)
    changes = {k: v for k, v in {"address": address, "num_cpus": num_cpus, "shared_storage": shared_storage,
                                 "storage_patience": storage_patience}.items() if v is not None}
    spec = StudySpec.from_dict({**spec.to_dict(), **changes}) if changes else spec
    _check_trackers(spec)
    study = study_location(storage, name)
    study.check_writable()
    db = OptunaDB(study, spec.optuna_storage)
    with db.lock(spec.name), contextlib.ExitStack() as held:  # a shared database: one line before Ray starts
        held.enter_context(_storage_watch(spec, study, printer))
        view = _connect(spec, study, check_data=False)
        held.enter_context(study.lock())
        if not has_tune_state(study):
            # Killed after study.json, before Tune's first step: no trial ran, nothing is lost.
            printer(f"study {name!r} was stopped before any trial started; starting it from its study.json")
            return _start(spec, study, view, db, printer, list(callbacks), clear=True)
        if db.rdb and not db.has_study(spec.name):
            raise StudyError(f"study {name!r}: its Optuna study is not in {db.display}; nothing to resume there")
        db.fetch()
        tuner, recorder, warmer = _restored_tuner(spec, study, db, printer, list(callbacks))
        return _complete(spec, study, tuner, recorder, warmer, db, printer, resumed=True)


def _start(spec: StudySpec, study: Location, view: cluster.ClusterView, db: OptunaDB, printer: Printer,
           callbacks: list[Any], *, clear: bool) -> StudyResult:
    """A new study in ``study`` (``clear``: replacing whatever is there), run to completion."""
    if clear:
        study.delete_tree()
        if db.rdb:
            db.delete_study(spec.name)
    db.reset()
    study.ensure_dir()
    write_spec(study, spec)
    tuner, recorder, warmer = _new_tuner(spec, study, view, db, printer, callbacks)
    return _complete(spec, study, tuner, recorder, warmer, db, printer, resumed=False)


@contextlib.contextmanager
def _storage_watch(spec: StudySpec, study: Location, printer: Printer) -> Iterator[None]:
    """While the study runs: its patience with its storage, and a line for each outage
    (``study.store.outage``, ``study.runner.progress.StorageWatch``)."""
    from study.runner.progress import StorageWatch

    outage.reset()
    outage.set_patience(spec.storage_patience)
    stop = outage.listen(StorageWatch(study.uri, spec.storage_patience, printer))
    try:
        yield
    finally:
        stop()


def _connect(spec: StudySpec, study: Location, *, check_data: bool) -> cluster.ClusterView:
    """Ray, and what it must give the study: the GPUs asked for, storage every trial node sees.
    A new study's data are checked too, while Ray starts (1.7 s off its path to the first
    trial, BENCHMARKS §3), so a data problem surfaces before anything is written."""
    data_checked = _check_data_in_background(spec) if check_data else (lambda quiet=False: None)
    try:
        cluster.init_ray(spec.address, spec.num_cpus)
        view = cluster.view()
        cluster.check_gpus(spec, view)
        cluster.check_storage_visible(study.parent, view, shared=spec.shared_storage)
    except BaseException:
        data_checked(quiet=True)
        raise
    data_checked()
    return view


def _new_tuner(spec: StudySpec, study: Location, view: cluster.ClusterView, db: OptunaDB,
               printer: Printer, extra: list[Any]) -> tuple[Any, Any, Any]:
    """Tune's Tuner for a new study: the trainable, the Optuna searcher, ASHA, the callbacks.
    Returns the tuner, the results recorder and the refit's warmer."""
    from ray import tune

    from study.runner.progress import Progress
    from study.results import ResultsRecorder
    from study.runner.refit import RefitWarmer
    from study.runner.reports import Trim, loggers
    from study.search import make_scheduler, make_searcher, objective_metrics, sampler_notes, uses_constant_liar

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_EVERY_S)
    concurrent = spec.max_concurrent or cluster.default_concurrency(spec, view)
    metric = objective_metrics(spec)[0]
    recorder = ResultsRecorder(study, spec)
    searcher = make_searcher(spec, db, concurrent)
    recorder.on_recorded = searcher.tell_recorded  # Optuna hears of a trial once its row is written
    warmer = RefitWarmer(spec, fixed_params(spec))
    tuner = tune.Tuner(
        make_trainable(spec),
        param_space=fixed_params(spec),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(spec),
            num_samples=spec.n_trials,
            trial_dirname_creator=_trial_dirname,
            max_concurrent_trials=concurrent,
            # A reused actor saves a trial its start-up (1-3 s), but one whose node is lost while
            # Tune resets it for the next trial fails that trial for good (Tune retries only
            # running trials): on a cluster, where nodes come and go, each trial starts its own
            # (found by the launcher test's lost machine).
            reuse_actors=spec.address is None,
            metric=None if spec.multi_objective else metric,
            mode=None if spec.multi_objective else spec.mode,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            **study.ray_storage(),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Tune forces (and waits for) a save of its whole experiment state once a trial has
            # made as many checkpoints as it keeps. Keeping one, that was a save per checkpoint,
            # each the size of every trial so far: at 400 trials most of the driver's time
            # (BENCHMARKS §3b), on a bucket 32% of a study (§8). Keeping two, a crash may send a
            # trial back one persisted checkpoint more, or run a trial that had just finished
            # again from its previous one; the recorder and the searcher then keep what the
            # first run recorded (tests/test_resume.py).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=[recorder, Progress(spec, printer), warmer, *loggers(), *_tracker_callbacks(spec), *extra,
                       Trim()],
            verbose=0,
            log_to_file=True,
        ),
    )
    grow = ", more as the cluster grows" if view.can_grow else ""
    liar = ", constant liar" if uses_constant_liar(spec, concurrent) else ""
    printer(f"study {spec.name!r}: {spec.n_trials} trials x up to {spec.epochs} epochs, "
            f"{concurrent} at a time{grow}, objective {'+'.join(spec.objective)} ({spec.mode}), "
            f"sampler {spec.sampler}{liar}, scheduler {spec.scheduler if not spec.multi_objective else 'none'}; "
            f"results in {study}")
    if spec.pack:
        printer(pack_line(spec))
    if not spec.grid and spec.space == RECONSTRUCTION_SPACE:
        printer(f"space: {describe(spec.space)}, a val_mse study's default ([space] in a config file changes it)")
    for line in sampler_notes(spec):
        printer(line)
    if db.rdb:
        printer(f"optuna: {db.url} (live: optuna-dashboard {db.url}; the password from PGPASSWORD or ~/.pgpass)")
    return tuner, recorder, warmer


def _restored_tuner(spec: StudySpec, study: Location, db: OptunaDB, printer: Printer,
                    extra: list[Any]) -> tuple[Any, Any, Any]:
    """Tune's Tuner of an interrupted study, its saved state first made to agree with the trials
    rows (``study.runner.restore``), with its own searcher and callbacks reattached."""
    from study.runner.restore import reconcile, restore_tuner
    from study.search import unwrap_searcher

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_EVERY_S)
    fixed = reconcile(study, db, spec)
    tuner, search_alg, callbacks = restore_tuner(study, make_trainable(spec), extra)
    searcher = unwrap_searcher(search_alg)
    if searcher is None:  # guard against ray #30861: a restore must keep our Optuna searcher
        raise StudyError(f"restored study {spec.name!r} lost its Optuna searcher; cannot resume safely")
    searcher.attach(db, orphans=fixed.orphans)
    recorder = _attach_callbacks(callbacks, study, printer, done=fixed.recorded)
    recorder.on_recorded = searcher.tell_recorded
    unfinished = len(fixed.unfinished)
    printer(f"resuming study {spec.name!r} in {study}: {fixed.recorded} of {spec.n_trials} trials finished, "
            f"{unfinished} to continue from {'their' if unfinished != 1 else 'its'} last checkpoint, "
            f"{max(0, spec.n_trials - fixed.recorded - unfinished)} to start")
    for tid in fixed.remade:
        printer(f"  trial {tid}: the checkpoint Tune's saved state names was deleted before the kill "
                "(Tune deletes old checkpoints before it saves its state); remade from the next one")
    return tuner, recorder, _warmer(callbacks)


def _complete(spec: StudySpec, study: Location, tuner: Any, recorder: Any, warmer: Any, db: OptunaDB,
              printer: Printer, *, resumed: bool) -> StudyResult:
    """Run the trials to the end, then the winner's refit, then one file per table."""
    t0 = time.perf_counter()
    try:
        return _finish(spec, study, tuner, recorder, warmer, db, printer, resumed=resumed, t0=t0)
    finally:
        leftover = warmer.take() if warmer is not None else None
        if leftover is not None:  # the study stopped before its refit
            import ray

            ray.kill(leftover)
        if spec.pack:  # detached: they would outlive the study on a cluster that goes on
            from study.runner.packing import remove_packs

            done = remove_packs(spec.name)
            if done["packs"]:
                printer(f"packs: {done['packs']} trained {done['member_epochs']} trial-epochs in {done['rounds']} rounds "
                        f"(largest {done['largest_round']}), {done['train_seconds']:.1f} s of training")


def _finish(spec: StudySpec, study: Location, tuner: Any, recorder: Any, warmer: Any, db: OptunaDB,
            printer: Printer, *, resumed: bool, t0: float) -> StudyResult:
    from study.runner.reports import lazy_results
    from study.search import close_stale_trials

    grid = None
    try:
        with lazy_results():
            grid = tuner.fit()
    except Exception:
        if outage.gave_up() is None:  # else Tune's end (its ResultGrid) met the storage given up on: said below
            raise
    finally:
        db.publish()  # nothing, where the study gave up on its storage
    gave_up = outage.gave_up()
    if gave_up is not None:
        raise StorageUnreachable(f"{gave_up}; study {spec.name!r} stopped: once the storage answers, finish it with "
                                 f"`vae-study resume --name {spec.name} --storage {spec.storage}`") from None
    df = results.load(study, "trials")
    finished = int(df["status"].isin(["completed", "pruned", "failed"]).sum()) if len(df) else 0
    if finished < spec.n_trials:
        # Ray stopped on Ctrl-C and saved its state; the finished trials' rows are all in storage.
        raise StudyInterrupted(
            f"study {spec.name!r} stopped with {finished} of {spec.n_trials} trials finished; finish it with "
            f"`vae-study resume --name {spec.name} --storage {spec.storage}`"
        )
    if resumed:
        close_stale_trials(db, spec.name)
        db.publish()
        recorder.retention.sweep(df)  # trials the killed driver finished but did not prune
        if spec.log_to:
            from study.runner import trackers

            trackers.close_stale_runs(spec.log_to, spec.name, df, lambda: results.load(study, "epochs"))
    results.drop_orphans(study, set(df["trial_id"]))
    refit = _refit(spec, study, df, printer, warmer.take() if warmer is not None else None)
    # A finished study is read as one file per table: fast queries, even from a bucket.
    results.compact(study)
    return StudyResult(spec.name, study, df, best_trial(df, spec), time.perf_counter() - t0,
                       write_seconds=recorder.write_seconds, publish_seconds=db.publish_seconds,
                       publishes=db.publishes, refit=refit, result_grid=grid, optuna_storage=db.url)


def _check_trackers(spec: StudySpec) -> None:
    if spec.log_to:  # study.runner.trackers imports W&B's integration (0.65 s): only when asked for
        from study.runner import trackers

        trackers.check(spec.log_to)


def _tracker_callbacks(spec: StudySpec) -> list[Any]:
    if not spec.log_to:
        return []
    from study.runner import trackers

    return trackers.callbacks(spec.log_to, spec.name)


def _check_data_in_background(spec: StudySpec) -> Callable[..., None]:
    """Load the study's data in a thread; the returned function waits for it and raises what
    the load raised (a DataError names the fix), unless ``quiet``."""
    import threading

    failure: list[BaseException] = []

    def load() -> None:
        try:
            from vae.data import load as load_data

            load_data(spec.base_config())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=load, name="vae-study-data-check", daemon=True)
    thread.start()

    def wait(quiet: bool = False) -> None:
        thread.join()
        if failure and not quiet:
            raise failure[0]

    return wait


def _refuse_existing(study: Location, spec: StudySpec, overwrite: bool) -> None:
    if not overwrite and study.has_content():
        raise StudyError(
            f"study {spec.name!r} already exists in {study.parent}: resume it with "
            f"`vae-study resume --name {spec.name} --storage {spec.storage}`, pick another --name, or pass --overwrite"
        )


def _refit(spec: StudySpec, study: Location, trials: Any, printer: Printer, worker: Any) -> dict[str, Any] | None:
    """The winner's refit (study.runner.refit), in ``worker`` when one was warmed during the search. A
    refit that cannot run is reported, not fatal: the search's results stand, and `resume` tries
    the refit again."""
    import ray

    from study.runner.refit import run_refit

    try:
        return run_refit(spec, study, trials, fixed_params(spec), printer, worker=worker)
    except (ray.exceptions.RayError, OSError) as exc:
        printer(f"refit not made: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}; "
                f"`vae-study resume --name {spec.name} --storage {spec.storage}` tries again")
        return None


def _attach_callbacks(callbacks: list, study: Location, printer: Printer, *, done: int) -> Any:
    """Point a restored study's callbacks at this study folder and this printer (``done``: the
    trials finished before); returns the recorder."""
    from study.runner.progress import Progress
    from study.results import ResultsRecorder

    recorder = next((c for c in callbacks if isinstance(c, ResultsRecorder)), None)
    if recorder is None:
        raise StudyError(f"restored study {study.name!r} lost its results recorder; cannot resume safely")
    recorder.attach(study)
    for c in callbacks:
        if isinstance(c, Progress):
            c.attach(printer, done=done)
    return recorder


def _warmer(callbacks: list) -> Any:
    """A restored study's refit warmer (None for a study saved before there was one)."""
    from study.runner.refit import RefitWarmer

    return next((c for c in callbacks if isinstance(c, RefitWarmer)), None)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def compact_study(where: str | os.PathLike | Location) -> dict[str, int]:
    """``results.compact`` under the study's lock: never while a driver is writing."""
    study = Location(where)
    with study.lock():
        return results.compact(study)


def best_trial(df: Any, spec: StudySpec) -> dict[str, Any] | None:
    """The best completed or pruned trial by the (first) objective: ``study.results.winner``."""
    if df is None or len(df) == 0:
        return None
    w = results.winner(df, spec.mode)
    return None if w is None else w.to_dict()
