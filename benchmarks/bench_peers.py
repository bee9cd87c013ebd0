"""The search against what its users would run instead: the peers side by side, in trial-epochs.

Every peer trains the same thing, this project's training of one configuration
(``vae.train.fit`` on mnist-sample: 3,200 training and 800 validation images, the MLP, batch 32,
one CPU thread per trial), over the same space (latent_dim in [2, 64] int, beta in [0.01, 10] log,
lr in [1e-4, 3e-3] log), for up to 15 epochs a trial, 2 trials at a time, each as its own
documentation shows a user:

1. ``vae-study`` (its defaults, through ``study.runner``: TPE with Sobol start-up points and the
   constant liar, ASHA with grace period 1 and reduction factor 2);
2. Ray Tune's recipe: ``OptunaSearch()`` and ``ASHAScheduler()``, their defaults;
3. Optuna alone: ``TPESampler()`` and ``HyperbandPruner()``, ``study.optimize(n_jobs=2)``, no Ray;
4. BOHB through Ray Tune: ``TuneBOHB()`` and ``HyperBandForBOHB(max_t=15)``, a trainable that
   checkpoints every epoch so that the trials it pauses continue;
5. SMAC3's multi-fidelity facade (Hyperband with a random forest), budget = epochs;
6. DEHB, fidelity = epochs;
7. random search with ASHA (grace period 1, reduction factor 2: the tool's ASHA without its sampler).

SMAC3 and DEHB ask for a configuration at a budget and train it from scratch (their own design;
neither continues a lower budget's run), through ask/tell, with two worker processes.

What is counted: every epoch any trial trains is one trial-epoch, in the order the driver hears
of it; the best validation -ELBO so far after each. Each run stops at ``--budget`` trial-epochs.
Reported per peer, over the seeds (median and range): the trial-epochs until the best so far is
within 1% of the best value any run of the benchmark found; the best value after 80 trial-epochs
(a third of the grid's 240 in BENCHMARKS §1); the wall seconds to the target on this machine
(overhead counts). An anytime figure: best so far against trial-epochs, the median over seeds and
its range, one line per peer. The grid of §1 is read from its JSON, as a baseline.

The peers need packages the project does not (they move numpy and pandas): run it from a venv of
its own, ``python3.11 -m venv .venv-peers && .venv-peers/bin/pip install -e '.[peers]'``, then put
the project's numpy back (DEHB pins numpy < 2, pyarrow and Ray Tune need 2; DEHB runs with it):
``.venv-peers/bin/pip install 'numpy>=2'``. SMAC3's pyrfr builds with swig (``apt-get install swig``).

A replay (``--replay``, see ``benchmarks/curves.py``) trains nothing: every peer reads the
recorded learning curves of the configuration nearest to the one it asked for, so a seed costs
seconds to a minute instead of ten; the target is then within 1% of the table's best.

    .venv-peers/bin/python benchmarks/bench_peers.py --seeds 0 1 2 3 4 --json benchmarks/results/peers.json
    .venv-peers/bin/python benchmarks/bench_peers.py --peers vae-study optuna --seeds 0
    .venv-peers/bin/python benchmarks/bench_peers.py --from benchmarks/results/peers.json   # tables and figure again
    .venv-peers/bin/python benchmarks/bench_peers.py --replay benchmarks/results/curves.json --seeds 0 1 2 3 4 \
        --json benchmarks/results/replay_elbo.json

A peer that cannot be installed or run is reported with its error, not dropped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

EPOCHS = 15
SLOTS = 2
TRIALS = 240  # vae-study's --trials: set to the budget (no run finishes more trials than trial-epochs; its start-up points: 10)
AT = 80  # trial-epochs at which the best value is compared: a third of the grid's 240
SPACE = {"latent_dim": (2, 64), "beta": (0.01, 10.0), "lr": (1e-4, 3e-3)}
OBJECTIVE = "val_elbo"  # --objective: what every peer minimises, and what is counted
REPLAY: str | None = None  # --replay: a table of learning curves (benchmarks/curves.py) in place of training
PEERS = ("vae-study", "tune-recipe", "optuna", "bohb", "smac", "dehb", "random-asha")
LABELS = {"vae-study": "vae-study's defaults", "tune-recipe": "Ray Tune's recipe (OptunaSearch + ASHA)",
          "optuna": "Optuna alone (TPE + Hyperband pruner)", "bohb": "BOHB (TuneBOHB + HyperBandForBOHB)",
          "smac": "SMAC3 multi-fidelity (Hyperband + RF)", "dehb": "DEHB", "random-asha": "random search + ASHA"}


class Budget(Exception):
    """The run has spent its trial-epochs."""


class Log:
    """Every trial-epoch of one run, in the order the driver hears of it: (seconds since the
    run started, trial, epoch, val -ELBO)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.t0, self.events, self.lock = budget, time.perf_counter(), [], threading.Lock()

    def add(self, trial: str, epoch: int, value: float) -> None:
        with self.lock:
            if len(self.events) < self.budget:
                self.events.append((round(time.perf_counter() - self.t0, 3), str(trial), int(epoch), float(value)))

    @property
    def spent(self) -> bool:
        return len(self.events) >= self.budget

    def __getstate__(self) -> dict:  # Tune pickles its callbacks into tuner.pkl; the live one is this
        return {"budget": self.budget, "t0": self.t0, "events": []}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())


