"""The search: an Optuna sampler (TPE by default, or random, QMC, CMA-ES, GP, NSGA-II, a grid) on
the study's Optuna storage, and ASHA.

The Optuna study is Optuna's journal file, ``STUDY/optuna.log`` (``study.storage.OptunaDB``).
No file is appended to in an object store. For a study in a bucket the driver works on a copy in
a local cache folder and publishes a snapshot of it at most every 30 s as trials are asked and
told, and at the end; ``resume`` starts from that snapshot and mends what it lacks from the
trials table (``study.restore``). On a file system the study's file is the storage itself.
"""
from __future__ import annotations

import math
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from study.reports import each_epoch
from study.restore import TUNE_TRIAL, tell_from_row
from study.spec import StudySpec
from study.storage import OptunaDB


def objective_metrics(spec: StudySpec) -> list[str]:
    """Tune metric names: the best-so-far value of each objective (at the best -ELBO epoch)."""
    return [f"best_{m}" for m in spec.objective]


def optuna_space(spec: StudySpec) -> dict[str, Any]:
    od = optuna.distributions

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


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch on the study's OptunaDB, telling Optuna what an Optuna user expects.

    - Every trial has one intermediate value per epoch, the epochs a report carries included:
      Tune does not pass a trial's stopping result to ``on_trial_result``, so it is reported
      when the trial ends.
    - Optuna is told a trial's result from its trials row, once the recorder has written it
      (``tell_recorded``): a trial ASHA stopped before its last epoch is PRUNED, not COMPLETE
      (TPE treats the two differently). The row is the one record of a finished trial, so a
      driver killed between the two leaves nothing a resume cannot mend (``study.restore``).
    - Each Optuna trial names the Tune trial it was asked for (a system attribute), so a resumed
      driver maps them from the storage, whatever Tune's older saved state says.
    - A study in a bucket publishes a snapshot of its Optuna file at most every
      ``OptunaDB.PUBLISH_EVERY_S`` as trials are asked and told, and at the end.
    - After a restore it reopens this study's working copy, never the old driver's files.

    Args:
        db: the study's OptunaDB.
        max_epochs: a trial's full length.
    """

    def __init__(self, *, db: OptunaDB, max_epochs: int, **kwargs: Any) -> None:
        self._db = db
        self._max_epochs = max_epochs
        self._steps: dict[str, set[int]] = {}  # intermediate steps stored, per trial (a cache)
        # a resumed driver: a trial may have stored steps, or be told already, by the killed one
        self._resumed = False
        self._orphans: list[int] = []  # Optuna trials a killed driver asked for that Tune never saved
        super().__init__(storage=db.storage(), **kwargs)

    def _report(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or self.metric not in result or trial_id not in self._ot_trials:
            return  # Optuna keeps no intermediate values for multi-objective studies
        ot_trial = self._ot_trials[trial_id]
        # A resumed trial repeats no step; a retried one may (Optuna would warn and ignore it).
        # The steps already stored are read once per trial per driver, then kept here.
        steps = self._steps.get(trial_id)
        if steps is None:
            stored = self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values if self._resumed else {}
            steps = self._steps[trial_id] = set(stored)
        for r in each_epoch(result):
            step = int(r["epoch"])
            if step not in steps and self.metric in r:
                ot_trial.report(float(r[self.metric]), step)
                steps.add(step)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def attach(self, db: OptunaDB, orphans: list[int] = ()) -> None:
        """Use this study's storage, and hand the ``orphans`` (Optuna trial ids: asked for by a
        killed driver, never saved by Tune nor recorded) to the next trials Tune makes. Call
        after ``Tuner.restore``, before ``fit``."""
        self._db = db
        self._orphans = list(orphans)

    def suggest(self, trial_id: str) -> Any:
        if trial_id not in self._ot_trials and self._orphans:
            orphan = optuna.trial.Trial(self._ot_study, self._orphans.pop(0))
            if not callable(self._space):
                # Optuna's ask stores a trial, then its parameters one by one: the killed driver
                # may have died in between. Draw the missing ones now (a start-up point's fixed
                # values stay fixed), or Tune's trial would train on defaults Optuna never saw.
                for name, dist in self._space.items():
                    if name not in orphan.params:
                        orphan._suggest(name, dist)
            self._ot_trials[trial_id] = orphan
        params = super().suggest(trial_id)
        if params is not None and trial_id in self._ot_trials:
            self._ot_study._storage.set_trial_system_attr(self._ot_trials[trial_id]._trial_id, TUNE_TRIAL, trial_id)
        self._db.publish(force=False)
        return params

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tune's word that a trial ended: its stopping epoch is reported. Optuna is told its
        result when its row is written (:meth:`tell_recorded`)."""
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if result and not error:
            self._report(trial_id, result)  # the stopping epoch
        self._completed_trials.add(trial_id)

    def tell_recorded(self, trial_id: str, row: dict[str, Any]) -> None:
        """Tell Optuna a trial's result from its trials row, just written (the recorder calls this)."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        objectives = [m.removeprefix("best_") for m in (self.metric if isinstance(self.metric, list) else [self.metric])]
        tell_from_row(self._ot_study, ot_trial, row, objectives)
        self._completed_trials.add(trial_id)
        self._db.publish(force=False)

    def save(self, checkpoint_path: str) -> None:
        """Tune's periodic save of the searcher, without what :meth:`restore` reads back from the
        storage: Ray's OptunaSearch pickles the Optuna study, whose storage cache holds every
        trial, so each save cost time and bytes linear in the study (6% of the driver's time at
        7,400 trials). Kept: the sampler (its random state), the space, the trials Tune knows as
        Optuna trial ids, the completed set."""
        import pickle

        state = {k: v for k, v in self.__dict__.items() if k not in ("_ot_study", "_storage", "_db", "_steps")}
        state["_ot_trials"] = {tid: t._trial_id for tid, t in self._ot_trials.items()}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's saved searcher, on this driver's storage. Which Optuna trial belongs to which
        Tune trial, and which are finished, is read from the storage: Tune's saved state may be
        older than the Optuna study (it is saved every few seconds)."""
        db, orphans = self._db, self._orphans
        super().restore(checkpoint_path)
        self._db, self._orphans, self._resumed, self._steps = db, orphans, True, {}
        storage = db.storage()
        self._storage = storage
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=storage,
                                           sampler=self._sampler, pruner=optuna.pruners.NopPruner())
        frozen = {t._trial_id: t for t in self._ot_study.get_trials(deepcopy=False)}
        ids = {t.system_attrs[TUNE_TRIAL]: t._trial_id for t in frozen.values() if TUNE_TRIAL in t.system_attrs}
        if not ids:  # a study from before Optuna's trials named their Tune trials: Tune's own map
            ids = {tid: t if isinstance(t, int) else t._trial_id for tid, t in self._ot_trials.items()}
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, i) for tid, i in ids.items()}
        self._completed_trials = {tid for tid, i in ids.items() if i in frozen and frozen[i].state.is_finished()}


