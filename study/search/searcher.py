"""The Tune searcher: Ray's OptunaSearch on the study's Optuna storage (``study.store.OptunaDB``),
telling Optuna what an Optuna user expects, one Optuna trial per Tune trial.

The Optuna study is Optuna's journal file, ``STUDY/optuna.log``. No file is appended to in an
object store. For a study in a bucket the driver works on a copy in a local cache folder and
publishes a snapshot of it at most every 30 s as trials are asked and told, and at the end;
``resume`` starts from that snapshot and mends what it lacks from the trials table
(``study.search.mend``). On a file system the study's file is the storage itself.
"""
from __future__ import annotations

import math
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from study.results import each_epoch
from study.search.samplers import _WITH_STARTUP, make_sampler, optuna_space, spread_points, startup_count
from study.spec import StudySpec
from study.store import OptunaDB

# Optuna's system attribute naming the Ray Tune trial an Optuna trial was asked for.
TUNE_TRIAL = "vae_study_tune_trial"


def objective_metrics(spec: StudySpec) -> list[str]:
    """Tune metric names: each objective's value at the trial's best epoch so far (``StudySpec.select``)."""
    return [f"best_{m}" for m in spec.objective]


def tell_from_row(ot_study: Any, ot_trial: Any, row: dict[str, Any], objectives: list[str]) -> None:
    """Tell Optuna a trial's result as its trials row records it: failed is FAIL, pruned is
    PRUNED, completed is COMPLETE with the objective values at its best epoch (PRUNED where one
    is missing, as Ray's OptunaSearch does)."""
    import optuna

    state = optuna.trial.TrialState
    values = None
    if row["status"] == "failed":
        told = state.FAIL
    elif row["status"] == "pruned":
        told = state.PRUNED
    else:
        values = [row.get(m) for m in objectives]
        ok = all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in values)
        told = state.COMPLETE if ok else state.PRUNED
        values = [float(v) for v in values] if ok else None
    if values is not None and len(values) == 1:
        values = values[0]
    try:
        ot_study.tell(ot_trial, values, state=told, skip_if_finished=True)
    except RuntimeError as exc:
        # Optuna's grid sampler stops a study whose grid is done, which raises outside
        # Optuna's own optimize(); the result is stored first (Ray's OptunaSearch ignores it too).
        if "Study.stop" not in str(exc):
            raise


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch on the study's OptunaDB, telling Optuna what an Optuna user expects.

    - Every trial has one intermediate value per epoch, the epochs a report carries included:
      Tune does not pass a trial's stopping result to ``on_trial_result``, so it is reported
      when the trial ends.
    - Optuna is told a trial's result from its trials row, once the recorder has written it
      (``tell_recorded``): a trial ASHA stopped before its last epoch is PRUNED, not COMPLETE
      (TPE treats the two differently). The row is the one record of a finished trial, so a
      driver killed between the two leaves nothing a resume cannot mend (``study.runner.restore``).
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


def unwrap_searcher(search_alg: Any) -> Any:
    """The StudySearch under Tune's wrappers (a concurrency limiter), or None if it is not one."""
    inner = search_alg
    while hasattr(inner, "searcher"):
        inner = inner.searcher
    return inner if isinstance(inner, StudySearch) else None
