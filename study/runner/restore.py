"""Resuming a killed study, the Tune side: Ray Tune's saved state made to agree with what the
study recorded (``study.results.recorded``: a trial is finished when its trials row is written),
the Optuna side mended (``study.search.mend``), then Tune's own restore.

A driver can be killed at any moment, and Tune saves its own state only every few seconds, in
separate files (uploaded apart, for a study in a bucket). So before Tune restores anything,
:func:`reconcile` brings its saved state and Optuna in line with the rows:

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
- The Optuna study is told what the rows record and made to hold Tune's unfinished trials
  (``study.search.mend.mend_optuna``).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from typing import Any

from study.errors import StudyError
from study.results import recorded_trials
from study.store import TUNE_DIR, Location, OptunaDB

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
    from study.search import mend_optuna

    mended = mend_optuna(study, db, spec, rows, configs, out.saved)
    out.told, out.made, out.orphans = mended.told, mended.made, mended.orphans
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


def restore_tuner(study: Location, trainable: Any, extra: list[Any]) -> tuple[Any, Any, list]:
    """Ray Tune's restore of the study's experiment (reconciled first), with the two things Tune
    keeps but does not hand back publicly: the search algorithm and the callbacks it pickled
    (``extra`` joins them). The one place that reads Tune's private attributes; if a Ray
    upgrade moves them, resuming stops here, in one line, instead of going on without the
    study's searcher or recorder."""
    from ray import tune

    from study.runner.reports import lazy_results

    where = study.ray_storage()
    with lazy_results():  # Tune's restore reads every trial's result.json otherwise
        tuner = tune.Tuner.restore(f"{where['storage_path']}/{TUNE_DIR}", trainable=trainable,
                                   storage_filesystem=where.get("storage_filesystem"),
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    try:
        inner = tuner._local_tuner
        run_config = inner.get_run_config()
        if extra:  # before the trimming of finished trials (study.runner.reports.Trim), which comes last
            from study.runner.reports import Trim

            callbacks = list(run_config.callbacks or [])
            at = next((i for i, c in enumerate(callbacks) if isinstance(c, Trim)), len(callbacks))
            run_config.callbacks = callbacks[:at] + list(extra) + callbacks[at:]
        return tuner, inner._tune_config.search_alg, list(run_config.callbacks or [])
    except AttributeError:
        import ray

        raise StudyError(f"cannot resume with Ray {ray.__version__}: its restored Tuner no longer shows "
                         "its searcher and callbacks where this version of vae-study looks") from None
