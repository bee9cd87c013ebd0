"""The epochs a trial's report carries, one dict per epoch.

A trial reports to Tune only where a decision is made or someone is watching
(``study.runner.reports``), and each report carries the epochs trained since the previous one under
``CARRIED``. Everything that keeps one row per epoch reads a result through :func:`each_epoch`:
the results recorder, Optuna's intermediate values, Tune's loggers and the trackers. A Tune
callback of the user's own does the same::

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for epoch in study.each_epoch(result):
            ...  # one dict per epoch: epoch["epoch"], epoch["val_elbo"], ...
"""
from __future__ import annotations

import json
from typing import Any

CARRIED = "carried_epochs"

# Per-report values that belong to the report's own epoch only (the best weights' test metrics
# travel with checkpoints); an earlier epoch carried in the same report does not repeat them.
_OWN_EPOCH_ONLY = ("test_elbo", "test_mse", "test_psnr", "test_digits")


def each_epoch(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One result per epoch, oldest first: the epochs ``result`` carries, then its own. Each is
    ``result`` with that epoch's values (its metrics and best-so-far values), without
    ``CARRIED``, and with ``training_iteration`` set to the epoch (the step loggers plot)."""
    carried = result.get(CARRIED)
    base = {k: v for k, v in result.items() if k != CARRIED}
    if "epoch" in base:
        base["training_iteration"] = base["epoch"]
    if not carried:
        return [base]
    older = {k: v for k, v in base.items() if k not in _OWN_EPOCH_ONLY}
    out = []
    for entry in json.loads(carried):
        r = {**older, **entry}
        r["training_iteration"] = entry["epoch"]
        out.append(r)
    out.append(base)
    return out
