"""The live progress printer: a line per trial event, the running trials every 15 s, and trials
that wait for resources: since when, and what the autoscaler says about it."""
from __future__ import annotations

import time
from typing import Any, Callable

from ray.tune import Callback

from study.results.recorder import trial_error
from study.store import outage

Printer = Callable[[str], None]
TABLE_EVERY_S = 15.0
WAIT_NOTICE_S = 30.0  # the first notice of trials waiting for resources; then at 2x, 4x, ... that
WAIT_NOTICE_MAX_S = 600.0
PENDING_EVERY_S = 1.0  # how often the trials are looked at for ones waiting


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
        self.waiting_since: float | None = None  # wall time since which some trial has waited for resources
        self.next_wait_notice = WAIT_NOTICE_S
        self.pending_seen_at = 0.0

    def _value(self, r: dict[str, Any]) -> str:
        v = r.get(self.metric)
        return "None" if v is None else f"{v:.3f}"

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """A trial that cannot be placed is said, not waited on in silence: how many wait, for
        what, since when, and (autoscaler v2) which launches are pending or failed and why.
        Looked at once a second: Tune ends many steps a second, and the list holds every trial
        of the study."""
        now = time.time()
        if now - getattr(self, "pending_seen_at", 0.0) < PENDING_EVERY_S:
            return
        self.pending_seen_at = now
        pending = [t for t in trials if t.status == "PENDING"]
        if not pending:
            self.waiting_since, self.next_wait_notice = None, WAIT_NOTICE_S
            return
        if self.waiting_since is None:
            self.waiting_since = now
        waited = now - self.waiting_since
        if waited < self.next_wait_notice:
            return
        self.next_wait_notice = min(self.next_wait_notice * 2, waited + WAIT_NOTICE_MAX_S)
        self.printer(waiting_line(len(pending), self.spec, self.waiting_since, now))

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
        if outage.gave_up() is not None:  # not recorded, so not finished: resume continues it
            return
        self.done += 1
        r = trial.last_result or {}
        epochs = int(r.get("epoch", 0))
        status = "done" if epochs >= self.spec.epochs else "pruned"
        self.printer(f"  {status:<8} {trial.trial_id}  epoch {epochs:>3}/{self.spec.epochs}  "
                     f"{self.spec.objective[0]} {self._value(r)}  [{self.done}/{self.spec.n_trials}]")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if outage.gave_up() is not None:  # not recorded, so not finished: resume continues it
            return
        self.done += 1
        self.printer(f"  failed   {trial.trial_id}  {trial_error(trial)}  [{self.done}/{self.spec.n_trials}]")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.printer(f"  retry    {trial.trial_id}  (attempt {trial.num_failures + 1}, from its last checkpoint)")

    def __getstate__(self) -> dict[str, Any]:
        # The printer is the driver's; a resumed study gives its own (see attach).
        return {**self.__dict__, "printer": print}

    def attach(self, printer: Printer, done: int = 0) -> None:
        """A resumed study's printer, and how many of its trials had finished before."""
        self.printer = printer
        self.done = done


def waiting_line(n: int, spec: Any, since: float, now: float) -> str:
    """One line: trials waiting for resources, for how long, and what the cluster and its
    autoscaler say."""
    from study.cluster import autoscaler_note, free_resources

    need = f"{spec.cpus_per_trial:g} CPU" + (f" + {spec.gpus_per_trial:g} GPU" if spec.gpus_per_trial else "")
    clock = time.strftime("%H:%M:%S", time.localtime(since))
    minutes, seconds = divmod(int(now - since), 60)
    free = free_resources()
    note = autoscaler_note()
    return (f"  waiting  {n} trial{'s' if n != 1 else ''} ({need} each) since {clock} ({minutes}m{seconds:02d}s); "
            f"free now: {free}; {note}")


class StorageWatch(outage.Listener):
    """The driver's ear on its storage's outages (``study.store.outage``): one line when the bucket
    stops answering and one when it is back; when the study's patience runs out, Ray Tune is asked
    to stop as Ctrl-C does (its SIGUSR1 handler: the trials stop, Tune saves what it can), and its
    loggers are quieted, since every write left fails at once: ``study.runner.recipes`` then says
    why in one line."""

    def __init__(self, study_uri: str, patience: float, printer: Printer) -> None:
        self.study_uri, self.patience, self.printer = study_uri, patience, printer

    def down(self, uri: str, since: float, reason: str) -> None:
        at = time.strftime("%H:%M:%S", time.localtime(since))
        self.printer(f"storage {self.study_uri} unreachable since {at} ({reason}): waiting up to "
                     f"{self.patience:g} s for it (--storage-patience); trials go on where they can")

    def up(self, uri: str, lasted: float) -> None:
        self.printer(f"storage {self.study_uri} reachable again after {lasted:.0f} s")

    def gave_up(self, error: BaseException) -> None:
        import logging
        import os
        import signal

        for name in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):  # Tune's own, while a Tuner runs in the main thread
            os.kill(os.getpid(), signal.SIGUSR1)
