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

The rooms, in the order a study takes them; each imports only the rooms below it (its
``__init__`` says what it owns and offers; ``tests/test_layout.py`` holds them to it)::

    cli.py     the command line: parses, calls one function of a room (``vae-study``, ``python -m study``)
    runner/    the recipes of run and resume, the trainable, the refit, progress, trackers, Tune reports
    search/    samplers, the Tune searcher, schedulers (ASHA), what resume mends of the Optuna side
    cluster/   Ray's start and address, the checks before a study, ``cluster aws-setup`` / ``local``
    results/   what is kept of every trial: rows, the recorder, retention, the tables and their queries
    spec/      what the user says: the parameter registry, the spec and its TOML, study.json
    store/     where a study lives: folders and buckets, the Optuna study's storage
    errors.py  the errors a user can cause                                  (and below all: ``vae``)
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from study._lazy import exports

__all__, __getattr__ = exports(__name__, {
    **dict.fromkeys(("run", "resume", "StudyResult"), "study.runner.recipes"),
    **dict.fromkeys(("build_spec", "read_toml", "StudySpec"), "study.spec.spec"),
    "StudyError": "study.errors",
    "each_epoch": "study.results.epochs",
})

# The modules of the flat layout, before the rooms, and where their names live now. Ray Tune
# pickles a study's searcher, scheduler and callbacks by module path into its saved state, so a
# study started before the rooms resumes through these (and older scripts' imports still work).
_MOVED: dict[str, tuple[str, ...]] = {
    "study.storage": ("study.store.location", "study.store.layout", "study.store.objectstore",
                      "study.store.optuna_storage"),
    "study.space": ("study.spec.space",),
    "study.rows": ("study.results.rows",),
    "study.recorder": ("study.results.recorder",),
    "study.retention": ("study.results.retention", "study.spec.spec"),
    "study.launch": ("study.cluster.launch",),
    "study.tuner": ("study.runner.recipes",),
    "study.trainable": ("study.runner.trainable",),
    "study.refit": ("study.runner.refit",),
    "study.progress": ("study.runner.progress",),
    "study.trackers": ("study.runner.trackers",),
    "study.reports": ("study.runner.reports", "study.results.epochs"),
    "study.restore": ("study.runner.restore", "study.results.recorded", "study.search.searcher", "study.search.mend"),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as a module whose names are looked up where they live now."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if fullname in _MOVED else None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        homes = _MOVED[module.__name__]

        def __getattr__(name: str) -> Any:
            for home in homes:
                mod = importlib.import_module(home)
                if hasattr(mod, name):
                    return getattr(mod, name)
            raise AttributeError(f"module {module.__name__!r} (now {', '.join(homes)}) has no attribute {name!r}")

        module.__getattr__ = __getattr__


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
