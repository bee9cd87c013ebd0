"""The runner: a study's trials trained, reported, watched and finished.

Owns: the recipes of ``run`` and ``resume``, read top to bottom (``recipes``); the trainable,
one trial from config to ``tune.report`` (``trainable``); the winner retrained on train +
validation (``refit``); the progress lines (``progress``); the experiment trackers, MLflow and
W&B (``trackers``); what a report to Tune holds and Tune's loggers (``reports``); and the Tune
side of a resume (``restore``). The command line and the package's API call it; no room imports it.

May import: every room below it (``study.search``, ``study.results``, ``study.cluster``,
``study.spec``, ``study.store``), ``study.errors``, ``vae``. A new kind of trial goes here,
beside ``trainable.py``.
"""
from __future__ import annotations

from study._lazy import exports

__all__, __getattr__ = exports(__name__, {
    **dict.fromkeys(("run", "resume", "StudyResult", "compact_study", "best_trial", "fixed_params",
                     "make_trainable"), ".recipes"),
})