def startup_count(spec: StudySpec) -> int:
    """TPE's start-up trials before it models: ``--startup-trials``, else min(10, max(2, trials // 4))."""
    return spec.startup_trials if spec.startup_trials is not None else min(10, max(2, spec.trials // 4))


def spread_points(space: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations spread over ``space`` (Optuna distributions): a scrambled Sobol
    sequence (torch.quasirandom, seeded), mapped through each distribution, on a log scale where
    the distribution is log-scaled. They cover the space more evenly than ``n`` random draws.
    (torch's engine rather than scipy's: the driver has torch loaded already, and importing
    scipy.stats cost 0.5 s before the first trial could start.)"""
    from torch.quasirandom import SobolEngine

    if n < 1 or not space:
        return []
    od = optuna.distributions
    names = sorted(space)
    unit = SobolEngine(len(names), scramble=True, seed=seed).draw(n).double().tolist()  # n x dims, [0, 1)
    points = []
    for row in unit:
        point: dict[str, Any] = {}
        for name, u in zip(names, row):
            dist = space[name]
            if isinstance(dist, od.CategoricalDistribution):
                point[name] = dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
                continue
            lo, hi = float(dist.low), float(dist.high)
            x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if dist.log else lo + u * (hi - lo)
            if isinstance(dist, od.IntDistribution):
                point[name] = min(int(dist.high), max(int(dist.low), int(round(x))))
            else:
                point[name] = min(hi, max(lo, x))
        points.append(point)
    return points


# Model-based samplers that start from a few configurations spread over the space (Sobol).
_WITH_STARTUP = ("tpe", "gp")


def uses_constant_liar(spec: StudySpec, concurrent: int) -> bool:
    """TPE's constant liar: trials running at once count as (bad) results, so that two asked at
    the same time are not sent to the same spot. On whenever more than one trial runs at once,
    unless the study says otherwise."""
    return spec.sampler == "tpe" and (spec.constant_liar if spec.constant_liar is not None else concurrent > 1)


TPE_HISTORY = 1000  # the most finished trials TPE fits its model on (``TPEHistorySampler``)
TPE_BEST = 100  # of which the best completed ones always count


class TPEHistorySampler(optuna.samplers.TPESampler):
    """Optuna's TPE, fitting on at most ``TPE_HISTORY`` finished trials: the ``TPE_BEST`` best
    completed ones and the most recent others, plus the running ones (the constant liar).

    TPE fits on every finished trial at every ask, so an ask costs time linear in the study
    (8 ms at 1,000 trials, 62 ms at 10,000 here) and a study quadratic time in its trials.
    Up to ``TPE_HISTORY`` trials nothing changes. Beyond, the good group TPE models (the best
    ``min(ceil(0.1 n), 25)`` trials: completed ones rank before pruned ones) is the same as on
    the whole study, and the rest is its most recent trials, those TPE's own weights favour.
    A study of several objectives fits on all its trials.
    """

    def _sample(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return super()._sample(_History(study, TPE_HISTORY, TPE_BEST), trial, search_space)


class _History:
    """A study as TPE reads it, holding at most ``size`` finished trials (``TPEHistorySampler``)."""

    def __init__(self, study: Any, size: int, best: int) -> None:
        self._study, self._size, self._best = study, size, best

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[Any]:
        trials = self._study._get_trials(*args, **kwargs)
        if len(self._study.directions) > 1:  # several objectives: TPE's good group is a Pareto front
            return trials
        return recent_and_best(trials, self._study.direction, self._size, self._best)


def recent_and_best(trials: list[Any], direction: Any, size: int, best: int) -> list[Any]:
    """Of ``trials`` (in trial order), all the running ones and at most ``size`` finished ones:
    the ``best`` best completed ones and the most recent others, in trial order.

    One pass over the trials, by position, reading each trial's state and stored values once
    (its ``value`` and ``number`` properties check and copy: half of this at 10,000 trials)."""
    if len(trials) <= size:  # the common case, at every ask: no pass over the trials
        return trials
    import heapq

    running, complete = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
    sign = 1.0 if direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    finished: list[int] = []  # positions of the finished trials, in trial order
    scored: list[tuple[float, int]] = []  # (signed value, position) of the completed ones
    for i, t in enumerate(trials):
        state = t.state
        if state == running:
            continue
        finished.append(i)
        if state == complete:
            scored.append((sign * t.values[0], i))
    if len(finished) <= size:
        return trials
    keep = {i for _, i in heapq.nsmallest(best, scored)}  # ties: the earlier trial
    for i in reversed(finished):
        if len(keep) >= size:
            break
        keep.add(i)
    return [t for i, t in enumerate(trials) if i in keep or t.state == running]


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable again: Tune pickles the study's searcher, its sampler with it,
    when the study starts and at each save, and Optuna 5.1's genetic samplers hold a thread lock
    (``_thread_lock``), which no pickle takes. The lock is left out and made anew when loaded."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_thread_lock" in state:
            import threading

            self._thread_lock = threading.Lock()


# Optuna names what its genetic samplers keep in a study after the class (``NSGAIISampler:...``):
# the subclass keeps Optuna's names, so a study resumed across versions reads its generations.
for _key in ("_GENERATION_KEY", "_PARENT_CACHE_KEY_PREFIX"):
    if _key in vars(optuna.samplers.NSGAIISampler):
        setattr(NSGAIISampler, _key, vars(optuna.samplers.NSGAIISampler)[_key])


def make_sampler(spec: StudySpec, concurrent: int = 1) -> Any:
    """The study's Optuna sampler, seeded."""
    s, seed = spec.sampler, spec.seed
    if s == "grid":
        return optuna.samplers.GridSampler({k: list(v) for k, v in spec.grid.items()}, seed=seed)
    if s == "tpe":
        return TPEHistorySampler(seed=seed, multivariate=True, n_startup_trials=startup_count(spec),
                                 constant_liar=uses_constant_liar(spec, concurrent))
    if s == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_count(spec))
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "qmc":
        import warnings

        with warnings.catch_warnings():  # "experimental since v3.0": known, and nothing to act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                              warn_independent_sampling=False, warn_asynchronous_seeding=False)
    if s == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if s == "nsgaii":
        return NSGAIISampler(seed=seed, population_size=max(4, min(50, spec.n_trials // 4)))
    raise ValueError(f"unknown sampler {s!r}")


def sampler_notes(spec: StudySpec) -> list[str]:
    """One line for each part of the space the sampler cannot model itself: Optuna then samples
    that part at random (its independent sampler)."""
    space = optuna_space(spec)
    categorical = sorted(n for n, d in space.items() if isinstance(d, optuna.distributions.CategoricalDistribution))
    numeric = sorted(set(space) - set(categorical))
    if spec.sampler == "cmaes" and categorical:
        return [f"note: CMA-ES models numbers only; {', '.join(categorical)} is drawn at random (Optuna's fallback)"]
    if spec.sampler == "cmaes" and len(numeric) < 2:
        return ["note: CMA-ES needs two or more numeric parameters; with one, every trial is drawn at random"]
    if spec.sampler == "qmc" and categorical:
        return [f"note: QMC spreads numbers only; {', '.join(categorical)} is drawn at random (Optuna's fallback)"]
    return []


def make_searcher(spec: StudySpec, db: OptunaDB, concurrent: int = 1) -> StudySearch:
    points = None
    if spec.sampler in _WITH_STARTUP and spec.startup == "sobol":  # they count these as start-up trials
        points = spread_points(optuna_space(spec), startup_count(spec), spec.seed)
    sampler = make_sampler(spec, concurrent)
    metrics = objective_metrics(spec)
    return StudySearch(
        db=db,
        max_epochs=spec.epochs,
        space=optuna_space(spec),
        metric=metrics if spec.multi_objective else metrics[0],
        mode=[spec.mode] * len(metrics) if spec.multi_objective else spec.mode,
        sampler=sampler,
        study_name=spec.name,
        points_to_evaluate=points,
    )


def make_scheduler(spec: StudySpec) -> Any:
    """ASHA on the study's epochs, or first-in-first-out (no early stopping); either looks for the
    next trial to run among the unfinished ones only (``LiveScan``)."""
    if spec.scheduler == "none" or spec.multi_objective:
        return StudyFIFO()
    return StudyASHA(
        time_attr="epoch",  # a trial reports at the rungs, not every epoch (study.reports)
        max_t=spec.epochs,
        grace_period=min(spec.grace_period, spec.epochs),
        reduction_factor=spec.reduction_factor,
    )


class LiveScan:
    """Tune's FIFO choice of the next trial, without its scan of every trial at every step.

    ``FIFOScheduler.choose_trial_to_run`` walks the whole trial list for a PENDING trial, and again
    for a PAUSED one, at each step of Tune's loop: 12.6% of a 10,000-trial study's driver. Within
    one driver a TERMINATED or ERROR trial never runs again, so the walk starts after the leading
    run of them (kept per process, never pickled: a resumed driver may turn an ERROR trial back
    to PENDING). A trial Tune retries goes from RUNNING to PENDING within one call, moved to the
    end of the list; only trials past the start move, so those before it stay finished."""

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        from ray.tune.experiment import Trial

        trials = tune_controller.get_trials()
        start = self.__dict__.get("_live_from", 0)
        if start > len(trials):
            start = 0
        while start < len(trials) and trials[start].status in (Trial.TERMINATED, Trial.ERROR):
            start += 1
        self._live_from = start
        for wanted in (Trial.PENDING, Trial.PAUSED):
            for i in range(start, len(trials)):
                if trials[i].status == wanted:
                    return trials[i]
        return None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_live_from", None)
        return state


class StudyASHA(LiveScan, ASHAScheduler):
    """Tune's ASHA, choosing the next trial as ``LiveScan`` does."""


class StudyFIFO(LiveScan, FIFOScheduler):
    """Tune's first-in-first-out scheduler, choosing the next trial as ``LiveScan`` does."""


def asha_rungs(spec: StudySpec) -> list[int]:
    """Epochs at which ASHA may stop a trial (it decides at the first result at or past each rung):
    grace_period * reduction_factor**k up to max_t. Trials persist a checkpoint there."""
    if spec.scheduler == "none" or spec.multi_objective:
        return []
    rungs, t = [], float(min(spec.grace_period, spec.epochs))
    while t < spec.epochs:
        rungs.append(math.ceil(t))
        t *= spec.reduction_factor
    return rungs


def unwrap_searcher(search_alg: Any) -> Any:
    """The StudySearch under Tune's wrappers (a concurrency limiter), or None if it is not one."""
    inner = search_alg
    while hasattr(inner, "searcher"):
        inner = inner.searcher
    return inner if isinstance(inner, StudySearch) else None


def close_stale_trials(db: OptunaDB, name: str) -> int:
    """After a resumed study ends, an Optuna trial still RUNNING was asked for by the killed driver
    after Ray last saved its state, and never ran: mark it FAIL so the study reads true."""
    storage = db.storage()
    study = optuna.load_study(study_name=name, storage=storage)
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        storage.set_trial_system_attr(t._trial_id, "vae_study_note", "asked before a driver crash; never ran")
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)


