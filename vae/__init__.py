"""The beta-VAE core: models, data, loss, training and evaluation. Knows nothing of Ray."""
from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
