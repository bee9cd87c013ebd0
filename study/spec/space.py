"""The study's parameters, each declared once, and what derives from them.

Every ``TrainConfig`` field is a :class:`Param` in :data:`PARAMS` (a test fails when one is
missing). From this one table come:

- the ``vae-study train`` flags (one per field) and the ``vae-study run`` flags that fix a value
  for every trial (``--beta 4`` takes beta out of the search): ``study.cli``;
- which parameters a study may search or grid over, and the default search space: ``study.spec``;
- the ``param_*`` columns of the trials table and their Arrow types: ``study.results``;
- what the recorder keeps of a trial's configuration and what the refit trains with:
  ``study.results.recorder``, ``study.runner.refit``.

Types and allowed values live where they are checked, in ``vae/config.py``; adding a parameter
means that file (and where the value is used) plus one entry here. A search range is a plain
dict, as it appears in a TOML file under ``[space.<name>]``:
``{"type": "int" | "float" | "categorical", "low", "high", "log", "choices"}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One ``TrainConfig`` field as a study sees it.

    Args:
        name: the field's name; flags are ``--name-with-dashes``, the column ``param_<name>``.
        help: one line for ``--help``.
        arrow: the ``param_*`` column's Arrow type (``int64``, ``float64``, ``string``); None: the
            value is not a column (it is the same for every trial of a study, or a runtime
            setting that does not change the result).
        searchable: a study may search it (``[space.<name>]``) or grid over it (``--grid``).
        space: its range in the default search space; None: fixed unless the study searches it.
        run_flag: ``vae-study run --<name>`` fixes it for every trial. Off where ``run`` has a
            study-level flag of that name (``--epochs`` is the study's budget, ``--seed`` seeds
            the sampler); ``[train]`` in a TOML file sets those.
    """

    name: str
    help: str
    arrow: str | None = None
    searchable: bool = False
    space: dict[str, Any] | None = None
    run_flag: bool = True

    @property
    def column(self) -> str | None:
        return f"param_{self.name}" if self.arrow else None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


PARAMS: tuple[Param, ...] = (
    Param("arch", "mlp (784-hidden-d) or conv (the reference project's network)", "string", searchable=True),
    Param("latent_dim", "latent size d", "int64", searchable=True, space={"type": "int", "low": 2, "high": 64}),
    Param("beta", "KL weight: loss = recon_sum + beta * KL_sum per image", "float64", searchable=True,
          space={"type": "float", "low": 0.01, "high": 10.0, "log": True}),
    Param("lr", "Adam learning rate", "float64", searchable=True,
          space={"type": "float", "low": 1e-4, "high": 3e-3, "log": True}),
    Param("batch_size", "images per step", "int64", searchable=True),
    Param("epochs", "passes over the training split", "int64", run_flag=False),
    Param("hidden", "hidden width of the mlp", "int64", searchable=True),
    Param("layers", "hidden layers of the mlp's encoder (and again of its decoder)", "int64", searchable=True),
    Param("lr_schedule", "constant, cosine (to 0 over the epochs) or onecycle (warm-up, then cosine)", "string",
          searchable=True),
    Param("augment", "none, shift (training images moved up to 1 px) or affine (2 px, 10 degrees, 10%% scale)",
          "string", searchable=True),
    Param("seed", "seeds init, batch order and sampling", "int64", run_flag=False),
    Param("dataset", "mnist, fashion-mnist or mnist-sample (5,000 embedded real MNIST digits, offline)"),
    Param("data_dir", "folder with the four IDX files (.gz or not); default: the per-user cache"),
    Param("val_fraction", "share of the training set held out for validation"),
    Param("split_seed", "seeds the train/validation split"),
    Param("device", "auto, cpu or cuda"),
    Param("precision", "fp32, tf32 or bf16 (GPU only; fp32 on a CPU)"),
    Param("max_train_images", "cap on training images (smoke runs)"),
    Param("download", "allow downloading MNIST with torchvision when it is missing"),
)
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}

SEARCHABLE: tuple[str, ...] = tuple(p.name for p in PARAMS if p.searchable)
COLUMNS: dict[str, str] = {p.column: p.arrow for p in PARAMS if p.column and p.arrow}
# What a trial's row keeps of its configuration (its param_* columns), and so what a refit of it
# trains with besides the study's fixed values.
RECORDED: tuple[str, ...] = tuple(p.name for p in PARAMS if p.column)
DEFAULT_SPACE: dict[str, dict[str, Any]] = {p.name: dict(p.space) for p in PARAMS if p.space}
# A reconstruction study's default space (objective val_mse alone): MSE is lowest near beta -> 0,
# where the model is nearly an autoencoder, and with a wider code. In the default space the winners
# of the reconstruction study sat at its corner (beta ~ 0.01, its low end; d ~ 64, its high end);
# in this one they scored -0.02 to +0.62 dB more on the test split at 5 seeds (median +0.23), and
# within 0.14 dB of each other instead of 0.53 (BENCHMARKS §6c).
RECONSTRUCTION_SPACE: dict[str, dict[str, Any]] = {
    **DEFAULT_SPACE,
    "latent_dim": {"type": "int", "low": 2, "high": 128},
    "beta": {"type": "float", "low": 0.001, "high": 10.0, "log": True},
}


def describe(space: dict[str, dict[str, Any]]) -> str:
    """One line for a search space: ``latent_dim 2-128, beta 0.001-10 (log), ...``."""
    parts = []
    for name, r in space.items():
        if r.get("type") == "categorical":
            parts.append(f"{name} in {{{', '.join(map(str, r['choices']))}}}")
        else:
            parts.append(f"{name} {r['low']:g}-{r['high']:g}{' (log)' if r.get('log') else ''}")
    return ", ".join(parts)


def default_space(objective: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The space a study searches when neither its file nor its preset names one."""
    return RECONSTRUCTION_SPACE if tuple(objective) == ("val_mse",) else DEFAULT_SPACE

# The reference experiment (README, Definitions): conv net, batch 32, Adam 1e-3, 15 epochs, no
# early stopping, beta_eff = 0.784 / d in our convention (the seed's beta = 0.0005 with mean reductions).
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
