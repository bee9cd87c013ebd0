from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from study.errors import StudyError
from study.spec.spec import StudySpec, build_spec, overrides_from_flags, parse_grid, read_toml
from study.search.schedulers import make_scheduler
from study.search.samplers import optuna_space
from study.runner.recipes import fixed_params

BASE = {"name": "s", "storage": "/tmp/x"}


def test_defaults():
    spec = build_spec(None, BASE)
    assert spec.objective == ("val_elbo",) and spec.mode == "min" and spec.scheduler == "asha"
    assert spec.space["latent_dim"] == {"type": "int", "low": 2, "high": 64}
    assert spec.space["beta"]["log"] and spec.space["beta"]["low"] == 0.01 and spec.space["beta"]["high"] == 10
    assert spec.space["lr"]["low"] == 1e-4 and spec.space["lr"]["high"] == 3e-3
    space = optuna_space(spec)
    assert space["beta"].log and space["latent_dim"].low == 2
    assert "latent_dim" not in fixed_params(spec) and fixed_params(spec)["dataset"] == "mnist-sample"
    assert spec.refit and spec.startup == "sobol"


def test_grid_expands_to_a_plain_grid():
    spec = build_spec(None, {**BASE, "grid": parse_grid(["latent_dim=5,10,15,20", "arch=mlp,conv"])})
    assert spec.grid == {"latent_dim": [5, 10, 15, 20], "arch": ["mlp", "conv"]}
    assert spec.n_trials == 8 and spec.space == {} and spec.scheduler == "none"
    assert optuna_space(spec)["latent_dim"].choices == (5, 10, 15, 20)
    assert "beta" in fixed_params(spec)  # not searched: fixed at its default


def test_seed_replication_preset():
    spec = build_spec(None, {**BASE, "preset": "seed-replication"})
    assert spec.grid == {"latent_dim": [5, 10, 15, 20]} and spec.n_trials == 4
    assert spec.epochs == 15 and spec.scheduler == "none" and type(make_scheduler(spec)).__name__ == "StudyFIFO"
    base = spec.base_config()
    assert base.arch == "conv" and base.batch_size == 32 and base.lr == 1e-3
    from study.spec.spec import trial_values

    for d in (5, 10, 15, 20):
        c = trial_values({**fixed_params(spec), "latent_dim": d}, spec.beta_times_latent)
        assert math.isclose(c["beta"], 0.784 / d)


def test_smoke_is_tiny():
    spec = build_spec(None, {**BASE, "smoke": True})
    assert spec.trials == 2 and spec.epochs == 1 and spec.base_config().max_train_images == 300


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('''
[study]
name = "from-toml"
trials = 5
objective = ["val_recon", "val_kl"]
[train]
arch = "conv"
[space.beta]
type = "float"
low = 0.1
high = 4.0
log = true
[scheduler]
type = "asha"
grace_period = 2
''')
    spec = build_spec(read_toml(f), {"storage": "/tmp/x", "trials": 7})
    assert spec.name == "from-toml" and spec.trials == 7  # the flag wins
    assert spec.multi_objective and spec.scheduler == "none"  # Pareto studies are not pruned
    assert list(spec.space) == ["beta"] and spec.base_config().arch == "conv"


