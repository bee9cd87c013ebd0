"""The search space: one place, no computation.

Each entry is a plain dict, as it would appear in a TOML file under ``[space.<name>]``:
``{"type": "int" | "float" | "categorical", "low", "high", "log", "choices"}``.
"""
from __future__ import annotations

from typing import Any

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "latent_dim": {"type": "int", "low": 2, "high": 64},
    "beta": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
}

# The reference experiment (DESIGN.md): conv net, batch 32, Adam 1e-3, 15 epochs, no early stopping,
# beta_eff = 0.784 / d in our convention (the seed's beta = 0.0005 with mean reductions).
PRESETS: dict[str, dict[str, Any]] = {
    "seed-replication": {
        "grid": {"latent_dim": [5, 10, 15, 20]},
        "space": {},
        "train": {"arch": "conv", "batch_size": 32, "lr": 1e-3, "lr_schedule": "constant", "augment": "none"},
        "epochs": 15,
        "refit": False,
        "beta_times_latent": 0.784,
        "scheduler": "none",
    },
}

# Parameters a study may search over: the TrainConfig fields that shape a model and its training.
SEARCHABLE = ("latent_dim", "beta", "lr", "arch", "batch_size", "hidden", "layers", "lr_schedule", "augment")
