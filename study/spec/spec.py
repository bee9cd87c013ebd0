"""A study's specification: TOML file + CLI overrides -> one validated, frozen ``StudySpec``.

Example TOML (every key optional)::

    [study]
    name = "beta-sweep"
    trials = 32
    epochs = 10
    seed = 0
    objective = "val_elbo"        # or ["val_recon", "val_kl"] for a rate/distortion Pareto study
    mode = "min"
    refit = true                  # retrain the winner on train+validation, recorded as its own row
    keep = "all"                  # finished trials' weights kept: all | top-K (e.g. "top-10") | winner

    [data]
    dataset = "mnist-sample"      # mnist | fashion-mnist | mnist-sample
    data_dir = "/data/mnist"

    [train]                       # fixed TrainConfig values for every trial
    arch = "mlp"
    batch_size = 128

    [space.latent_dim]
    type = "int"
    low = 2
    high = 32

    [scheduler]
    type = "asha"                 # asha | none
    grace_period = 1
    reduction_factor = 2

    [resources]
    cpus_per_trial = 1
    gpus_per_trial = 0            # fractions share a GPU, e.g. 0.25 (and pack those trials: `pack`)
    pack = 0                      # trials per pack, trained as one stacked model (0: each alone)
    max_concurrent = 0            # 0: as many as there are slots
    max_failures = 0              # retries of a trial whose worker died or raised
    shared_storage = false        # a local --storage folder is mounted on every node (autoscaling clusters)
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.errors import StudyError
from study.spec.space import BY_NAME, DEFAULT_SPACE, PRESETS, SEARCHABLE, default_space
from study.store.outage import PATIENCE_S
from vae.config import ARCHS, ConfigError, TrainConfig

OBJECTIVES = ("val_elbo", "val_recon", "val_kl", "val_mse")
# The samplers a study may use (`--sampler`, `[search] sampler`); each is seeded by the study's seed.
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp", "nsgaii")
# Experiment trackers a study may log to (`--log-to`, `[study] log_to`): study.runner.trackers.
TRACKERS = ("mlflow", "wandb")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_TOP = re.compile(r"^top-([1-9][0-9]*)$")  # a --keep policy: top-K
_SECTIONS = {
    "study": {"name", "trials", "epochs", "seed", "objective", "mode", "preset", "startup_trials", "startup", "refit",
              "log_to", "optuna_storage", "keep", "storage_patience"},
    "search": {"sampler", "constant_liar", "startup", "startup_trials"},
    "data": {"dataset", "data_dir", "val_fraction", "split_seed", "max_train_images", "download"},
    "train": None,  # checked against TrainConfig
    "space": None,  # checked per entry
    "grid": None,
    "scheduler": {"type", "grace_period", "reduction_factor"},
    "resources": {"cpus_per_trial", "gpus_per_trial", "pack", "max_concurrent", "max_failures", "shared_storage"},
}


@dataclass(frozen=True)
class StudySpec:
    """Everything a study needs; saved as ``study.json`` in the study folder for ``resume``."""

    name: str
    storage: str
    trials: int = 16
    epochs: int = 10
    seed: int = 0
    objective: tuple[str, ...] = ("val_elbo",)
    mode: str = "min"
    train: dict[str, Any] = field(default_factory=dict)  # fixed TrainConfig fields
    space: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    grid: dict[str, list[Any]] = field(default_factory=dict)
    beta_times_latent: float | None = None  # beta = value / latent_dim (the seed-replication preset)
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    pack: int = 0  # trials per pack on one device (study.runner.packing); 0: each trains alone
    max_concurrent: int = 0
    max_failures: int = 0
    address: str | None = None
    num_cpus: int | None = None
    preset: str | None = None
    startup_trials: int | None = None  # TPE's start-up trials before it models; None: min(10, max(2, trials // 4))
    shared_storage: bool = False  # a local --storage folder is mounted on every node, those to come too
    startup: str = "sobol"  # TPE's start-up trials: "sobol" (spread over the space, seeded) or "random"
    refit: bool = True  # retrain the winner on train+validation for its best epoch count (study.runner.refit)
    sampler: str = "tpe"  # Optuna's sampler (study.search.SAMPLERS); a multi-objective study's default is nsgaii
    constant_liar: bool | None = None  # TPE: None = on when more than one trial runs at once
    log_to: tuple[str, ...] = ()  # experiment trackers (study.runner.trackers): "mlflow", "wandb"
    optuna_storage: str | None = None  # a PostgreSQL/MySQL URL (no password); None: optuna.log in the study folder
    keep: str = "all"  # what finished trials keep of their checkpoints (study.results.retention): all | top-K | winner
    storage_patience: float = PATIENCE_S  # seconds a study waits for its bucket in an outage (study.store.outage)

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    @property
    def select(self) -> tuple[str, str]:
        """What chooses a trial's best epoch, the one it keeps and reports: (metric, mode). A study
        of one objective selects by it, so that each trial reports its objective at that
        objective's best epoch; a Pareto study by the validation -ELBO (one epoch for both values)."""
        return ("val_elbo", "min") if self.multi_objective else (self.objective[0], self.mode)

    @property
    def n_trials(self) -> int:
        """Trials the study will run: the grid's size when there is a grid, else ``trials``."""
        if self.grid:
            return math.prod(len(v) for v in self.grid.values())
        return self.trials

    @property
    def varied(self) -> set[str]:
        """The TrainConfig fields that differ between trials: searched, on the grid, or derived."""
        return set(self.space) | set(self.grid) | ({"beta"} if self.beta_times_latent else set())

    def base_config(self) -> TrainConfig:
        """The fixed part of every trial's TrainConfig (searched values filled with defaults)."""
        return TrainConfig.from_dict({**self.train, "epochs": self.epochs})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objective"] = list(self.objective)
        d["log_to"] = list(self.log_to)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudySpec":
        d = dict(d)
        d["objective"] = tuple(d.get("objective", ("val_elbo",)))
        d["log_to"] = tuple(d.get("log_to", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"config file {path} is not valid TOML: {exc}") from exc


def build_spec(toml: dict[str, Any] | None, overrides: dict[str, Any]) -> StudySpec:
    """Merge a parsed TOML file with CLI overrides (which win) and validate the result.

    ``overrides`` keys: the study's options (:data:`SPEC_OPTIONS`, plus ``grid`` as a dict,
    ``objective`` and ``scheduler``), and any training value to fix for every trial by its
    TrainConfig name (``beta``, ``max_train_images``, ...; ``study.spec.space``). A fixed value, in
    ``[train]`` or as an override, takes its parameter out of the default search space; an
    override also wins over the file's ``[space]``; the file fixing and searching one parameter
    is refused.
    """
    toml = toml or {}
    for section, value in toml.items():
        if section not in _SECTIONS:
            raise StudyError(f"unknown config section [{section}]; known: {', '.join(_SECTIONS)}")
        allowed = _SECTIONS[section]
        if not isinstance(value, dict):
            raise StudyError(f"[{section}] must be a table, not {type(value).__name__}")
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise StudyError(f"unknown config key {section}.{key}; known: {', '.join(sorted(allowed))}")
    study = toml.get("study", {})
    search = toml.get("search", {})
    o = {k: v for k, v in overrides.items() if v is not None}

    preset_name = o.get("preset", study.get("preset"))
    preset: dict[str, Any] = {}
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise StudyError(f"unknown preset {preset_name!r}; known: {', '.join(PRESETS)}")
        preset = PRESETS[preset_name]

    flag_train = {k: v for k, v in o.items() if k in BY_NAME and BY_NAME[k].run_flag}
    file_train = {**toml.get("data", {}), **toml.get("train", {})}
    train = {**preset.get("train", {}), **file_train, **flag_train}
    objective = o.get("objective", study.get("objective", "val_elbo"))
    objective = tuple([objective] if isinstance(objective, str) else objective)
    explicit_space = "space" in toml
    space = {k: dict(v) for k, v in (toml["space"] if explicit_space
                                     else preset.get("space", default_space(objective))).items()}
    for k in list(space):  # a value fixed by the user is not searched
        if k in flag_train or (k in train and not explicit_space):
            del space[k]
        elif k in file_train:
            raise StudyError(f"{k} is both fixed ([train] {k} = {file_train[k]!r}) and searched ([space.{k}]) "
                             "in the config: remove one")
    grid = {k: list(v) for k, v in {**preset.get("grid", {}), **toml.get("grid", {}), **o.get("grid", {})}.items()}
    scheduler = toml.get("scheduler", {})
    resources = toml.get("resources", {})

    values: dict[str, Any] = {
        "name": o.get("name", study.get("name")),
        # On a cluster from cluster.yaml, the bucket is named once there: $VAE_STUDY_STORAGE.
        "storage": o.get("storage") or os.environ.get("VAE_STUDY_STORAGE"),
        "trials": o.get("trials", study.get("trials", 16)),
        "epochs": o.get("epochs", study.get("epochs", preset.get("epochs", 10))),
        "seed": o.get("seed", study.get("seed", 0)),
        "objective": objective,
        "mode": o.get("mode", study.get("mode", "min")),
        # a plain grid runs every trial to the end unless early stopping is asked for
        "scheduler": o.get("scheduler", scheduler.get("type", preset.get("scheduler", "none" if grid else "asha"))),
        "grace_period": o.get("grace_period", scheduler.get("grace_period", 1)),
        "reduction_factor": o.get("reduction_factor", scheduler.get("reduction_factor", 2.0)),
        "cpus_per_trial": o.get("cpus_per_trial", resources.get("cpus_per_trial", 1.0)),
        "gpus_per_trial": o.get("gpus_per_trial", resources.get("gpus_per_trial", 0.0)),
        "pack": o.get("pack", resources.get("pack")),
        "max_concurrent": o.get("max_concurrent", resources.get("max_concurrent", 0)),
        "max_failures": o.get("max_failures", resources.get("max_failures", 0)),
        "address": o.get("address"),
        "num_cpus": o.get("num_cpus"),
        "beta_times_latent": preset.get("beta_times_latent"),
        "preset": preset_name,
        "startup_trials": o.get("startup_trials", search.get("startup_trials", study.get("startup_trials"))),
        "shared_storage": bool(o.get("shared_storage", resources.get("shared_storage", False))),
        "refit": o.get("refit", study.get("refit", preset.get("refit", True))),
        "startup": o.get("startup", search.get("startup", study.get("startup", "sobol"))),
        "sampler": o.get("sampler", search.get("sampler", "nsgaii" if len(objective) > 1 else "tpe")),
        "constant_liar": o.get("constant_liar", search.get("constant_liar")),
        "sampler_given": "sampler" in o or "sampler" in search,
        "log_to": o.get("log_to", study.get("log_to", ())),
        "optuna_storage": o.get("optuna_storage", study.get("optuna_storage")),
        "keep": o.get("keep", study.get("keep", "all")),
        "storage_patience": o.get("storage_patience", study.get("storage_patience", PATIENCE_S)),
    }
    if o.get("smoke"):  # tiny, unless a flag says otherwise
        values.update(trials=o.get("trials", 2), epochs=o.get("epochs", 1))
        train.setdefault("max_train_images", 300)
        if grid:
            grid = {k: v[:2] for k, v in list(grid.items())[:1]}
    # A grid is a plain grid: nothing else is searched, every other value is fixed.
    if grid:
        space = {}
    for k in list(space) + list(grid):
        train.pop(k, None)
    values["train"] = train
    values["space"] = space
    values["grid"] = grid
    return validate(values)


def default_pack(gpus_per_trial: float) -> int:
    """Trials per pack when no ``--pack``/``--no-pack`` says: trials that share a GPU (a fraction of
    one each) train as one pack of as many as fit on it; every other study trains each alone (on
    a CPU a pack was measured slower than its members one after another: BENCHMARKS §7).
    ``$VAE_STUDY_PACK`` (a whole number) sets the default for every study instead: the test suite
    runs with packing on that way as well as off."""
    forced = os.environ.get("VAE_STUDY_PACK")
    if forced:
        try:
            return int(forced)
        except ValueError:
            raise StudyError(f"VAE_STUDY_PACK={forced!r} must be a whole number (trials per pack; 0: off)") from None
    if 0 < gpus_per_trial < 1:
        return max(1, round(1 / gpus_per_trial))
    return 0


def trial_values(config: dict[str, Any], beta_times_latent: float | None) -> dict[str, Any]:
    """A trial's TrainConfig values: what Tune hands it, plus the values a spec derives from them
    (the seed-replication preset's beta = beta_times_latent / latent_dim)."""
    values = dict(config)
    if beta_times_latent:
        values["beta"] = beta_times_latent / values["latent_dim"]
    return values


# `vae-study run`'s options that are the study's own (the training values come from study.spec.space).
SPEC_OPTIONS = frozenset({
    "name", "storage", "trials", "epochs", "seed", "startup_trials", "mode", "preset", "grace_period",
    "reduction_factor", "cpus_per_trial", "gpus_per_trial", "pack", "max_concurrent", "max_failures", "address",
    "num_cpus", "smoke", "refit", "shared_storage", "startup", "sampler", "constant_liar", "log_to",
    "optuna_storage", "keep", "storage_patience",
})


def overrides_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """``vae-study run``'s parsed flags as :func:`build_spec`'s overrides: the study's options by
    name, the training values by their TrainConfig names; unset flags are left out."""
    o = {k: v for k, v in flags.items() if v is not None and (k in SPEC_OPTIONS or k in BY_NAME)}
    if flags.get("grid"):
        o["grid"] = parse_grid(flags["grid"])
    if flags.get("objective"):
        o["objective"] = flags["objective"].split(",")
    if flags.get("no_early_stopping"):
        o["scheduler"] = "none"
    if flags.get("no_pack"):
        o["pack"] = 0
    if not flags.get("shared_storage"):
        o.pop("shared_storage", None)  # a missing flag is not a "no": the file may say yes
    return o


def validate(v: dict[str, Any]) -> StudySpec:
    name = v["name"]
    if not name:
        raise StudyError("a study needs a name: pass --name NAME or set [study] name in the config")
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyError(f"study name {name!r} is not allowed: use letters, digits, '_', '.', '-' (at most 100)")
    if not v["storage"]:
        raise StudyError("pass --storage DIR: the folder (or s3:// / gs:// URI) that holds studies "
                         "(or set VAE_STUDY_STORAGE)")
    if "YOUR-BUCKET" in str(v["storage"]):
        raise StudyError(f"--storage {v['storage']}: name your bucket first (VAE_STUDY_STORAGE in cluster.yaml's "
                         "setup_commands, then `ray up` again), or pass --storage s3://your-bucket/prefix")
    from study.store import Location

    Location(v["storage"])  # a bad URI is refused here, before anything starts
    _int(v, "trials", 1, 100000)
    _int(v, "epochs", 1, 10000)
    _int(v, "seed", 0, 2**31 - 1)
    _int(v, "grace_period", 1, 10000)
    _int(v, "max_concurrent", 0, 100000)
    _int(v, "max_failures", -1, 1000)
    _num(v, "reduction_factor", 1.0, 100.0, low_open=True)
    _num(v, "cpus_per_trial", 0.0, 1024.0, low_open=True)
    _num(v, "gpus_per_trial", 0.0, 64.0)
    if v["gpus_per_trial"] > 1 and v["gpus_per_trial"] != int(v["gpus_per_trial"]):
        raise StudyError(f"--gpus-per-trial {v['gpus_per_trial']} must be a whole number when above 1")
    if v["num_cpus"] is not None:
        _int(v, "num_cpus", 1, 100000)
    if v["pack"] is None:
        v["pack"] = default_pack(v["gpus_per_trial"])
    _int(v, "pack", 0, 4096)
    if v["startup_trials"] is not None:
        _int(v, "startup_trials", 1, 100000)
    given = v.pop("sampler_given", False)
    if v["grid"]:  # a plain grid runs through Optuna's grid sampler
        if given:
            raise StudyError(f"--grid runs a plain grid (Optuna's grid sampler): drop --sampler {v['sampler']}")
        v["sampler"] = "grid"
    elif v["sampler"] not in SAMPLERS:
        raise StudyError(f"sampler={v['sampler']!r} is not allowed: choose one of {', '.join(SAMPLERS)}")
    if v["constant_liar"] is not None and not isinstance(v["constant_liar"], bool):
        raise StudyError(f"constant_liar={v['constant_liar']!r} has the wrong type: it must be true or false")
    log_to = [v["log_to"]] if isinstance(v["log_to"], str) else v["log_to"]
    if not isinstance(log_to, (list, tuple)) or not all(isinstance(t, str) for t in log_to):
        raise StudyError(f"log_to={v['log_to']!r} has the wrong type: a list of trackers, e.g. [\"mlflow\"]")
    for tracker in log_to:
        if tracker not in TRACKERS:
            raise StudyError(f"log_to {tracker!r} is not a tracker: choose from {', '.join(TRACKERS)}")
    v["log_to"] = tuple(dict.fromkeys(log_to))
    if v["optuna_storage"] is not None:
        from study.store import check_rdb_url

        if not isinstance(v["optuna_storage"], str):
            raise StudyError("optuna_storage has the wrong type: a postgresql://user@host:port/database URL")
        check_rdb_url(v["optuna_storage"])
    if v["startup"] not in ("sobol", "random"):
        raise StudyError(f"startup={v['startup']!r} is not allowed: choose sobol or random")
    top_k(v["keep"])  # one line naming the allowed values
    _num(v, "storage_patience", 0.0, 7 * 24 * 3600.0)
    if not isinstance(v["refit"], bool):
        raise StudyError(f"refit={v['refit']!r} has the wrong type: it must be true or false")
    if v["mode"] not in ("min", "max"):
        raise StudyError(f"mode={v['mode']!r} is not allowed: choose min or max")
    for obj in v["objective"]:
        if obj == "val_loss":
            raise StudyError("objective val_loss is the beta-weighted loss, which does not compare across beta: "
                             "rank trials on val_elbo (-ELBO, the loss at beta = 1), or val_recon / val_kl / val_mse")
        if obj not in OBJECTIVES:
            raise StudyError(f"objective {obj!r} is not a recorded metric: choose from {', '.join(OBJECTIVES)}")
    if len(v["objective"]) > 2 or len(set(v["objective"])) != len(v["objective"]):
        raise StudyError("a multi-objective study takes two different metrics, e.g. val_recon,val_kl")
    if v["scheduler"] not in ("asha", "none"):
        raise StudyError(f"scheduler={v['scheduler']!r} is not allowed: choose asha or none")
    if len(v["objective"]) > 1:
        v["scheduler"] = "none"  # ASHA ranks on one metric; a Pareto study must not be pruned by it
    if v["grace_period"] > v["epochs"]:
        v["grace_period"] = v["epochs"]
    for pname, p in v["space"].items():
        _check_param(pname, p)
    for pname, values in v["grid"].items():
        if pname not in SEARCHABLE:
            raise StudyError(f"cannot grid over {pname!r}: choose from {', '.join(SEARCHABLE)}")
        if not values:
            raise StudyError(f"--grid {pname}= needs at least one value")
        for value in values:
            _check_value(pname, value)
    if not v["space"] and not v["grid"]:
        raise StudyError("nothing to search: give a [space] entry or a --grid")
    if v["sampler"] == "cmaes" and len(v["objective"]) > 1:
        raise StudyError("the cmaes sampler optimises one objective: for a Pareto study use nsgaii (the default), "
                         "tpe, gp, qmc or random")
    spec = StudySpec(**v)
    try:
        spec.base_config()
    except ConfigError as exc:
        raise StudyError(f"invalid training setting: {exc}") from exc
    if spec.beta_times_latent is not None and "latent_dim" not in spec.grid and "latent_dim" not in spec.space:
        raise StudyError("beta_times_latent needs latent_dim to be searched or on the grid")
    return spec


def top_k(keep: str) -> int | None:
    """How many trials' weights a ``--keep`` policy keeps (None: all; ``study.results.retention``).
    Raises StudyError on a bad value."""
    if keep == "all":
        return None
    if keep == "winner":
        return 1
    m = _TOP.match(str(keep))
    if m is None:
        raise StudyError(f"keep={keep!r} is not a checkpoint policy: choose all, winner or top-K (e.g. top-10)")
    return int(m.group(1))


def _check_param(name: str, p: dict[str, Any]) -> None:
    if name not in SEARCHABLE:
        raise StudyError(f"cannot search over {name!r}: choose from {', '.join(SEARCHABLE)}")
    kind = p.get("type")
    extra = set(p) - {"type", "low", "high", "log", "choices"}
    if extra:
        raise StudyError(f"unknown key space.{name}.{sorted(extra)[0]}; known: type, low, high, log, choices")
    if kind == "categorical":
        choices = p.get("choices")
        if not isinstance(choices, list) or not choices:
            raise StudyError(f"space.{name} is categorical and needs a non-empty choices list")
        for c in choices:
            _check_value(name, c)
        return
    if kind not in ("int", "float"):
        raise StudyError(f"space.{name}.type={kind!r} is not allowed: choose int, float or categorical")
    low, high = p.get("low"), p.get("high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or isinstance(low, bool):
        raise StudyError(f"space.{name} needs numeric low and high")
    if low > high:
        raise StudyError(f"space.{name} has low={low} > high={high}: swap them")
    if p.get("log") and low <= 0:
        raise StudyError(f"space.{name} is log-scaled and needs low > 0, not {low}")
    _check_value(name, low if kind == "float" else int(low))
    _check_value(name, high if kind == "float" else int(high))


def _check_value(name: str, value: Any) -> None:
    try:
        TrainConfig(**{name: value})
    except ConfigError as exc:
        raise StudyError(f"search value out of range: {exc}") from exc


def _int(v: dict[str, Any], key: str, low: int, high: int) -> None:
    x = v[key]
    if isinstance(x, bool) or not isinstance(x, int):
        raise StudyError(f"{key}={x!r} has the wrong type: it must be an integer")
    if not low <= x <= high:
        raise StudyError(f"{key}={x} is out of range: it must be between {low} and {high}")


def _num(v: dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> None:
    x = v[key]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise StudyError(f"{key}={x!r} has the wrong type: it must be a number")
    if (x <= low if low_open else x < low) or x > high:
        bound = ">" if low_open else ">="
        raise StudyError(f"{key}={x} is out of range: it must be {bound} {low:g} and <= {high:g}")
    v[key] = float(x)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["latent_dim=5,10", "arch=mlp,conv"]`` -> ``{"latent_dim": [5, 10], "arch": ["mlp", "conv"]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise StudyError(f"--grid {item!r} must look like name=v1,v2,...")
        name, _, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        grid[name] = [_parse_value(x.strip()) for x in raw.split(",") if x.strip()]
    return grid


def _parse_value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


# --------------------------------------------------------------------------- the spec, kept with its study

def write_spec(study: Any, spec: StudySpec) -> None:
    """``study.json``: what ``resume`` rebuilds the study from."""
    import json

    from study.store import SPEC_FILE

    study.write_text(SPEC_FILE, json.dumps(spec.to_dict(), indent=2))


def read_spec(storage: str, name: str) -> StudySpec:
    """The spec of study ``name`` under ``storage``; a missing or damaged one is a user error."""
    import json

    from study.store import SPEC_FILE, study_location

    study = study_location(storage, name)
    if not study.is_file(SPEC_FILE):
        raise StudyError(f"no study {name!r} in {storage} (no {study.uri}/{SPEC_FILE}); start it with `vae-study run`")
    try:
        return StudySpec.from_dict(json.loads(study.read_text(SPEC_FILE)))
    except (ValueError, TypeError) as exc:
        raise StudyError(f"{study.uri}/{SPEC_FILE} is damaged ({exc}); the study cannot be resumed") from exc


__all__ = ["StudySpec", "read_spec", "write_spec", "build_spec", "overrides_from_flags", "read_toml", "parse_grid", "OBJECTIVES", "ARCHS"]
