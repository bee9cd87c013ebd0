"""The study's Optuna samplers: TPE by default (with a bounded history), or random, QMC, CMA-ES,
GP, NSGA-II, a grid; the start-up points spread over the space (Sobol); and the spec's space as
Optuna's distributions. A new sampler goes here: one branch of ``make_sampler`` and its name in
``study.spec.SAMPLERS``.
"""
from __future__ import annotations

import math
from typing import Any

import optuna

from study.spec import StudySpec


def optuna_space(spec: StudySpec) -> dict[str, Any]:
    od = optuna.distributions

    space: dict[str, Any] = {}
    for name, p in spec.space.items():
        if p["type"] == "int":
            space[name] = od.IntDistribution(int(p["low"]), int(p["high"]), log=bool(p.get("log", False)))
        elif p["type"] == "float":
            space[name] = od.FloatDistribution(float(p["low"]), float(p["high"]), log=bool(p.get("log", False)))
        else:
            space[name] = od.CategoricalDistribution(list(p["choices"]))
    for name, values in spec.grid.items():
        space[name] = od.CategoricalDistribution(list(values))
    return space


def startup_count(spec: StudySpec) -> int:
    """TPE's start-up trials before it models: ``--startup-trials``, else min(10, max(2, trials // 4))."""
    return spec.startup_trials if spec.startup_trials is not None else min(10, max(2, spec.trials // 4))


def spread_points(space: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations spread over ``space`` (Optuna distributions): a scrambled Sobol
    sequence (torch.quasirandom, seeded), mapped through each distribution, on a log scale where
    the distribution is log-scaled. They cover the space more evenly than ``n`` random draws.
    (torch's engine rather than scipy's: the driver has torch loaded already, and importing
    scipy.stats cost 0.5 s before the first trial could start.)"""
    from torch.quasirandom import SobolEngine

    if n < 1 or not space:
        return []
    od = optuna.distributions
    names = sorted(space)
    unit = SobolEngine(len(names), scramble=True, seed=seed).draw(n).double().tolist()  # n x dims, [0, 1)
    points = []
    for row in unit:
        point: dict[str, Any] = {}
        for name, u in zip(names, row):
            dist = space[name]
            if isinstance(dist, od.CategoricalDistribution):
                point[name] = dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
                continue
            lo, hi = float(dist.low), float(dist.high)
            x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if dist.log else lo + u * (hi - lo)
            if isinstance(dist, od.IntDistribution):
                point[name] = min(int(dist.high), max(int(dist.low), int(round(x))))
            else:
                point[name] = min(hi, max(lo, x))
        points.append(point)
    return points


# Model-based samplers that start from a few configurations spread over the space (Sobol).
_WITH_STARTUP = ("tpe", "gp")


def uses_constant_liar(spec: StudySpec, concurrent: int) -> bool:
    """TPE's constant liar: trials running at once count as (bad) results, so that two asked at
    the same time are not sent to the same spot. On whenever more than one trial runs at once,
    unless the study says otherwise."""
    return spec.sampler == "tpe" and (spec.constant_liar if spec.constant_liar is not None else concurrent > 1)


TPE_HISTORY = 1000  # the most finished trials TPE fits its model on (``TPEHistorySampler``)
TPE_BEST = 100  # of which the best completed ones always count


class TPEHistorySampler(optuna.samplers.TPESampler):
    """Optuna's TPE, fitting on at most ``TPE_HISTORY`` finished trials: the ``TPE_BEST`` best
    completed ones and the most recent others, plus the running ones (the constant liar).

    TPE fits on every finished trial at every ask, so an ask costs time linear in the study
    (8 ms at 1,000 trials, 62 ms at 10,000 here) and a study quadratic time in its trials.
    Up to ``TPE_HISTORY`` trials nothing changes. Beyond, the good group TPE models (the best
    ``min(ceil(0.1 n), 25)`` trials: completed ones rank before pruned ones) is the same as on
    the whole study, and the rest is its most recent trials, those TPE's own weights favour.
    A study of several objectives fits on all its trials.
    """

    def _sample(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return super()._sample(_History(study, TPE_HISTORY, TPE_BEST), trial, search_space)


class _History:
    """A study as TPE reads it, holding at most ``size`` finished trials (``TPEHistorySampler``)."""

    def __init__(self, study: Any, size: int, best: int) -> None:
        self._study, self._size, self._best = study, size, best

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[Any]:
        trials = self._study._get_trials(*args, **kwargs)
        if len(self._study.directions) > 1:  # several objectives: TPE's good group is a Pareto front
            return trials
        return recent_and_best(trials, self._study.direction, self._size, self._best)


def recent_and_best(trials: list[Any], direction: Any, size: int, best: int) -> list[Any]:
    """Of ``trials`` (in trial order), all the running ones and at most ``size`` finished ones:
    the ``best`` best completed ones and the most recent others, in trial order.

    One pass over the trials, by position, reading each trial's state and stored values once
    (its ``value`` and ``number`` properties check and copy: half of this at 10,000 trials)."""
    if len(trials) <= size:  # the common case, at every ask: no pass over the trials
        return trials
    import heapq

    running, complete = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
    sign = 1.0 if direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    finished: list[int] = []  # positions of the finished trials, in trial order
    scored: list[tuple[float, int]] = []  # (signed value, position) of the completed ones
    for i, t in enumerate(trials):
        state = t.state
        if state == running:
            continue
        finished.append(i)
        if state == complete:
            scored.append((sign * t.values[0], i))
    if len(finished) <= size:
        return trials
    keep = {i for _, i in heapq.nsmallest(best, scored)}  # ties: the earlier trial
    for i in reversed(finished):
        if len(keep) >= size:
            break
        keep.add(i)
    return [t for i, t in enumerate(trials) if i in keep or t.state == running]


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable again: Tune pickles the study's searcher, its sampler with it,
    when the study starts and at each save, and Optuna 5.1's genetic samplers hold a thread lock
    (``_thread_lock``), which no pickle takes. The lock is left out and made anew when loaded."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_thread_lock" in state:
            import threading

            self._thread_lock = threading.Lock()


# Optuna names what its genetic samplers keep in a study after the class (``NSGAIISampler:...``):
# the subclass keeps Optuna's names, so a study resumed across versions reads its generations.
for _key in ("_GENERATION_KEY", "_PARENT_CACHE_KEY_PREFIX"):
    if _key in vars(optuna.samplers.NSGAIISampler):
        setattr(NSGAIISampler, _key, vars(optuna.samplers.NSGAIISampler)[_key])


def make_sampler(spec: StudySpec, concurrent: int = 1) -> Any:
    """The study's Optuna sampler, seeded."""
    s, seed = spec.sampler, spec.seed
    if s == "grid":
        return optuna.samplers.GridSampler({k: list(v) for k, v in spec.grid.items()}, seed=seed)
    if s == "tpe":
        return TPEHistorySampler(seed=seed, multivariate=True, n_startup_trials=startup_count(spec),
                                 constant_liar=uses_constant_liar(spec, concurrent))
    if s == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_count(spec))
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "qmc":
        import warnings

        with warnings.catch_warnings():  # "experimental since v3.0": known, and nothing to act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                              warn_independent_sampling=False, warn_asynchronous_seeding=False)
    if s == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if s == "nsgaii":
        return NSGAIISampler(seed=seed, population_size=max(4, min(50, spec.n_trials // 4)))
    raise ValueError(f"unknown sampler {s!r}")


def sampler_notes(spec: StudySpec) -> list[str]:
    """One line for each part of the space the sampler cannot model itself: Optuna then samples
    that part at random (its independent sampler)."""
    space = optuna_space(spec)
    categorical = sorted(n for n, d in space.items() if isinstance(d, optuna.distributions.CategoricalDistribution))
    numeric = sorted(set(space) - set(categorical))
    if spec.sampler == "cmaes" and categorical:
        return [f"note: CMA-ES models numbers only; {', '.join(categorical)} is drawn at random (Optuna's fallback)"]
    if spec.sampler == "cmaes" and len(numeric) < 2:
        return ["note: CMA-ES needs two or more numeric parameters; with one, every trial is drawn at random"]
    if spec.sampler == "qmc" and categorical:
        return [f"note: QMC spreads numbers only; {', '.join(categorical)} is drawn at random (Optuna's fallback)"]
    return []
