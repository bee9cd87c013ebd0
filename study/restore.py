"""Resuming a killed study: Ray Tune's saved state and the Optuna study made to agree with what
the study recorded, then Tune's own restore.

The rule, in one place: **a trial is finished when its trials row is written.** The recorder
writes that row last, and only then is Optuna told the trial's result
(``StudySearch.tell_recorded``). A driver can be killed at any moment, and Tune saves its own
state only every few seconds, in separate files (uploaded apart, for a study in a bucket). So
before Tune restores anything, :func:`reconcile` brings its saved state and Optuna in line with
the rows:

- A saved trial with a row is finished in Tune's state (TERMINATED; ERROR if it failed): Tune
  does not run it again, so the searcher, the recorder, the trackers and the progress lines
  never hear of it twice.
- A saved trial without a row is unfinished (PENDING): Tune continues it from its newest
  checkpoint, an errored one too (its worker died with the driver; one that fails for real
  fails again).
- The checkpoints of an unfinished trial are made to match what Tune's saved state names
  (:func:`_mend_checkpoints`). Tune deletes a trial's oldest checkpoint the instant a newer one
  registers, and saves the state that names the newer one only later: a driver killed between
  the two leaves a state whose newest checkpoint is gone, and Tune would fail the trial for good.
  That checkpoint is remade from the oldest newer one that can be continued (every checkpoint
  Tune registered had its epochs recorded first), and the checkpoints newer than the one the
  state names are deleted, since the trial writes them again.
- Tune's count of the trials it made is the saved trials plus the recorded trials it never
  saved (made and finished after its last save); its concurrency limiter holds exactly the
  unfinished ones, so no slot waits forever for a trial that is done.
- A trial whose row was written but whose result Optuna was not told yet is told now, from the
  row. A study in a bucket resumes from an Optuna snapshot published every 30 s: a trial it lacks
  is made in it, a recorded one from its row and its epochs, an unfinished one from Tune's config.
- An Optuna trial asked for by the killed driver that Tune never saved and nobody recorded (an
  *orphan*) is handed to the next trial Tune makes (``StudySearch.attach``), so that Optuna
  holds every trial once, none left RUNNING or FAIL.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

from study import results
from study.errors import StudyError
from study.storage import TUNE_DIR, Location, OptunaDB

# Optuna's system attribute naming the Ray Tune trial an Optuna trial was asked for.
TUNE_TRIAL = "vae_study_tune_trial"
_EXPERIMENT_STATE = "experiment_state-"
_SEARCH_STATE = "search_gen_state-"


@dataclass
class Reconciled:
    """What :func:`reconcile` found and changed (the tests read it; the resume prints it)."""

    recorded: int = 0  # trials with a row: finished
    saved: list[str] = field(default_factory=list)  # trials in Tune's saved state
    unfinished: list[str] = field(default_factory=list)  # saved, no row: Tune continues them
    finished_in_tune: list[str] = field(default_factory=list)  # saved unfinished, but recorded: now finished
    remade: list[str] = field(default_factory=list)  # unfinished, its saved newest checkpoint remade
    continued: list[str] = field(default_factory=list)  # saved errored without a row: continued
    unsaved_recorded: list[str] = field(default_factory=list)  # recorded, never saved by Tune
    counter: tuple[int, int] | None = None  # Tune's trial count (before, after) where it changed
    told: list[str] = field(default_factory=list)  # Optuna told from the row
    made: list[str] = field(default_factory=list)  # Tune trials the Optuna copy lacked, made in it
    orphans: list[int] = field(default_factory=list)  # Optuna trial ids handed to the next trials


def has_tune_state(study: Location) -> bool:
    """Tune saved an experiment state (it does at its first step, before any trial starts)."""
    return any(_is_state(f) for f in study.files(TUNE_DIR)) if study.is_dir(TUNE_DIR) else False


def _is_state(name: str) -> bool:
    return name.startswith(_EXPERIMENT_STATE) and name.endswith(".json")


def recorded_trials(study: Location) -> dict[str, dict[str, Any]]:
    """The search's trials rows (no refit rows), by trial id: the trials that are finished."""
    df = results.search_trials(results.load(study, "trials")) if study.is_dir("trials") else None
    if df is None or not len(df):
        return {}
    return {str(r["trial_id"]): r for r in df.to_dict("records")}


