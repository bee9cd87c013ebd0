"""Names a package offers, imported when first asked for (PEP 562), so that importing a room of
``study`` loads nothing heavy: Ray, Optuna and torch load when a study runs."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def exports(package: str, where: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and ``__getattr__`` for ``package``: each name in ``where`` comes from the module
    it maps to (relative to ``package`` when it starts with a dot)."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(where), __getattr__
