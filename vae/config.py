"""One frozen, validated configuration per training run.

``TrainConfig(**config)`` is built once at every boundary (CLI, Ray trainable,
checkpoint load) and passed everywhere after that. It is saved inside each
checkpoint so a model can always be rebuilt from its file alone.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, fields
from typing import Any

from vae.errors import ConfigError

__all__ = ["ConfigError", "TrainConfig", "ARCHS", "AUGMENTS", "DATASETS", "DEVICES", "LR_SCHEDULES", "PRECISIONS"]

ARCHS = ("mlp", "conv")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTS = ("none", "shift", "affine")
DATASETS = ("mnist", "fashion-mnist", "mnist-sample")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")

MAX_LATENT_DIM = 1024
MAX_HIDDEN = 16384
MAX_LAYERS = 8
MAX_BATCH = 65536
MAX_EPOCHS = 10000


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one training run.

    Args:
        arch: ``mlp`` (784-hidden-d, pytorch/examples) or ``conv`` (the reference project's network).
        latent_dim: size d of the latent code.
        beta: weight of the KL term; loss = recon_sum + beta * KL_sum per image (Higgins et al. 2017).
        lr: Adam learning rate.
        batch_size: images per optimiser step. 32 as in the reference: on 3,200 training images it
            gave 0.35 dB more test PSNR than 128 at the same epochs (BENCHMARKS §6).
        epochs: maximum number of passes over the training split.
        hidden: hidden width of the ``mlp`` architecture (ignored by ``conv``).
        layers: hidden layers of the ``mlp`` in the encoder and again in the decoder; 1 is
            pytorch/examples' network (ignored by ``conv``).
        lr_schedule: ``constant``; ``cosine`` (decays lr to 0 over ``epochs``, per step);
            ``onecycle`` (linear warm-up over the first 30% of steps from lr/25, then cosine to 0).
            The schedule is a function of the step alone, so a resumed run follows it exactly.
        augment: ``shift`` (default; each training image moved by up to 1 pixel in x and y: +0.7 dB
            on mnist-sample at batch 32, BENCHMARKS §6); ``none``;
            ``affine`` (up to 2 pixels, 10 degrees and 10% scale). Training only: validation,
            test and every metric see the images as they are.
        seed: seeds weight init, batch order and sampling.
        dataset: ``mnist``, ``fashion-mnist`` or ``mnist-sample`` (5,000 embedded real MNIST digits).
        data_dir: folder with the IDX files or torchvision's cache; None means the per-user cache.
        val_fraction: share of the training set held out for validation (0.2 as in the reference).
        split_seed: seeds the train/validation split; kept apart from ``seed`` so that every
            trial of a study validates on the same images.
        device: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda``.
        precision: ``fp32``; ``tf32`` or ``bf16`` (autocast) matter only on a GPU.
        max_train_images: cap on training images (smoke runs); None uses them all.
        download: allow a torchvision download when the files are missing.
    """

    arch: str = "mlp"
    latent_dim: int = 20
    beta: float = 1.0
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    hidden: int = 400
    layers: int = 1
    lr_schedule: str = "constant"
    augment: str = "shift"
    seed: int = 0
    dataset: str = "mnist-sample"
    data_dir: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    max_train_images: int | None = None
    download: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("augment", self.augment, AUGMENTS)
        _check_int_range("layers", self.layers, 1, MAX_LAYERS)
        _check_int_range("latent_dim", self.latent_dim, 1, MAX_LATENT_DIM)
        _check_int_range("hidden", self.hidden, 1, MAX_HIDDEN)
        _check_int_range("batch_size", self.batch_size, 1, MAX_BATCH)
        _check_int_range("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_int_range("seed", self.seed, 0, 2**63 - 1)
        _check_int_range("split_seed", self.split_seed, 0, 2**63 - 1)
        _check_positive("beta", self.beta)
        _check_positive("lr", self.lr)
        if self.lr >= 10:
            raise ConfigError(f"lr={self.lr!r} is out of range: it must be > 0 and < 10")
        if not (0.0 < self.val_fraction < 1.0):
            raise ConfigError(
                f"val_fraction={self.val_fraction!r} is out of range: it must be > 0 and < 1"
            )
        if self.max_train_images is not None:
            _check_int_range("max_train_images", self.max_train_images, 1, 10**9)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys with a message that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


@functools.cache
def field_types() -> dict[str, tuple[type, bool]]:
    """Each TrainConfig field's (type, optional), read from the dataclass's own annotations."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        out[f.name] = (args[0] if optional else tp, optional)
    return out


def _check_types(cfg: TrainConfig) -> None:
    for name, (tp, optional) in field_types().items():
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        ok: bool
        if tp is bool:
            ok = isinstance(value, bool)
        elif tp is int:
            # Ray and numpy hand over numpy integers; a bool is not a count.
            ok = _is_integer(value)
            if ok:
                object.__setattr__(cfg, name, int(value))
        elif tp is float:
            ok = _is_number(value)
            if ok:
                object.__setattr__(cfg, name, float(value))
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(
                f"{name}={value!r} has the wrong type: it must be {_type_name(tp)}"
                + (" or unset" if optional else "")
            )


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        import numpy as np

        if isinstance(value, np.integer):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(value, int)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        import numpy as np

        if isinstance(value, (np.integer, np.floating)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(value, (int, float))


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed: choose one of {', '.join(allowed)}")


def _check_int_range(name: str, value: int, low: int, high: int) -> None:
    if not (low <= value <= high):
        raise ConfigError(f"{name}={value!r} is out of range: it must be between {low} and {high}")


def _check_positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is out of range: it must be a finite number > 0")