def reconcile(study: Location, db: OptunaDB, spec: Any) -> Reconciled:
    """Make Tune's saved state (``tune/``) and the Optuna study agree with the trials rows. Call
    with the study locked, after ``db.fetch()``, before ``Tuner.restore``."""
    out = Reconciled()
    rows = recorded_trials(study)
    out.recorded = len(rows)
    files = study.files(TUNE_DIR)
    states = sorted(f for f in files if _is_state(f))
    if not states:
        return out
    state_rel = f"{TUNE_DIR}/{states[-1]}"  # Tune restores the newest by name
    state = json.loads(study.read_text(state_rel))
    configs, run_metadata = _reconcile_trials(state, rows, out)
    for tid, meta in run_metadata.items():
        _mend_checkpoints(study, tid, meta, out)
    if out.finished_in_tune or out.continued:
        study.write_text(state_rel, json.dumps(state))
    out.unsaved_recorded = sorted(set(rows) - set(out.saved))
    gens = sorted(f for f in files if f.startswith(_SEARCH_STATE))
    if gens:
        out.counter = _reconcile_search_state(study, f"{TUNE_DIR}/{gens[-1]}",
                                              len(out.saved) + len(out.unsaved_recorded), set(out.unfinished))
    _reconcile_optuna(study, db, spec, rows, configs, out)
    if out.told or out.made:
        db.publish()
    return out


def _reconcile_trials(state: dict[str, Any], rows: dict[str, dict[str, Any]],
                      out: Reconciled) -> tuple[dict[str, dict], dict[str, str]]:
    """Set each saved trial's status by its row (``out`` records what was found and changed);
    returns the unfinished trials' configs and their saved run metadata (Tune's JSON)."""
    configs, run_metadata = {}, {}
    for entry in state.get("trial_data", []):
        trial = json.loads(entry[0])
        tid = str(trial["trial_id"])
        out.saved.append(tid)
        row = rows.get(tid)
        status = trial.get("status")
        if row is not None:
            want = "ERROR" if row["status"] == "failed" else "TERMINATED"
            if status not in ("TERMINATED", "ERROR"):
                out.finished_in_tune.append(tid)
                trial["status"] = want
                entry[0] = json.dumps(trial)
            continue
        out.unfinished.append(tid)
        configs[tid] = trial.get("config", {})
        run_metadata[tid] = entry[1]
        if status == "ERROR":
            # Saved as errored, never recorded: its worker died with the driver. It continues
            # from its checkpoint, as Tune's own resume of an errored trial does.
            out.continued.append(tid)
            trial["status"] = "PENDING"
            entry[0] = json.dumps(trial)
            meta = json.loads(entry[1])
            meta["error_filename"] = meta["pickled_error_filename"] = None
            entry[1] = json.dumps(meta)
    return configs, run_metadata


# A checkpoint Tune deleted that its saved state names but will not restore from: Tune deletes
# it again when newer ones register, and a path that is gone stops that (ray.train's
# _delete_fs_path), so a marker stands in for it.
_STAND_IN = ".deleted-by-tune"


def _mend_checkpoints(study: Location, tid: str, run_metadata: str, out: Reconciled) -> None:
    """Make an unfinished trial's checkpoint folders what Tune's saved state names (see the
    module's docstring). ``run_metadata``: the trial's entry in the saved state, read with Tune's
    own decoder."""
    if '"checkpoint_manager"' not in run_metadata:
        return
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    manager = _TrainingRunMetadata.from_json_state(run_metadata).checkpoint_manager
    latest = manager.latest_checkpoint_result if manager is not None else None
    if latest is None or latest.checkpoint is None:
        return  # Tune starts it from scratch
    newest = _base(latest.checkpoint.path)
    named = {_base(r.checkpoint.path) for r in manager.best_checkpoint_results if r.checkpoint is not None}
    folder = f"{TUNE_DIR}/trial_{tid}"
    have: dict[str, set[str]] = {}
    for path in study.walk(folder):
        parts = path.split("/")
        if len(parts) == 4 and parts[2].startswith("checkpoint_"):
            have.setdefault(parts[2], set()).add(parts[3])
    newer = sorted(n for n in have if n > newest)
    if "state.pt" not in have.get(newest, set()):
        # Gone, or remade only in part by a resume killed as it remade it. (A trial's last
        # checkpoint has no state.pt, but nothing comes after it.)
        source = next((n for n in newer if "state.pt" in have[n]), None)
        if source is not None:
            for name in ("model.pt", "state.pt"):  # state.pt last: it makes the checkpoint one to continue
                if name in have[source]:
                    study.write_bytes(f"{folder}/{newest}/{name}", study.read_bytes(f"{folder}/{source}/{name}"))
            out.remade.append(tid)
    for name in sorted(named - set(have) - {newest}):
        study.write_text(f"{folder}/{name}/{_STAND_IN}", "deleted by Ray Tune after its state was saved; "
                         "this stands in for it until Tune deletes it again\n")
    for name in newer:  # unknown to the saved state: the trial writes them again
        study.delete_tree(f"{folder}/{name}")


