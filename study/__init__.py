"""Studies: Ray Tune x Optuna over beta-VAE configurations, with a Parquet results table."""
from __future__ import annotations
