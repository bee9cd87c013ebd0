"""What is kept of every trial: its rows in the Parquet results table, and the queries on them.

Owns: the tables' schema, their files (one per trial per table, written whole) and their
reading back (``tables``); the rows themselves (``rows``: the trials row of a trial and of a
refit, per-digit test rows, where it ran); the epochs a Tune report carries (``epochs``); the
Tune callback that writes them from the driver (``recorder``); the rule that a trial is
finished when its trials row is written (``recorded``); and what finished trials keep of their
checkpoints (``retention``). The query API users call is offered here::

    from study.results import load, read_arrow, query
    trials = load("studies/demo")                 # pandas; works while the study runs

May import: ``study.spec``, ``study.store``, ``study.errors``, ``vae``. A new table or column
goes in ``tables.py``; a new row in ``rows.py``.
"""
from __future__ import annotations

from study._lazy import exports

__all__, __getattr__ = exports(__name__, {
    **dict.fromkeys(("SCHEMA_VERSION", "TABLES", "TRIAL_COLUMNS", "EPOCH_COLUMNS", "DIGIT_COLUMNS", "COLUMNS",
                     "COMPACTED", "FINISHED", "REFIT", "READ_BATCH", "parquet_bytes", "write_rows", "write_trial",
                     "table_files", "load", "read_arrow", "read_trial", "drop_orphans", "compact", "search_trials",
                     "finished", "rank", "best_first", "study_modes", "winner", "winners_by_latent", "query"),
                    ".tables"),
    **dict.fromkeys(("CARRIED", "each_epoch"), ".epochs"),
    "recorded_trials": ".recorded",
    "ResultsRecorder": ".recorder",
    "Retention": ".retention",
})
