"""What a study holds, by name: the files and folders of ``<storage>/<name>/``.

A study lives in ``<storage>/<name>/``::

    study.json       the StudySpec, so ``resume`` rebuilds the same trainable and settings
    optuna.log       the Optuna study (Optuna's journal file; optuna.db, SQLite, for a study made
                     before it); on a bucket, a snapshot of the driver's working copy
    tune/            Ray Tune's experiment: trial logs (TensorBoard event files), checkpoints, state
    trials/ epochs/ digits/   the Parquet results table (study.results)
    report/          index.html, PNGs, summary.json, cache/
"""
from __future__ import annotations

SPEC_FILE = "study.json"
OPTUNA_DB = "optuna.db"  # a study from before the journal: SQLite
OPTUNA_LOG = "optuna.log"  # Optuna's journal file (JournalFileBackend), appended to
TUNE_DIR = "tune"
REPORT_DIR = "report"