def config_for(params: dict[str, Any], epochs: int = EPOCHS) -> Any:
    from vae.config import TrainConfig

    return TrainConfig(dataset="mnist-sample", latent_dim=int(params["latent_dim"]), beta=float(params["beta"]),
                       lr=float(params["lr"]), epochs=int(epochs), seed=0)


def train(params: dict[str, Any], epochs: int, on_epoch: Callable[[dict, Any], Any] | None = None,
          objective: str | None = None) -> list[float]:
    """This project's training of one configuration: the objective's value at each epoch trained."""
    objective = objective or OBJECTIVE
    import torch

    from vae.data import load
    from vae.train import fit

    torch.set_num_threads(1)
    tc = config_for(params, epochs)
    values: list[float] = []

    def each(m: dict, state: Any) -> Any:
        values.append(float(m[objective]))
        return on_epoch(m, state) if on_epoch is not None else None

    fit(tc, load(tc), on_epoch=each)
    return values


def train_job(params: dict[str, Any], epochs: int, objective: str) -> list[float]:
    """A worker process's job (SMAC3, DEHB): train from scratch for ``epochs``."""
    return train(params, epochs, objective=objective)


# --------------------------------------------------------------------------- the peers

OURS: dict[str, Any] = {}  # --ours: options of vae-study's run beside its defaults (a variant measured)


