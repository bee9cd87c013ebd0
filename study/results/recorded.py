"""The rule, in one place: **a trial is finished when its trials row is written.**

The recorder (``study.results.recorder``) writes a trial's trials row last, after its epochs and
its per-digit rows, and only then is Optuna told the trial's result
(``study.search.searcher.StudySearch.tell_recorded``). A driver can be killed at any moment,
between any two of these writes; whatever Ray Tune's or Optuna's saved state says, ``resume``
takes the rows as the truth (``study.runner.restore`` for Tune's state, ``study.search.mend`` for
Optuna's): a trial with a row is done and never runs again, a trial without one is continued
from its newest checkpoint.
"""
from __future__ import annotations

from typing import Any

from study.results import tables
from study.store import Location


def recorded_trials(study: Location) -> dict[str, dict[str, Any]]:
    """The search's trials rows (no refit rows), by trial id: the trials that are finished."""
    df = tables.search_trials(tables.load(study, "trials")) if study.is_dir("trials") else None
    if df is None or not len(df):
        return {}
    return {str(r["trial_id"]): r for r in df.to_dict("records")}
