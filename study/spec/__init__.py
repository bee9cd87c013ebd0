"""What the user says: the parameter registry, the study's spec and its TOML, ``study.json``.

Owns: each training parameter declared once (``space``: its type, range, help, column; the
flags, the search space, the ``param_*`` columns and the refit derive from it), and the study's
specification (``spec``: TOML file + CLI overrides -> one validated, frozen ``StudySpec``, kept
as ``study.json``). Every other room reads the spec; the command line (``study.cli``) builds it.

May import: ``study.store`` (a storage URI is checked, ``study.json`` read and written),
``study.errors``, ``vae.config``. A new training parameter goes here: one ``Param`` in
``space.py`` beside its field in ``vae/config.py``.
"""
from __future__ import annotations

from study._lazy import exports

__all__, __getattr__ = exports(__name__, {
    **dict.fromkeys(("Param", "PARAMS", "BY_NAME", "SEARCHABLE", "RECORDED", "DEFAULT_SPACE", "PRESETS"), ".space"),
    **dict.fromkeys(("StudySpec", "build_spec", "read_toml", "validate", "overrides_from_flags", "parse_grid",
                     "trial_values", "top_k", "read_spec", "write_spec", "OBJECTIVES", "SAMPLERS", "TRACKERS",
                     "SPEC_OPTIONS"), ".spec"),
})
