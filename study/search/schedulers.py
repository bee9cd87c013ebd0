"""The study's Tune schedulers: ASHA on the study's epochs, or first-in-first-out (no early
stopping), each choosing the next trial among the unfinished ones only; and ASHA's rungs, where
trials report and persist a checkpoint. A new scheduler goes here, beside ``make_scheduler``.
"""
from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from study.spec import StudySpec


def make_scheduler(spec: StudySpec) -> Any:
    """ASHA on the study's epochs, or first-in-first-out (no early stopping); either looks for the
    next trial to run among the unfinished ones only (``LiveScan``)."""
    if spec.scheduler == "none" or spec.multi_objective:
        return StudyFIFO()
    return StudyASHA(
        time_attr="epoch",  # a trial reports at the rungs, not every epoch (study.runner.reports)
        max_t=spec.epochs,
        grace_period=min(spec.grace_period, spec.epochs),
        reduction_factor=spec.reduction_factor,
    )


class LiveScan:
    """Tune's FIFO choice of the next trial, without its scan of every trial at every step.

    ``FIFOScheduler.choose_trial_to_run`` walks the whole trial list for a PENDING trial, and again
    for a PAUSED one, at each step of Tune's loop: 12.6% of a 10,000-trial study's driver. Within
    one driver a TERMINATED or ERROR trial never runs again, so the walk starts after the leading
    run of them (kept per process, never pickled: a resumed driver may turn an ERROR trial back
    to PENDING). A trial Tune retries goes from RUNNING to PENDING within one call, moved to the
    end of the list; only trials past the start move, so those before it stay finished."""

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        from ray.tune.experiment import Trial

        trials = tune_controller.get_trials()
        start = self.__dict__.get("_live_from", 0)
        if start > len(trials):
            start = 0
        while start < len(trials) and trials[start].status in (Trial.TERMINATED, Trial.ERROR):
            start += 1
        self._live_from = start
        for wanted in (Trial.PENDING, Trial.PAUSED):
            for i in range(start, len(trials)):
                if trials[i].status == wanted:
                    return trials[i]
        return None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_live_from", None)
        return state


class StudyASHA(LiveScan, ASHAScheduler):
    """Tune's ASHA, choosing the next trial as ``LiveScan`` does."""


class StudyFIFO(LiveScan, FIFOScheduler):
    """Tune's first-in-first-out scheduler, choosing the next trial as ``LiveScan`` does."""


def asha_rungs(spec: StudySpec) -> list[int]:
    """Epochs at which ASHA may stop a trial (it decides at the first result at or past each rung):
    grace_period * reduction_factor**k up to max_t. Trials persist a checkpoint there."""
    if spec.scheduler == "none" or spec.multi_objective:
        return []
    rungs, t = [], float(min(spec.grace_period, spec.epochs))
    while t < spec.epochs:
        rungs.append(math.ceil(t))
        t *= spec.reduction_factor
    return rungs
