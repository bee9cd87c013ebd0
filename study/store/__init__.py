"""Where a study lives, and the one room that touches its files.

Owns: a study's locations (a folder, or a prefix in a bucket: ``Location``, ``Folder``,
``Bucket``, the ``Store`` protocol they keep), the object-store layer under a bucket (retries,
one PUT per file), what a study folder holds by name (``layout``), and the Optuna study's
storage (its journal file, SQLite, PostgreSQL URLs: ``OptunaDB``). Everything else asks it.

May import: ``study.errors``. Nothing else of ``study``; a new storage backend goes here, as one
class beside ``Folder`` and ``Bucket`` in ``location.py``.
"""
from __future__ import annotations

from study._lazy import exports

__all__, __getattr__ = exports(__name__, {
    **dict.fromkeys(("Store", "Location", "Folder", "Bucket", "study_location", "is_study", "find_studies",
                     "REMOTE_SCHEMES"), ".location"),
    **dict.fromkeys(("SPEC_FILE", "OPTUNA_DB", "OPTUNA_LOG", "TUNE_DIR", "REPORT_DIR"), ".layout"),
    **dict.fromkeys(("object_store", "S3_ATTEMPTS"), ".objectstore"),
    **dict.fromkeys(("OptunaDB", "open_optuna", "journal_storage", "mend_journal", "check_rdb_url"),
                    ".optuna_storage"),
})
