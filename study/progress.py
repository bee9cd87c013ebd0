"""The live progress printer: a line per trial event, and the running trials every 15 s."""
from __future__ import annotations

import time
from typing import Any, Callable

from ray.tune import Callback

from study.recorder import trial_error

Printer = Callable[[str], None]
TABLE_EVERY_S = 15.0


def params_text(config: dict[str, Any], keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = config.get(k)
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class Progress(Callback):
    """Prints a line per trial event, and the running trials every 15 s."""

    def __init__(self, spec: Any, printer: Printer) -> None:
        self.spec = spec
        self.printer = printer
        self.keys = list(spec.space) + list(spec.grid)
        self.metric = f"best_{spec.objective[0]}"
        self.last_table = 0.0
        self.done = 0

    def _value(self, r: dict[str, Any]) -> str:
        v = r.get(self.metric)
        return "None" if v is None else f"{v:.3f}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.printer(f"  start    {trial.trial_id}  {params_text(trial.config, self.keys)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        now = time.monotonic()
        if self.last_table == 0.0:
            self.last_table = now  # the first table comes after 15 s, when there is news
        elif now - self.last_table >= TABLE_EVERY_S:
            self.last_table = now
            spec = self.spec
            running = [t for t in trials if t.status == "RUNNING" and t.last_result]
            self.printer(f"  -- {self.done}/{spec.n_trials} done, {len(running)} running --")
            for t in running:
                r = t.last_result or {}
                self.printer(f"  running  {t.trial_id}  epoch {r.get('epoch', 0):>3}/{spec.epochs}  "
                             f"{spec.objective[0]} {self._value(r)}  {params_text(t.config, self.keys)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        r = trial.last_result or {}
        epochs = int(r.get("epoch", 0))
        status = "done" if epochs >= self.spec.epochs else "pruned"
        self.printer(f"  {status:<8} {trial.trial_id}  epoch {epochs:>3}/{self.spec.epochs}  "
                     f"{self.spec.objective[0]} {self._value(r)}  [{self.done}/{self.spec.n_trials}]")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        self.printer(f"  failed   {trial.trial_id}  {trial_error(trial)}  [{self.done}/{self.spec.n_trials}]")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.printer(f"  retry    {trial.trial_id}  (attempt {trial.num_failures + 1}, from its last checkpoint)")

    def __getstate__(self) -> dict[str, Any]:
        # The printer is the driver's; a resumed study gives its own (see attach).
        return {**self.__dict__, "printer": print}

    def attach(self, printer: Printer) -> None:
        self.printer = printer
        self.done = 0
