"""What ``resume`` mends of the Optuna side: the Optuna study brought in line with the trials rows
(``study.results.recorded``: a trial is finished when its row is written) and with Tune's
unfinished trials, before Tune restores anything; and, after a resumed study ends, the Optuna
trials a killed driver asked for that never ran.

- A trial whose row was written but whose result Optuna was not told yet is told now, from the
  row. A study in a bucket resumes from an Optuna snapshot published every 30 s: a trial it lacks
  is made in it, a recorded one from its row and its epochs, an unfinished one from Tune's config.
- An Optuna trial asked for by the killed driver that Tune never saved and nobody recorded (an
  *orphan*) is handed to the next trial Tune makes (``StudySearch.attach``), so that Optuna
  holds every trial once, none left RUNNING or FAIL.

The Tune side of a resume is ``study.runner.restore``, which calls :func:`mend_optuna`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna

from study.results import tables
from study.search.samplers import optuna_space
from study.search.searcher import TUNE_TRIAL, objective_metrics, tell_from_row
from study.store import Location, OptunaDB
from vae.train import improves, score


@dataclass
class Mended:
    """What :func:`mend_optuna` changed."""

    told: list[str] = field(default_factory=list)  # Optuna told from the row
    made: list[str] = field(default_factory=list)  # Tune trials the Optuna copy lacked, made in it
    orphans: list[int] = field(default_factory=list)  # Optuna trial ids handed to the next trials


def mend_optuna(study: Location, db: OptunaDB, spec: Any, rows: dict[str, dict[str, Any]],
                unfinished: dict[str, dict[str, Any]], saved: list[str]) -> Mended:
    """Bring the Optuna study in line with the rows and with Tune's unfinished trials. A study in
    a bucket resumes from a snapshot published every 30 s, so it may lack trials asked, told or
    even made since: each recorded trial it lacks is made from its row (parameters, intermediate
    values from the epochs table, result), each unfinished one from Tune's saved config; a
    start-up point still waiting there with the same parameters is taken rather than asked again.

    Args:
        rows: the trials rows of the finished trials, by trial id (``recorded_trials``).
        unfinished: Tune's saved config of each unfinished trial, by trial id.
        saved: every trial id in Tune's saved state.
    """
    out = Mended()
    storage = db.storage()
    try:
        ot = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:  # not created yet: nothing was asked
        return out
    trials = ot.get_trials(deepcopy=False)
    named = {t.system_attrs[TUNE_TRIAL]: t for t in trials if TUNE_TRIAL in t.system_attrs}
    if not named and any(t.state != optuna.trial.TrialState.WAITING for t in trials):
        return out  # a study from before Optuna's trials named their Tune trials: nothing to match on
    objectives = [m.removeprefix("best_") for m in objective_metrics(spec)]
    space = optuna_space(spec)
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    epochs = _epochs(study, spec, set(rows) | set(unfinished))
    running = optuna.trial.TrialState.RUNNING
    for tid, row in rows.items():
        if tid not in named:
            params = {k: _value(row.get(f"param_{k}"), d) for k, d in space.items()}
            _make(ot, tid, params, space, epochs.get(tid, {}), waiting)
            out.made.append(tid)
        elif named[tid].state == running:  # its epochs since the snapshot first, then its result
            _steps(ot._storage, named[tid], epochs.get(tid, {}))
        else:
            continue
        number = next(t.number for t in ot.get_trials(deepcopy=False) if t.system_attrs.get(TUNE_TRIAL) == tid)
        tell_from_row(ot, number, row, objectives)
        out.told.append(tid)
    for tid, config in unfinished.items():
        if tid not in named:
            _make(ot, tid, {k: _value(config.get(k), d) for k, d in space.items()}, space, epochs.get(tid, {}), waiting)
            out.made.append(tid)
        elif named[tid].state == running:
            _steps(ot._storage, named[tid], epochs.get(tid, {}))
    known = set(saved) | set(rows)
    out.orphans = [t._trial_id for t in ot.get_trials(deepcopy=False)
                   if t.state == optuna.trial.TrialState.RUNNING and t.system_attrs.get(TUNE_TRIAL) not in known]
    return out


def _value(v: Any, dist: Any) -> Any:
    if isinstance(dist, optuna.distributions.IntDistribution):
        return int(v)
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return float(v)
    return v.item() if hasattr(v, "item") else v


def _make(ot: Any, tid: str, params: dict[str, Any], space: dict[str, Any], steps: dict[int, float],
          waiting: list) -> None:
    """An Optuna trial, RUNNING, for Tune trial ``tid``: a waiting start-up point with these
    parameters if there is one, else a new trial."""
    storage = ot._storage
    match = next((w for w in waiting if w.system_attrs.get("fixed_params") == params), None)
    if match is not None:
        waiting.remove(match)
        storage.set_trial_state_values(match._trial_id, optuna.trial.TrialState.RUNNING)
        trial_id = match._trial_id
        for k, v in params.items():
            storage.set_trial_param(trial_id, k, space[k].to_internal_repr(v), space[k])
    else:
        template = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params=params,
                                             distributions=dict(space))
        trial_id = storage.create_new_trial(ot._study_id, template_trial=template)
    storage.set_trial_system_attr(trial_id, TUNE_TRIAL, tid)
    for step, value in steps.items():
        storage.set_trial_intermediate_value(trial_id, step, value)


def _steps(storage: Any, trial: Any, steps: dict[int, float]) -> None:
    """The intermediate values a running trial reported after the snapshot was published."""
    for step, value in steps.items():
        if step not in trial.intermediate_values:
            storage.set_trial_intermediate_value(trial._trial_id, step, value)


def _epochs(study: Location, spec: Any, trial_ids: set[str]) -> dict[str, dict[int, float]]:
    """Optuna's intermediate values of these trials, from the epochs table: at each epoch, the
    objective at the best epoch so far (what the trials report as ``best_<objective>``; a study of
    one objective selects its best epoch by it, ``StudySpec.select``). None for a study of two
    objectives (Optuna keeps none)."""
    if spec.multi_objective or not trial_ids or not study.is_dir("epochs"):
        return {}
    objective = spec.objective[0]
    ep = tables.load(study, "epochs")
    out: dict[str, dict[int, float]] = {}
    for tid, rows in ep[ep["trial_id"].isin(trial_ids)].sort_values("epoch").groupby("trial_id"):
        best, value, steps = math.inf, None, {}
        for r in rows.to_dict("records"):
            this = score(r, *spec.select)
            if improves(this, best):
                best, value = this, r[objective]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                steps[int(r["epoch"])] = float(value)
        out[str(tid)] = steps
    return out


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