@pytest.mark.parametrize(
    "toml, overrides, words",
    [
        (None, {"name": None}, "needs a name"),
        (None, {"name": "a b"}, "not allowed"),
        ({"study": {"trails": 3}}, {}, "unknown config key study.trails"),
        ({"bogus": {}}, {}, "unknown config section"),
        ({"train": {"latent_dimm": 3}}, {}, "unknown config key 'latent_dimm'"),
        ({"train": {"batch_size": "big"}}, {}, "batch_size='big' has the wrong type"),
        ({"space": {"beta": {"type": "float", "low": 5.0, "high": 1.0}}}, {}, "low=5.0 > high=1.0"),
        ({"space": {"beta": {"type": "float", "low": -1.0, "high": 1.0}}}, {}, "beta=-1.0"),
        ({"space": {"latent_dim": {"type": "int", "low": 0, "high": 4}}}, {}, "latent_dim=0"),
        ({"space": {"arch": {"type": "categorical", "choices": ["mlp", "vit"]}}}, {}, "arch='vit'"),
        ({"space": {"optimizer": {"type": "categorical", "choices": ["adam"]}}}, {}, "cannot search over 'optimizer'"),
        (None, {"trials": 0}, "trials=0"),
        (None, {"epochs": 0}, "epochs=0"),
        (None, {"objective": ["train_loss"]}, "not a recorded metric"),
        (None, {"objective": ["val_loss"]}, "rank trials on val_elbo"),
        (None, {"dataset": "cifar"}, "dataset='cifar'"),
        (None, {"preset": "nope"}, "unknown preset"),
        (None, {"gpus_per_trial": -1.0}, "gpus_per_trial"),
        (None, {"pack": -1}, "pack=-1"),
        ({"resources": {"pack": "many"}}, {}, "pack='many' has the wrong type"),
        (None, {"grid": {"latent_dim": [0, 5]}}, "latent_dim=0"),
    ],
)
def test_bad_specs(toml, overrides, words):
    with pytest.raises(StudyError) as err:
        build_spec(toml, {**BASE, **overrides})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_trials_sharing_a_gpu_pack_by_default_and_flags_or_files_say_otherwise(monkeypatch):
    monkeypatch.delenv("VAE_STUDY_PACK", raising=False)
    assert build_spec(None, dict(BASE)).pack == 0  # a CPU study trains each trial alone
    assert build_spec(None, {**BASE, "gpus_per_trial": 0.125}).pack == 8  # 8 share a GPU: one pack of 8
    assert build_spec(None, {**BASE, "gpus_per_trial": 1.0}).pack == 0
    assert build_spec(None, {**BASE, "gpus_per_trial": 0.25, "pack": 0}).pack == 0  # --no-pack
    assert build_spec({"resources": {"pack": 3}}, dict(BASE)).pack == 3
    flags = overrides_from_flags({"name": "s", "no_pack": True, "gpus_per_trial": 0.5})
    assert build_spec(None, {**flags, "storage": "/tmp/s"}).pack == 0
    spec = build_spec(None, {**BASE, "pack": 4})
    assert StudySpec.from_dict(spec.to_dict()).pack == 4  # study.json keeps it for resume
    monkeypatch.setenv("VAE_STUDY_PACK", "3")  # the suite's packed lane
    assert build_spec(None, dict(BASE)).pack == 3 and build_spec(None, {**BASE, "pack": 0}).pack == 0
    monkeypatch.setenv("VAE_STUDY_PACK", "lots")
    with pytest.raises(StudyError, match="VAE_STUDY_PACK='lots' must be a whole number"):
        build_spec(None, dict(BASE))


