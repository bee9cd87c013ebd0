"""Studies: Ray Tune x Optuna over beta-VAE configurations, with a Parquet results table.

The Python API (the CLI is a thin layer over it)::

    import study

    spec = study.build_spec(None, {"name": "api", "storage": "studies", "trials": 4, "epochs": 3})
    result = study.run(spec, callbacks=[...])     # Ray Tune callbacks beside the study's own
    result.trials                                 # the trials table (pandas)
    result.optuna_study()                         # the Optuna study
    result.result_grid                            # Ray Tune's ResultGrid
    study.each_epoch(result)                      # in a Tune callback: the epochs a result carries

Importing ``study`` starts nothing; Ray and torch load when a study runs.
"""
from __future__ import annotations

from typing import Any

__all__ = ["StudyError", "StudyResult", "StudySpec", "build_spec", "each_epoch", "read_toml", "resume", "run"]

_WHERE = {"run": "study.tuner", "resume": "study.tuner", "StudyResult": "study.tuner",
          "build_spec": "study.spec", "read_toml": "study.spec", "StudySpec": "study.spec",
          "StudyError": "study.errors", "each_epoch": "study.reports"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'study' has no attribute {name!r}")
