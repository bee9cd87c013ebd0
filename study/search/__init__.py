"""The search: which configuration each trial trains, and which trials stop early.

Owns: the study's Optuna samplers and the spec's space as Optuna's distributions
(``samplers``), Ray Tune's searcher on the study's Optuna storage, one Optuna trial per Tune
trial (``searcher``), the Tune schedulers, ASHA or first-in-first-out (``schedulers``), and what
``resume`` mends of the Optuna side (``mend``).

May import: ``study.results`` (a trial's result is told from its trials row), ``study.spec``,
``study.store`` (the Optuna study's storage), ``study.errors``. A new sampler goes in
``samplers.py``; a new scheduler in ``schedulers.py``.
"""
from __future__ import annotations

from study._lazy import exports

__all__, __getattr__ = exports(__name__, {
    **dict.fromkeys(("optuna_space", "startup_count", "spread_points", "uses_constant_liar", "TPE_HISTORY",
                     "TPE_BEST", "TPEHistorySampler", "recent_and_best", "NSGAIISampler", "make_sampler",
                     "sampler_notes"), ".samplers"),
    **dict.fromkeys(("make_scheduler", "LiveScan", "StudyASHA", "StudyFIFO", "asha_rungs"), ".schedulers"),
    **dict.fromkeys(("TUNE_TRIAL", "objective_metrics", "tell_from_row", "StudySearch", "make_searcher",
                     "unwrap_searcher"), ".searcher"),
    **dict.fromkeys(("Mended", "mend_optuna", "close_stale_trials"), ".mend"),
})