def test_malformed_toml(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[study\nname = 3")
    with pytest.raises(StudyError, match="not valid TOML"):
        read_toml(f)
    with pytest.raises(StudyError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


def test_sobol_start_up_points_are_spread_seeded_and_inside_the_space():
    import math

    from study.search.samplers import optuna_space, spread_points, startup_count

    spec = build_spec(None, {"name": "s", "storage": "/tmp/s", "trials": 24, "seed": 1})
    space = optuna_space(spec)
    pts = spread_points(space, startup_count(spec), spec.seed)
    assert len(pts) == startup_count(spec) == 6
    assert pts == spread_points(space, 6, 1) and pts != spread_points(space, 6, 2)
    for p in pts:
        assert set(p) == set(space) and isinstance(p["latent_dim"], int)
        assert all(space[k].low <= v <= space[k].high for k, v in p.items())
    # spread: the first 8 points of a scrambled Sobol sequence put one point in each eighth of
    # every axis (log axes in log units), so no two of the 6 share an eighth; random draws would
    # collide about 9 times in 10
    for name in space:
        lo, hi = space[name].low, space[name].high
        f = (lambda x: math.log(x)) if space[name].log else (lambda x: x)
        cells = [int(8 * (f(p[name]) - f(lo)) / (f(hi) - f(lo) + 1e-12)) for p in pts]
        assert len(set(cells)) == len(pts), (name, cells)
    with pytest.raises(StudyError, match="startup"):
        build_spec(None, {"name": "s", "storage": "/tmp/s", "startup": "grid"})


def test_every_trainconfig_field_is_registered_once():
    """Adding a TrainConfig field without its registry entry fails here, not silently later: no
    flag, no column, a refit that trains with the default."""
    from dataclasses import fields

    from study.spec.space import BY_NAME, COLUMNS, DEFAULT_SPACE, PARAMS, RECORDED, SEARCHABLE
    from vae.config import TrainConfig

    names = [p.name for p in PARAMS]
    assert len(names) == len(set(names))
    assert set(names) == {f.name for f in fields(TrainConfig)}
    # a searched value must be recorded, or its refit would train with the default
    assert set(SEARCHABLE) <= set(RECORDED)
    assert set(DEFAULT_SPACE) <= set(SEARCHABLE)
    assert {"param_beta": "float64", "param_latent_dim": "int64", "param_arch": "string"}.items() <= COLUMNS.items()
    import pyarrow as pa

    from study.results.tables import TRIAL_COLUMNS

    assert all(TRIAL_COLUMNS[c] == getattr(pa, a)() for c, a in COLUMNS.items())
    assert all(BY_NAME[n].help for n in names)


@pytest.mark.parametrize("name,value", [("beta", 4.0), ("latent_dim", 12), ("lr", 5e-4)])
def test_a_fixed_value_wins_over_the_default_space(name, value):
    """[train] x = v, or the flag --x v, fixes x for every trial instead of searching it."""
    for spec in (build_spec({"train": {name: value}}, BASE), build_spec(None, {**BASE, name: value})):
        assert name not in spec.space and spec.train[name] == value
        assert fixed_params(spec)[name] == value and name not in optuna_space(spec)
        assert set(spec.space) == {"latent_dim", "beta", "lr"} - {name}
    # a flag also wins over the file's own [space] entry
    toml = {"space": {name: {"type": "float", "low": 1e-4, "high": 50.0}, "hidden": {"type": "int", "low": 8, "high": 64}}}
    assert set(build_spec(toml, {**BASE, name: value}).space) == {"hidden"}
    # the file both fixing and searching it is ambiguous: refused
    with pytest.raises(StudyError, match=f"{name} is both fixed"):
        build_spec({"train": {name: value}, "space": toml["space"]}, BASE)
    # and fixing everything there is to search leaves nothing to search: said, not run
    with pytest.raises(StudyError, match="nothing to search"):
        build_spec(None, {**BASE, "beta": 1.0, "latent_dim": 8, "lr": 1e-3})


def test_run_flags_come_from_the_registry():
    """Every run flag for a training value is generated, and reaches the spec by its field name."""
    from study.cli import build_parser
    from study.spec.spec import overrides_from_flags

    args = build_parser().parse_args(["run", "--name", "f", "--storage", "/tmp/f", "--beta", "4", "--layers", "2",
                                      "--grid", "latent_dim=5,10", "--objective", "val_mse", "--split-seed", "3"])
    spec = build_spec(None, overrides_from_flags(vars(args)))
    assert spec.train["beta"] == 4.0 and spec.train["layers"] == 2 and spec.train["split_seed"] == 3
    assert spec.grid == {"latent_dim": [5, 10]} and spec.objective == ("val_mse",) and spec.seed == 0


def test_sampler_choices_and_what_each_cannot_do():
    from study.search.samplers import make_sampler, sampler_notes, uses_constant_liar
    from study.spec.spec import SAMPLERS

    assert build_spec(None, BASE).sampler == "tpe"
    assert build_spec(None, {**BASE, "objective": ["val_recon", "val_kl"]}).sampler == "nsgaii"
    for name in SAMPLERS:
        spec = build_spec(None, {**BASE, "sampler": name})
        assert type(make_sampler(spec)).__name__.lower().startswith(
            {"tpe": "tpe", "random": "random", "qmc": "qmc", "cmaes": "cmaes", "gp": "gp", "nsgaii": "nsgaii"}[name])
    # a TOML [search] section says the same
    assert build_spec({"search": {"sampler": "gp", "constant_liar": False}}, BASE).sampler == "gp"
    # constant liar: on with trials at once, off alone, and as the study says
    tpe = build_spec(None, BASE)
    assert uses_constant_liar(tpe, 4) and not uses_constant_liar(tpe, 1)
    assert not uses_constant_liar(build_spec(None, {**BASE, "constant_liar": False}), 4)
    assert make_sampler(tpe, 4)._constant_liar and not make_sampler(tpe, 1)._constant_liar
    # what a sampler cannot model is said in one line; what it cannot do at all is refused
    cat = {"space": {"latent_dim": {"type": "int", "low": 2, "high": 8},
                     "beta": {"type": "float", "low": 0.1, "high": 1.0},
                     "arch": {"type": "categorical", "choices": ["mlp", "conv"]}}}
    assert "arch is drawn at random" in sampler_notes(build_spec(cat, {**BASE, "sampler": "cmaes"}))[0]
    assert "arch is drawn at random" in sampler_notes(build_spec(cat, {**BASE, "sampler": "qmc"}))[0]
    assert sampler_notes(build_spec(cat, {**BASE, "sampler": "tpe"})) == []
    with pytest.raises(StudyError, match="cmaes sampler optimises one objective"):
        build_spec(None, {**BASE, "sampler": "cmaes", "objective": ["val_recon", "val_kl"]})
    with pytest.raises(StudyError, match="drop --sampler"):
        build_spec(None, {**BASE, "sampler": "gp", "grid": {"latent_dim": [2, 4]}})
    assert build_spec(None, {**BASE, "grid": {"latent_dim": [2, 4]}}).sampler == "grid"
    with pytest.raises(StudyError, match="sampler='bayes' is not allowed"):
        build_spec(None, {**BASE, "sampler": "bayes"})


def test_a_new_parameter_is_one_field_and_one_registry_entry(tmp_path):
    """What adding a searchable parameter takes: a TrainConfig field in vae/config.py and one
    Param in study/spec/space.py. In a copy of the package with just those two lines added, the new
    parameter is a run and train flag, a searchable name in the default space, a typed param_*
    column of the trials table, a value a fixed flag sets for every trial, and what the refit
    of a winner trains with."""
    import shutil

    for pkg in ("vae", "study", "analysis"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "vae" / "config.py"
    text = config.read_text()
    assert "    download: bool = False\n" in text
    config.write_text(text.replace("    download: bool = False\n",
                                   "    download: bool = False\n    dropout: float = 0.0\n", 1))
    space = tmp_path / "study" / "spec" / "space.py"
    text = space.read_text()
    assert "\n)\nBY_NAME" in text
    space.write_text(text.replace("\n)\nBY_NAME", '\n    Param("dropout", "dropout before the decoder", "float64", '
                                  'searchable=True, space={"type": "float", "low": 0.0, "high": 0.5}),\n)\nBY_NAME', 1))
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent('''
        import contextlib, io, json
        import pandas as pd
        import pyarrow as pa
        from study import cli, results, spec as spec_mod
        from study.runner import recipes, refit
        out = {}
        for sub in ("run", "train"):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
                cli.main([sub, "--help"])
            out[sub + "_flag"] = "--dropout" in buf.getvalue()
        searched = spec_mod.build_spec(None, {"name": "s", "storage": "/tmp/s"})
        out["searched"] = "dropout" in searched.space
        fixed = spec_mod.build_spec(None, {"name": "s", "storage": "/tmp/s", "dropout": 0.25})
        out["fixed"] = recipes.fixed_params(fixed).get("dropout")
        out["fixed_not_searched"] = "dropout" not in fixed.space
        out["column"] = str(results.TRIAL_COLUMNS.get("param_dropout"))
        winner = pd.Series({"param_latent_dim": 8, "param_beta": 1.0, "param_lr": 1e-3, "param_dropout": 0.3,
                            "best_epoch": 3, "trial_id": "abc"}, dtype=object)
        values = refit.refit_values(recipes.fixed_params(searched), winner)
        from vae.config import TrainConfig
        out["refit"] = TrainConfig.from_dict(values).dropout
        print(json.dumps(out))
    '''))
    p = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == {"run_flag": True, "train_flag": True, "searched": True, "fixed": 0.25,
                   "fixed_not_searched": True, "column": "double", "refit": 0.3}, got


def _random_study(n: int, seed: int = 0):
    """A study of ``n`` finished trials over the default space, 60% of them pruned, and 2 running."""
    import numpy as np
    import optuna

    from study.search.samplers import optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = optuna_space(build_spec(None, BASE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rng = np.random.default_rng(seed)
    for i in range(n + 2):
        params = {k: d.to_external_repr(d.low + (d.high - d.low) * rng.random()) if hasattr(d, "low")
                  else d.choices[0] for k, d in dists.items()}
        params = {k: int(round(v)) if isinstance(dists[k], optuna.distributions.IntDistribution) else v
                  for k, v in params.items()}
        state = (optuna.trial.TrialState.RUNNING if i >= n else
                 optuna.trial.TrialState.PRUNED if rng.random() < 0.6 else optuna.trial.TrialState.COMPLETE)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, state=state,
            value=float(rng.normal(130, 5)) if state == optuna.trial.TrialState.COMPLETE else None,
            intermediate_values={1: float(rng.normal(140, 5))}))
    return study, dists


def test_tpe_fits_on_a_bounded_history_that_keeps_its_good_group():
    """TPE's ask costs time linear in the study; the study's TPE fits on at most TPE_HISTORY
    finished trials. Up to that it is Optuna's TPE, draw for draw; beyond it, TPE's good group
    (the trials it models as good) is the one it would find in the whole study, and the rest are
    the most recent trials."""
    import optuna
    from optuna.samplers._tpe.sampler import _split_trials

    from study.search.samplers import TPE_BEST, TPE_HISTORY, TPEHistorySampler, recent_and_best

    study, dists = _random_study(120)
    draws = []
    for cls in (optuna.samplers.TPESampler, TPEHistorySampler):
        study.sampler = cls(seed=3, multivariate=True, n_startup_trials=10, constant_liar=True)
        draws.append([study.sampler.sample_relative(study, study.trials[-1], dists) for _ in range(4)])
    assert draws[0] == draws[1] and draws[0][0]

    big, dists = _random_study(TPE_HISTORY + 800, seed=1)
    every = big._get_trials(deepcopy=False)
    kept = recent_and_best(every, big.direction, TPE_HISTORY, TPE_BEST)
    running = [t for t in every if t.state == optuna.trial.TrialState.RUNNING]
    assert len(kept) == TPE_HISTORY + len(running) and running == kept[-len(running):]
    assert [t.number for t in kept] == sorted(t.number for t in kept)
    numbers = {t.number for t in kept}
    completed = sorted((t for t in every if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    assert {t.number for t in completed[:TPE_BEST]} <= numbers
    assert every[-300].number in numbers and every[0].number not in numbers or every[0] in completed[:TPE_BEST]
    for n_below in (10, 25):
        assert [t.number for t in _split_trials(big, every, n_below)[0]] == \
               [t.number for t in _split_trials(big, kept, n_below)[0]]
    big.sampler = TPEHistorySampler(seed=3, multivariate=True, n_startup_trials=10, constant_liar=True)
    drawn = big.sampler.sample_relative(big, big.trials[-1], dists)
    assert set(drawn) == set(dists) and all(dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in drawn.items())


def test_the_scheduler_chooses_as_fifo_does_looking_only_past_the_finished_trials():
    """Tune's trials (stubs: no Ray), in the order Tune keeps them: the study's schedulers pick the
    trial FIFO picks (the first PENDING, else the first PAUSED), start after the leading finished
    ones, and forget that start when pickled (a resumed driver may make an ERROR trial PENDING)."""
    import pickle

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    spec = build_spec(None, BASE)
    trials = [Trial("t", stub=True, trial_id=f"t{i}") for i in range(8)]

    class Controller:  # what choose_trial_to_run reads of Tune's controller
        def get_trials(self):
            return trials

    def statuses(*s):
        for t, st in zip(trials, s):
            t.status = st

    T, E, R, P, Pa = Trial.TERMINATED, Trial.ERROR, Trial.RUNNING, Trial.PENDING, Trial.PAUSED
    fifo = FIFOScheduler()
    for scheduler in (make_scheduler(spec), make_scheduler(build_spec(None, {**BASE, "grid": {"latent_dim": [2, 4]}}))):
        # a study as it goes: a trial only moves on (PENDING, RUNNING, PAUSED, then TERMINATED or ERROR)
        for case in [(R, R, P, P, P, P, P, P), (T, R, R, P, P, P, P, P), (T, E, R, R, P, P, P, P),
                     (T, E, T, R, Pa, R, P, P), (T, E, T, T, Pa, R, R, R), (T, E, T, T, R, T, R, R)]:
            statuses(*case)
            assert scheduler.choose_trial_to_run(Controller()) is fifo.choose_trial_to_run(Controller()), case
        statuses(T, T, T, T, T, R, P, R)
        assert scheduler.choose_trial_to_run(Controller()) is trials[6] and scheduler._live_from == 5
        restored = pickle.loads(pickle.dumps(scheduler))
        assert "_live_from" not in restored.__dict__
        statuses(T, E, T, T, T, R, R, R)
        trials[1].status = P  # a resumed driver restarts an errored trial
        assert restored.choose_trial_to_run(Controller()) is trials[1]


@pytest.mark.parametrize("sampler", [*__import__("study.spec", fromlist=["SAMPLERS"]).SAMPLERS, "grid"])
def test_every_sampler_pickles_as_tune_pickles_the_searcher(sampler):
    """Tune pickles the study's searcher, its sampler with it, as the study starts and at each
    save (Optuna 5.1's NSGA-II holds a thread lock, which broke that): each sampler makes the
    round trip, and draws as it did before it."""
    import pickle

    import optuna

    from study.search.samplers import make_sampler, optuna_space

    options = {**BASE, "sampler": sampler, "trials": 8}
    if sampler == "grid":
        options = {**BASE, "grid": {"latent_dim": [2, 4]}, "trials": 2}
    spec = build_spec(None, options)
    s = make_sampler(spec, concurrent=2)
    copy = pickle.loads(pickle.dumps(s))
    assert type(copy) is type(s)
    draws = []
    for one in (s, copy):
        study = optuna.create_study(sampler=one)
        space = optuna_space(spec)
        draws.append([study.ask(space).params for _ in range(3)])
    assert draws[0] == draws[1]


def test_a_val_mse_study_searches_the_reconstruction_space_by_default():
    """One objective val_mse: d up to 128 and beta down to 0.001 (the study's first lines say so);
    every other study keeps the default space, and a file's [space], a preset or a fixed value wins."""
    from study.spec.space import DEFAULT_SPACE, RECONSTRUCTION_SPACE, describe

    mse = build_spec(None, {**BASE, "objective": ["val_mse"]})
    assert mse.space == RECONSTRUCTION_SPACE != DEFAULT_SPACE
    assert mse.space["latent_dim"]["high"] == 128 and mse.space["beta"]["low"] == 0.001
    assert mse.space["lr"] == DEFAULT_SPACE["lr"]
    assert describe(mse.space) == "latent_dim 2-128, beta 0.001-10 (log), lr 0.0001-0.003 (log)"
    for objective in (["val_elbo"], ["val_recon"], ["val_mse", "val_kl"]):
        assert build_spec(None, {**BASE, "objective": objective}).space == DEFAULT_SPACE, objective
    own = {"space": {"beta": {"type": "float", "low": 0.05, "high": 5.0, "log": True}}}
    assert build_spec(own, {**BASE, "objective": ["val_mse"]}).space == own["space"]
    assert "beta" not in build_spec(None, {**BASE, "objective": ["val_mse"], "beta": 0.01}).space
    assert build_spec(None, {**BASE, "objective": ["val_mse"], "preset": "seed-replication"}).space == {}
