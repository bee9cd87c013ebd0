"""Checkpoints: a state dict, the config and library versions, loaded with weights_only=True."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from vae.config import ConfigError, TrainConfig
from vae.errors import CheckpointError
from vae.model import BetaVAE

FORMAT = "vae-study-checkpoint/1"


def library_versions() -> dict[str, str]:
    import numpy

    return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(numpy.__version__)}


def save(path: str | os.PathLike, model: BetaVAE, config: TrainConfig, **extra: Any) -> Path:
    """Write atomically: a temporary name in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
        "versions": library_versions(),
        **extra,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[BetaVAE, TrainConfig, dict[str, Any]]:
    """Load a checkpoint safely (no unpickling) and rebuild its model.

    Returns:
        (model in eval mode on ``device``, its TrainConfig, the whole payload).
    Raises:
        CheckpointError: one line that says what is wrong with the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = _first_line(exc)
        raise CheckpointError(f"checkpoint {path} is corrupt or not a vae-study checkpoint ({first[:200]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a vae-study checkpoint (no {FORMAT!r} marker)")
    try:
        config = TrainConfig.from_dict(dict(payload["config"]))
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} holds an invalid config: {exc}") from exc
    model = BetaVAE.from_config(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit its architecture (arch={config.arch}, "
            f"latent_dim={config.latent_dim}): {str(exc).splitlines()[0][:200]}"
        ) from exc
    return model.to(device).eval(), config, payload


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Unsupported global" in text:  # weights_only refused a pickled object: not ours
        return "it holds pickled Python objects, which are never loaded"
    return text.splitlines()[0] if text else type(exc).__name__