def run_vae_study(seed: int, log: Log, tmp: str) -> dict:
    import study
    from ray import tune

    class Epochs(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            for r in study.each_epoch(result):
                log.add(trial.trial_id, r["epoch"], r[OBJECTIVE])
            if log.spent:
                raise Budget()  # a study has no budget in trial-epochs: this run's ends here

    # every peer searches SPACE: vae-study's own default for a val_mse study is wider (README)
    space = {k: {"type": "int", "low": lo, "high": hi} if k == "latent_dim" else
             {"type": "float", "low": lo, "high": hi, "log": True} for k, (lo, hi) in SPACE.items()}
    spec = study.build_spec({"space": space}, {"name": f"ours{seed}", "storage": tmp, "trials": TRIALS, "epochs": EPOCHS,
                                   "seed": seed, "num_cpus": SLOTS, "refit": False, "objective": OBJECTIVE,
                                   **OURS})
    try:
        study.run(spec, callbacks=[Epochs()], printer=lambda s: None)
    except Exception:  # noqa: BLE001 - Tune hands the callback's Budget on, wrapped
        if not log.spent:
            raise
    return {"trials": TRIALS}


def _tune_trainable(checkpoint_every_epoch: bool) -> Callable[[dict], None]:
    def trainable(config: dict) -> None:
        import tempfile as tf

        import torch
        from ray import tune

        from vae import checkpoint as ckpt_io
        from vae.data import load
        from vae.train import fit

        torch.set_num_threads(1)
        tc = config_for(config)
        kw: dict[str, Any] = {}
        restored = tune.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                model, _, p = ckpt_io.load(Path(d) / "state.pt")
            kw = {"model": model, "optimizer_state": p["optimizer"], "start_epoch": int(p["epoch"]) + 1,
                  "best_score": float(p["best_score"]), "best_epoch": p["best_epoch"]}

        def each(m: dict, state: Any) -> None:
            metrics = {OBJECTIVE: float(m[OBJECTIVE]), "epoch": int(m["epoch"])}
            if not checkpoint_every_epoch:
                tune.report(metrics)
                return
            with tf.TemporaryDirectory() as d:
                ckpt_io.save(Path(d) / "state.pt", state.model, tc, epoch=m["epoch"],
                             optimizer=state.optimizer.state_dict(), best_score=state.best_score,
                             best_epoch=state.best_epoch)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

        fit(tc, load(tc), on_epoch=each, **kw)

    return trainable


def _run_tune(log: Log, tmp: str, name: str, *, search_alg: Any, scheduler: Any, checkpoints: bool) -> dict:
    from ray import tune

    class Epochs(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            log.add(trial.trial_id, result["epoch"], result[OBJECTIVE])

    class Spent(tune.Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return log.spent

    space = {"latent_dim": tune.randint(2, 65), "beta": tune.loguniform(0.01, 10.0), "lr": tune.loguniform(1e-4, 3e-3)}
    tuner = tune.Tuner(
        tune.with_resources(_tune_trainable(checkpoints), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, metric=OBJECTIVE, mode="min",
                                    num_samples=1000, max_concurrent_trials=SLOTS,
                                    # a replay keeps each worker (and its table) rather than start one per
                                    # trial: the order of events is Tune's either way, the wall time not comparable
                                    reuse_actors=True if REPLAY else None),
        run_config=tune.RunConfig(name=name, storage_path=tmp, stop=Spent(), callbacks=[Epochs()], verbose=0),
    )
    grid = tuner.fit()
    return {"trials": len(grid)}


def run_tune_recipe(seed: int, log: Log, tmp: str) -> dict:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    return _run_tune(log, tmp, f"recipe{seed}", search_alg=OptunaSearch(seed=seed), scheduler=ASHAScheduler(),
                     checkpoints=False)


def run_random_asha(seed: int, log: Log, tmp: str) -> dict:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return _run_tune(log, tmp, f"random{seed}", search_alg=BasicVariantGenerator(random_state=seed),
                     scheduler=ASHAScheduler(time_attr="epoch", max_t=EPOCHS, grace_period=1, reduction_factor=2),
                     checkpoints=False)


def run_bohb(seed: int, log: Log, tmp: str) -> dict:
    from ray.tune.schedulers.hb_bohb import HyperBandForBOHB
    from ray.tune.search.bohb import TuneBOHB

    return _run_tune(log, tmp, f"bohb{seed}", search_alg=TuneBOHB(seed=seed),
                     scheduler=HyperBandForBOHB(time_attr="training_iteration", max_t=EPOCHS, stop_last_trials=False),
                     checkpoints=True)


def run_optuna(seed: int, log: Log, tmp: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.HyperbandPruner())

    def objective(trial: optuna.Trial) -> float:
        params = {"latent_dim": trial.suggest_int("latent_dim", 2, 64),
                  "beta": trial.suggest_float("beta", 0.01, 10.0, log=True),
                  "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True)}
        pruned = []

        def each(m: dict, state: Any) -> Any:
            log.add(f"optuna-{trial.number}", m["epoch"], m[OBJECTIVE])
            trial.report(float(m[OBJECTIVE]), int(m["epoch"]))
            if log.spent:
                trial.study.stop()
                pruned.append("budget")
                return False
            if trial.should_prune():
                pruned.append("pruned")
                return False
            return None

        values = train(params, EPOCHS, each)
        if pruned:
            raise optuna.TrialPruned()
        return min(values)

    study.optimize(objective, n_trials=1000, n_jobs=SLOTS)
    return {"trials": len(study.trials)}


def _ask_tell(log: Log, ask: Callable[[], tuple[Any, dict, int]], tell: Callable[[Any, float, float], None]) -> dict:
    """Two worker processes, ask/tell: keep two jobs in flight until the budget is spent."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    jobs = 0
    with ProcessPoolExecutor(SLOTS, mp_context=mp.get_context("spawn")) as pool:
        running: dict[Any, tuple[Any, float]] = {}
        while True:
            while len(running) < SLOTS and not log.spent:
                handle, params, epochs = ask()
                running[pool.submit(train_job, params, epochs, OBJECTIVE)] = (handle, time.perf_counter())
                jobs += 1
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                handle, started = running.pop(fut)
                values = fut.result()
                for epoch, v in enumerate(values, 1):
                    log.add(f"job-{id(handle)}", epoch, v)
                tell(handle, min(values), time.perf_counter() - started)
    return {"trials": jobs}


def _configspace(seed: int) -> Any:
    from ConfigSpace import ConfigurationSpace, Float, Integer

    cs = ConfigurationSpace(seed=seed)
    cs.add([Integer("latent_dim", (2, 64)), Float("beta", (0.01, 10.0), log=True), Float("lr", (1e-4, 3e-3), log=True)])
    return cs


def run_smac(seed: int, log: Log, tmp: str) -> dict:
    from smac import MultiFidelityFacade, Scenario
    from smac.runhistory.dataclasses import TrialValue

    scenario = Scenario(_configspace(seed), deterministic=True, n_trials=10_000, min_budget=1, max_budget=EPOCHS,
                        seed=seed, output_directory=Path(tmp) / f"smac{seed}")
    smac = MultiFidelityFacade(scenario, lambda config, seed=0, budget=EPOCHS: 0.0, overwrite=True,
                               logging_level=40)

    def ask() -> tuple[Any, dict, int]:
        info = smac.ask()
        return info, dict(info.config), max(1, int(round(info.budget)))

    def tell(info: Any, value: float, seconds: float) -> None:
        smac.tell(info, TrialValue(cost=value, time=seconds))

    return _ask_tell(log, ask, tell)


def run_dehb(seed: int, log: Log, tmp: str) -> dict:
    from dehb import DEHB

    dehb = DEHB(cs=_configspace(seed), min_fidelity=1, max_fidelity=EPOCHS, eta=3, n_workers=1, seed=seed,
                output_path=str(Path(tmp) / f"dehb{seed}"))

    def ask() -> tuple[Any, dict, int]:
        job = dehb.ask()
        return job, dict(job["config"]), max(1, int(round(job["fidelity"])))

    def tell(job: Any, value: float, seconds: float) -> None:
        dehb.tell(job, {"fitness": value, "cost": seconds})

    return _ask_tell(log, ask, tell)


RUNNERS = {"vae-study": run_vae_study, "tune-recipe": run_tune_recipe, "optuna": run_optuna, "bohb": run_bohb,
           "smac": run_smac, "dehb": run_dehb, "random-asha": run_random_asha}
RAY_PEERS = ("vae-study", "tune-recipe", "bohb", "random-asha")


# --------------------------------------------------------------------------- measures

def best_so_far(events: list) -> list[float]:
    out, best = [], math.inf
    for _, _, _, v in events:
        best = min(best, v)
        out.append(best)
    return out


def measure(events: list, target: float) -> dict:
    curve = best_so_far(events)
    hit = next((i for i, b in enumerate(curve) if b <= target), None)
    return {"to_target": None if hit is None else hit + 1,
            "wall_to_target": None if hit is None else events[hit][0],
            f"best_at_{AT}": curve[AT - 1] if len(curve) >= AT else (curve[-1] if curve else None),
            "best": curve[-1] if curve else None, "spent": len(events)}


def summarize(runs: dict, grid: dict | None, known_best: float | None = None) -> dict:
    """The table's measures per peer; ``known_best`` (a replay's table optimum) sets the target
    where given, else the best value any run found (or the grid's)."""
    values = [v for peer in runs.values() for r in peer.values() if "events" in r for *_, v in r["events"]]
    best = known_best if known_best is not None else min(values + ([grid["best"]] if grid else []))
    target = best * 1.01
    table = {}
    for peer, seeds in runs.items():
        ok = {s: measure(r["events"], target) for s, r in seeds.items() if "events" in r}
        errors = {s: r["error"] for s, r in seeds.items() if "error" in r}
        reach = [m["to_target"] for m in ok.values()]
        table[peer] = {"per_seed": ok, "errors": errors,
                       "median_to_target": _median(reach),
                       f"median_best_at_{AT}": _median([m[f"best_at_{AT}"] for m in ok.values()]),
                       "median_wall_to_target": _median([m["wall_to_target"] for m in ok.values()])}
    return {"best_found": best, "target": target, "table": table}


def paired(ours: dict, theirs: dict, key: str, never: float) -> dict | None:
    """Ours against a peer over the seeds both ran: how often ours is lower (better), the median
    of the per-seed differences (ours - theirs), and the two-sided Wilcoxon signed-rank p-value
    (seeds where both are equal drop out, as Wilcoxon's test has it). A run that never reached the
    target counts as ``never`` (the budget plus one) trial-epochs."""
    from scipy.stats import wilcoxon

    seeds = sorted(set(ours) & set(theirs), key=int)
    if not seeds:
        return None
    val = lambda m: never if m[key] is None else m[key]  # noqa: E731
    diffs = [val(ours[s]) - val(theirs[s]) for s in seeds]
    nonzero = [d for d in diffs if d != 0]
    p = float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
    return {"seeds": len(seeds), "ours_better": sum(d < 0 for d in diffs), "ours_worse": sum(d > 0 for d in diffs),
            "median_diff": statistics.median(diffs), "p": p}


def comparisons(summary: dict, ref: str, budget: int) -> dict:
    table = summary["table"]
    if ref not in table:
        return {}
    out = {}
    for peer, t in table.items():
        if peer == ref:
            continue
        out[peer] = {k: paired(table[ref]["per_seed"], t["per_seed"], k, budget + 1)
                     for k in ("to_target", f"best_at_{AT}")}
    return out


def spread(xs: list[float]) -> str:
    """Median (interquartile range) of finite values, with the count of the rest."""
    import numpy as np

    fin = [x for x in xs if x is not None]
    if not fin:
        return "—"
    q1, q3 = np.percentile(fin, [25, 75])
    return f"{statistics.median(fin):.4g} (IQR {q1:.4g}–{q3:.4g})"


def _median(xs: list) -> float | None:
    """The median, counting a run that never got there as worse than any that did."""
    if not xs:
        return None
    m = statistics.median([math.inf if x is None else x for x in xs])
    return None if math.isinf(m) else m


def figure(runs: dict, grid: dict | None, target: float, path: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for peer, seeds in runs.items():
        curves = [best_so_far(r["events"]) for r in seeds.values() if r.get("events")]
        if not curves:
            continue
        n = min(budget, max(len(c) for c in curves))
        m = np.array([[c[min(i, len(c) - 1)] for i in range(n)] for c in curves])
        x = np.arange(1, n + 1)
        line, = ax.plot(x, np.median(m, axis=0), label=f"{LABELS.get(peer, peer)} ({len(curves)} seeds)",
                        lw=2 if peer.startswith("vae-study") else 1.3)
        ax.fill_between(x, m.min(axis=0), m.max(axis=0), color=line.get_color(), alpha=0.12)
    if grid:
        ax.step(grid["curve"][0], grid["curve"][1], where="post", color="k", ls=":", label="grid of §1 (16 trials)")
    ax.axhline(target, color="grey", ls="--", lw=1, label="target: within 1% of the best found")
    ax.axvline(AT, color="grey", ls=":", lw=1)
    ax.set(xlabel="trial-epochs spent", ylabel=f"best {OBJECTIVE} so far", xlim=(1, budget),
           ylim=(target / 1.01 * 0.995, target * 1.12), title="The search against its peers: median over seeds, range shaded")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def load_grid(path: Path) -> dict | None:
    if not path.is_file():
        return None
    g = json.loads(path.read_text())
    curve = g["curves"]["grid (16 trials, full epochs)"]
    return {"best": g["grid_best_val_elbo"], "total": g["runs"]["grid"]["trial_epochs_total"],
            "curve": [[c[0] for c in curve], [c[1] for c in curve]]}


def report(summary: dict, grid: dict | None, ref: str | None = None, budget: int = 240) -> str:
    basis = "the table's best (a replay)" if summary.get("known_best") else "the best any run found"
    lines = [f"{summary.get('objective', 'val_elbo')}: {basis} {summary['best_found']:.4g}; "
             f"target (within 1%): {summary['target']:.4g}",
             "", f"| searcher | trial-epochs to target, per seed | median (reached) | best after {AT} trial-epochs: "
             "median (IQR; range) | wall s to target (median) |", "|---|---|---|---|---|"]
    for peer, t in summary["table"].items():
        per = t["per_seed"]
        reach = ", ".join("never" if m["to_target"] is None else str(m["to_target"]) for m in per.values()) or "—"
        hits = sum(m["to_target"] is not None for m in per.values())
        at = [m[f"best_at_{AT}"] for m in per.values() if m[f"best_at_{AT}"] is not None]
        span = f"{spread(at)}; {min(at):.4g}–{max(at):.4g}" if at else "—"
        med = "never" if t["median_to_target"] is None and per else (t["median_to_target"] or "—")
        wall = f"{t['median_wall_to_target']:.0f}" if t["median_wall_to_target"] is not None else "—"
        errs = "; ".join(f"seed {s}: {e}" for s, e in t["errors"].items())
        lines.append(f"| {LABELS.get(peer, peer)} | {reach}{' (errors: ' + errs + ')' if errs else ''} | "
                     f"{med} ({hits} of {len(per)}) | {span} | {wall} |")
    if grid and not summary.get("known_best"):
        lines.append(f"| grid of §1 (16 configurations x 15 epochs) | {grid['total']} in all | | | |")
    if ref:
        lines += ["", f"Paired over seeds, {LABELS.get(ref, ref)} against each peer (ours - theirs; lower is better; "
                  f"Wilcoxon signed-rank, two-sided; never = {budget + 1}):", ""]
        for peer, c in comparisons(summary, ref, budget).items():
            parts = []
            for key, label in (("to_target", "trial-epochs to target"), (f"best_at_{AT}", f"best after {AT}")):
                r = c[key]
                if r:
                    parts.append(f"{label}: better at {r['ours_better']}, worse at {r['ours_worse']} of {r['seeds']} "
                                 f"seeds, median difference {r['median_diff']:+.4g}, p = {r['p']:.3f}")
            lines.append(f"- vs {LABELS.get(peer, peer)}: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    global OBJECTIVE, REPLAY, TRIALS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget", type=int, default=240, help="trial-epochs per run (default 240, the grid's)")
    ap.add_argument("--grid", default=str(REPO / "benchmarks/results/search_efficiency_rf2_liar.json"))
    ap.add_argument("--json", help="write every run's events and the summary here (and the figure beside it)")
    ap.add_argument("--from", dest="source", help="summarize an earlier --json again, running nothing")
    ap.add_argument("--add", help="an earlier --json to extend: its runs are kept, these are added")
    ap.add_argument("--ours", help="a variant of vae-study to measure: its options as JSON, e.g. "
                    "'{\"reduction_factor\": 4}'; its runs are kept as 'vae-study <options>'")
    ap.add_argument("--objective", choices=("val_elbo", "val_mse"), default=None,
                    help="what every peer minimises (default val_elbo; --from/--add: the file's)")
    ap.add_argument("--replay", help="a table of learning curves (benchmarks/curves.py): every peer replays it "
                    "instead of training (see curves.py for what that is and is not)")
    ap.add_argument("--pace", type=float, default=0.05, help="with --replay: seconds each replayed epoch takes")
    ap.add_argument("--ref", help="the run the paired tests compare with every other (default: the first "
                    "vae-study run in the file)")
    args = ap.parse_args()
    TRIALS = args.budget
    if args.ours:
        OURS.update(json.loads(args.ours))
    earlier = json.loads(Path(args.source or args.add).read_text()) if (args.source or args.add) else {}
    OBJECTIVE = args.objective or earlier.get("objective", "val_elbo")
    REPLAY = args.replay or earlier.get("replay")
    if earlier and earlier.get("objective", "val_elbo") != OBJECTIVE:
        raise SystemExit(f"--objective {OBJECTIVE}: the earlier file measured {earlier.get('objective', 'val_elbo')}")
    known_best = None
    if REPLAY:
        sys.path.insert(0, str(REPO / "benchmarks"))
        import curves

        known_best = curves.Table(REPLAY).best(OBJECTIVE)
        if not args.source:  # every process from here on replays: this one, Ray's workers, worker pools
            os.environ["VAE_REPLAY_CURVES"] = str(Path(REPLAY).resolve())
            os.environ["VAE_REPLAY_PACE"] = str(args.pace)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(REPO / "benchmarks/replay_site")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
            curves.PACE_S = args.pace
            curves.install(REPLAY)
    grid = None if REPLAY else load_grid(Path(args.grid))
    runs = earlier.get("runs", {})
    head = {"budget": args.budget, "objective": OBJECTIVE, "replay": REPLAY}
    if not args.source:
        for seed in args.seeds:  # seeds outermost: the machine's noise spreads over every peer alike
            for peer in args.peers:
                key = f"vae-study {args.ours}" if peer == "vae-study" and args.ours else peer
                runs.setdefault(key, {})[str(seed)] = one(peer, seed, args.budget)
                r = runs[key][str(seed)]
                print(f"{key:<12} seed {seed}: " + (f"error: {r['error']}" if "error" in r else
                      f"{len(r['events'])} trial-epochs in {r['seconds']:.0f} s, best {min(v for *_, v in r['events']):.4g}"),
                      flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({**head, "runs": runs}))
    summary = summarize(runs, grid, known_best)
    summary.update(objective=OBJECTIVE, known_best=known_best)
    ref = args.ref or next((k for k in runs if k.startswith("vae-study")), None)
    text = report(summary, grid, ref, args.budget)
    print(text)
    if args.json or args.source:
        out = Path(args.json or args.source)
        out.write_text(json.dumps({**head, "runs": runs, "summary": summary}))
        figure(runs, grid, summary["target"], out.with_suffix(".png"), args.budget)
        out.with_suffix(".txt").write_text(text + "\n")


def one(peer: str, seed: int, budget: int) -> dict:
    log = Log(budget)
    t0 = time.perf_counter()
    ray_started = False
    try:
        if peer in RAY_PEERS:
            from study import cluster

            cluster.init_ray(None, SLOTS)
            ray_started = True
        with tempfile.TemporaryDirectory(prefix=f"vae-peers-{peer}-") as tmp:
            facts = RUNNERS[peer](seed, log, tmp)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run is said, with its error
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                "partial_events": log.events}
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    return {"events": log.events, "seconds": time.perf_counter() - t0, **facts}


if __name__ == "__main__":
    main()