def _base(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _reconcile_search_state(study: Location, rel: str, made: int, unfinished: set[str]) -> tuple[int, int] | None:
    """Tune's search generator state: its count of trials made, and its concurrency limiter's
    live trials. Read and written with Tune's own helpers (the file is a pickle Tune made:
    resuming trusts Tune's state already, and no code of ours unpickles anything)."""
    from ray.tune.utils.util import _atomic_save, _load_newest_checkpoint

    name = rel.rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="vae-tune-state-") as tmp:
        study.download(rel, f"{tmp}/{name}")
        gen = _load_newest_checkpoint(tmp, name)
        if not isinstance(gen, dict):
            return None
        changed = False
        count = gen.get("counter")
        if isinstance(count, int) and count != made:
            gen["counter"] = made
            if made < gen.get("total_samples", made):
                gen["finished"] = False  # the trials the state lacks are still to make
            changed = True
        limiter = gen.get("name:ConcurrencyLimiter")
        if isinstance(limiter, dict) and set(limiter.get("live_trials", ())) != unfinished:
            limiter["live_trials"] = set(unfinished)
            limiter["num_unfinished_live_trials"] = len(unfinished)
            changed = True
        if not changed:
            return None
        _atomic_save(gen, tmp, name, f"tmp-{name}")
        study.upload(f"{tmp}/{name}", rel)
    return (count, made) if isinstance(count, int) and count != made else None


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


def _reconcile_optuna(study: Location, db: OptunaDB, spec: Any, rows: dict[str, dict[str, Any]],
                      unfinished: dict[str, dict[str, Any]], out: Reconciled) -> None:
    """Bring the Optuna study in line with the rows and with Tune's unfinished trials. A study in
    a bucket resumes from a snapshot published every 30 s, so it may lack trials asked, told or
    even made since: each recorded trial it lacks is made from its row (parameters, intermediate
    values from the epochs table, result), each unfinished one from Tune's saved config; a
    start-up point still waiting there with the same parameters is taken rather than asked again."""
    import optuna

    from study.search import objective_metrics, optuna_space

    storage = db.storage()
    try:
        ot = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:  # not created yet: nothing was asked
        return
    trials = ot.get_trials(deepcopy=False)
    named = {t.system_attrs[TUNE_TRIAL]: t for t in trials if TUNE_TRIAL in t.system_attrs}
    if not named and any(t.state != optuna.trial.TrialState.WAITING for t in trials):
        return  # a study from before Optuna's trials named their Tune trials: nothing to match on
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
    known = set(out.saved) | set(rows)
    out.orphans = [t._trial_id for t in ot.get_trials(deepcopy=False)
                   if t.state == optuna.trial.TrialState.RUNNING and t.system_attrs.get(TUNE_TRIAL) not in known]


def _value(v: Any, dist: Any) -> Any:
    import optuna

    if isinstance(dist, optuna.distributions.IntDistribution):
        return int(v)
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return float(v)
    return v.item() if hasattr(v, "item") else v


def _make(ot: Any, tid: str, params: dict[str, Any], space: dict[str, Any], steps: dict[int, float],
          waiting: list) -> None:
    """An Optuna trial, RUNNING, for Tune trial ``tid``: a waiting start-up point with these
    parameters if there is one, else a new trial."""
    import optuna

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
    objective at the best -ELBO epoch so far (what the trials report as ``best_<objective>``).
    None for a study of two objectives (Optuna keeps none)."""
    if spec.multi_objective or not trial_ids or not study.is_dir("epochs"):
        return {}
    objective = spec.objective[0]
    ep = results.load(study, "epochs")
    out: dict[str, dict[int, float]] = {}
    for tid, rows in ep[ep["trial_id"].isin(trial_ids)].sort_values("epoch").groupby("trial_id"):
        best_elbo, value, steps = math.inf, None, {}
        for r in rows.to_dict("records"):
            if r["val_elbo"] < best_elbo:
                best_elbo, value = r["val_elbo"], r[objective]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                steps[int(r["epoch"])] = float(value)
        out[str(tid)] = steps
    return out


def restore_tuner(study: Location, trainable: Any, extra: list[Any]) -> tuple[Any, Any, list]:
    """Ray Tune's restore of the study's experiment (reconciled first), with the two things Tune
    keeps but does not hand back publicly: the search algorithm and the callbacks it pickled
    (``extra`` joins them). The one place that reads Tune's private attributes; if a Ray
    upgrade moves them, resuming stops here, in one line, instead of going on without the
    study's searcher or recorder."""
    from ray import tune

    from study.reports import lazy_results

    where = study.ray_storage()
    with lazy_results():  # Tune's restore reads every trial's result.json otherwise
        tuner = tune.Tuner.restore(f"{where['storage_path']}/{TUNE_DIR}", trainable=trainable,
                                   storage_filesystem=where.get("storage_filesystem"),
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    try:
        inner = tuner._local_tuner
        run_config = inner.get_run_config()
        if extra:  # before the trimming of finished trials (study.reports.Trim), which comes last
            from study.reports import Trim

            callbacks = list(run_config.callbacks or [])
            at = next((i for i, c in enumerate(callbacks) if isinstance(c, Trim)), len(callbacks))
            run_config.callbacks = callbacks[:at] + list(extra) + callbacks[at:]
        return tuner, inner._tune_config.search_alg, list(run_config.callbacks or [])
    except AttributeError:
        import ray

        raise StudyError(f"cannot resume with Ray {ray.__version__}: its restored Tuner no longer shows "
                         "its searcher and callbacks where this version of vae-study looks") from None
