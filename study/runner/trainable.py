"""The Ray Tune function trainable: config dict -> TrainConfig -> vae.fit -> tune.report.

This is the only place that calls ``tune.report``, and it reports only where the driver decides
something or someone watches (``study.runner.reports``): at each epoch where ASHA may stop the trial
(its rungs), at the last epoch, and at least every ``report_every_s`` seconds (5). Each report is
its newest epoch's result (metrics and the best-so-far values of every objective) and carries
the epochs since the previous report, which the driver reads back one by one
(``study.results.epochs.each_epoch``). ``training_iteration`` therefore counts reports; ``epoch`` is
the epoch, and ASHA counts in epochs.

Checkpoints are persisted where they can matter, not at every epoch: at ASHA's rungs, at the
last epoch, and at least every ``PERSIST_EVERY_S`` seconds. Each holds ``model.pt``, the best
epoch's weights (what the report analyses), and ``state.pt``, the current weights with the
optimiser state, from which a retried or resumed trial continues. The test split's per-digit
metrics of the best weights travel with each checkpoint that has a new best. On mnist-sample an
epoch takes a fraction of a second, and evaluating plus saving at every improving epoch cost
about a third on top.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from study.results import CARRIED
from study.results.rows import node_facts, test_rows
from study.spec import OBJECTIVES, RECORDED, trial_values

# Recon modes recorded per trial; decoder_only is costly and left to the report.
TRIAL_MODES = ("posterior_mean", "posterior_sample")
PERSIST_EVERY_S = 30.0


class TrialFailed(RuntimeError):
    """Training cannot go on (NaN loss, bad config); Ray records the trial as errored."""


def train_trial(config: dict[str, Any], runtime: dict[str, Any]) -> None:
    """Train one trial. ``runtime`` holds settings that are not hyperparameters (CPU threads)."""
    entered = time.perf_counter()
    import torch
    from ray import tune

    from vae import checkpoint as ckpt_io
    from vae.config import ConfigError, TrainConfig
    from vae.data import load
    from vae.pack import packable
    from vae.train import fit, resolve_device, score

    torch.set_num_threads(max(1, int(runtime.get("cpus_per_trial", 1))))
    try:
        tc = TrainConfig.from_dict(trial_values(config, runtime.get("beta_times_latent")))
    except ConfigError as exc:
        raise TrialFailed(f"invalid trial config: {exc}") from None
    # A packed trial trains in its pack's process: its own holds no CUDA context, and evaluates
    # its checkpoints' test metrics on the CPU.
    device = resolve_device("cpu" if runtime.get("pack") and packable(tc) else tc.device)
    data = load(tc)  # memoised per worker process: a reused actor never parses twice

    select, mode = tuple(runtime.get("select") or ("val_elbo", "min"))
    start_epoch, model, opt_state, best, best_epoch = 1, None, None, math.inf, None
    best_values: dict[str, Any] = {}
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            if not (Path(d) / "state.pt").is_file():
                return  # its last epoch's checkpoint (saved without optimiser state): nothing left to train
            model, _, payload = ckpt_io.load(Path(d) / "state.pt", device)
        start_epoch = int(payload["epoch"]) + 1
        opt_state = payload.get("optimizer")
        best_epoch = int(payload["best_epoch"])
        best_values = dict(payload.get("best_values", {}))
        best = _restored_score(payload, best_values, select, mode, score)
        if start_epoch > tc.epochs:
            return

    static = {
        **node_facts(tc, device),
        "pid": os.getpid(),
        "entered_unix": time.time() - (time.perf_counter() - entered),
        "trained_with": {k: getattr(tc, k) for k in RECORDED},  # derived values included
        "restored_from_epoch": start_epoch - 1,  # 0: this attempt started from scratch
        # imports, data (memoised in a reused worker) and model set-up, before the first step
        "setup_seconds": time.perf_counter() - entered,
    }
    if runtime.get("pack") and packable(tc):
        _train_in_pack(tc, data, runtime, static, best_values, restored, (select, mode),
                       resume=None if model is None else {"model": model.state_dict(), "optimizer": opt_state,
                                                          "epoch": start_epoch - 1, "best_score": best,
                                                          "best_epoch": best_epoch})
        return
    reporter = _Reporter(tc, data.test, device, static, best_values, restored,
                         persist_at=set(runtime.get("persist_epochs") or ()) | {tc.epochs},
                         report_every_s=float(runtime.get("report_every_s", 0.0)), select=(select, mode))
    result = fit(
        tc, data, on_epoch=reporter, model=model, optimizer_state=opt_state,
        start_epoch=start_epoch, best_score=best, best_epoch=best_epoch, select=select, mode=mode,
    )
    if result.status == "failed":
        reporter.flush()  # the epochs it trained before it failed are recorded
        raise TrialFailed(result.error)


def _train_in_pack(tc: Any, data: Any, runtime: dict[str, Any], static: dict[str, Any], best_values: dict[str, Any],
                   restored: Any, select: tuple[str, str], resume: dict[str, Any] | None) -> None:
    """A trial whose epochs train in its device's pack (``study.runner.packing``): each epoch is
    asked of the pack and reported as ``fit``'s on_epoch would report it."""
    import torch

    from study.runner.packing import PackClient, RemoteEpochState

    t0 = time.perf_counter()
    client = PackClient(runtime["study"], tc, runtime, resume)
    static = {**static, **client.facts, "setup_seconds": static["setup_seconds"] + time.perf_counter() - t0}
    reporter = _Reporter(tc, data.test, torch.device("cpu"), static, best_values, restored,
                         persist_at=set(runtime.get("persist_epochs") or ()) | {tc.epochs},
                         report_every_s=float(runtime.get("report_every_s", 0.0)), select=select)
    try:
        for _ in range(static["restored_from_epoch"] + 1, tc.epochs + 1):
            got = client.epoch()
            if "error" in got:
                reporter.flush()  # the epochs it trained before it failed are recorded
                raise TrialFailed(got["error"])
            metrics = {k: v for k, v in got.items() if k not in ("is_best", "best_epoch", "best_score")}
            reporter(metrics, RemoteEpochState(client, got, tc))
    finally:
        client.leave()


class _Reporter:
    """``fit``'s on_epoch: a ``tune.report`` where one is due (``study.runner.reports``), carrying the
    epochs since the previous one, with a checkpoint where one is due.

    Args:
        tc: the trial's config.
        test: the test split (per-digit metrics of the best weights travel with checkpoints).
        device: where the model lives.
        static: facts about the trial reported with every report (node, device, ...).
        best_values: best-so-far objective values (restored from a checkpoint, or empty).
        restored: the checkpoint this attempt continued from, or None.
        persist_at: epochs at which a checkpoint is persisted (ASHA's rungs and the last epoch);
            a report is made there too.
        report_every_s: the longest it goes without a report (0: a report every epoch).
        select: (metric, mode) that chose the best epoch (``StudySpec.select``), saved with the
            optimiser state so that a resumed attempt continues the same rule.
    """

    def __init__(self, tc: Any, test: Any, device: Any, static: dict[str, Any], best_values: dict[str, Any],
                 restored: Any, *, persist_at: set[int], report_every_s: float,
                 select: tuple[str, str] = ("val_elbo", "min")) -> None:
        from vae.model import BetaVAE

        self.tc, self.test, self.device, self.static = tc, test, device, static
        self.best_values, self.restored, self.persist_at = best_values, restored, persist_at
        self.report_every_s, self._select = report_every_s, select
        self.last_persist = self.last_report = time.monotonic()
        self.dirty = False  # a new best since the last persisted checkpoint
        self.pending: list[dict[str, Any]] = []  # epochs trained since the last report, oldest first
        # Where a trial's time goes besides training and validation (up to its previous report):
        # in tune.report (which waits for the driver to take the result), and in checkpoints
        # (the best weights' per-digit test metrics, saving the files).
        self.overhead = {"report_seconds": 0.0, "checkpoint_seconds": 0.0}
        self.scratch = BetaVAE.from_config(tc).to(device)  # holds the best weights to evaluate and save

    def __call__(self, m: dict[str, Any], state: Any) -> None:
        if state.is_best:
            self.best_values.update({f"best_{k}": m[k] for k in OBJECTIVES})
            self.best_values["best_epoch"] = m["epoch"]
            self.dirty = True
        # this epoch's values: its metrics and the best-so-far values (the test ones travel apart)
        epoch = {**m, **{k: v for k, v in self.best_values.items() if not k.startswith("test")}}
        now = time.monotonic()
        persist = m["epoch"] in self.persist_at or now - self.last_persist >= PERSIST_EVERY_S
        if not persist and now - self.last_report < self.report_every_s:
            self.pending.append(epoch)
            return
        if not persist:
            self._report(epoch)
            return
        t0 = time.perf_counter()
        if self.dirty and state.best_state is not None:
            self._evaluate_best(state)
        # Every persisted checkpoint carries the best weights' test metrics, so a driver that
        # restarted since they were computed still records them.
        test = {k: self.best_values[k] for k in ("test_elbo", "test_mse", "test_psnr", "test_digits")
                if k in self.best_values}
        with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as tmp:
            self._save(Path(tmp), m["epoch"], state)
            self.overhead["checkpoint_seconds"] += time.perf_counter() - t0
            self._report({**epoch, **test}, checkpoint=tmp)
        self.dirty = False
        self.last_persist = time.monotonic()

    def flush(self) -> None:
        """Report the epochs still held (the trial is about to end without a report of its own)."""
        if self.pending:
            self._report(self.pending.pop())

    def _report(self, epoch: dict[str, Any], checkpoint: str | None = None) -> None:
        from ray import tune

        metrics = {**self.static, **epoch, **self.overhead, CARRIED: json.dumps(self.pending)}
        t0 = time.perf_counter()
        if checkpoint is None:
            tune.report(metrics)
        else:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint))
        self.overhead["report_seconds"] += time.perf_counter() - t0
        self.pending = []
        self.last_report = time.monotonic()

    def _evaluate_best(self, state: Any) -> None:
        from vae.evaluate import evaluate_split

        self.scratch.load_state_dict(state.best_state)
        ev = evaluate_split(self.scratch, self.test, modes=TRIAL_MODES, device=self.device)
        metrics, digits = test_rows(ev)
        self.best_values.update(metrics)
        self.best_values["test_digits"] = json.dumps(digits)

    def _save(self, folder: Path, epoch: int, state: Any) -> None:
        """model.pt: the best weights (what the report analyses); state.pt: the current weights
        and optimiser, from which a retried or resumed trial continues. The last epoch's
        checkpoint has no state.pt: nothing continues from it (7.7 MB of the MLP's 10.3)."""
        from vae import checkpoint as ckpt_io

        if state.best_state is not None:
            self.scratch.load_state_dict(state.best_state)
            ckpt_io.save(folder / "model.pt", self.scratch, self.tc, epoch=state.best_epoch,
                         best_values={k: v for k, v in self.best_values.items() if k != "test_digits"})
        else:  # resumed, and no better epoch yet: the best weights are in the restored checkpoint
            _copy_best(self.restored, folder)
        if epoch < self.tc.epochs:
            ckpt_io.save(folder / "state.pt", state.model, self.tc, epoch=epoch,
                         optimizer=state.optimizer.state_dict(), best_score=state.best_score,
                         select=list(self._select), best_epoch=state.best_epoch,
                         best_values=dict(self.best_values))


def _restored_score(payload: dict[str, Any], best_values: dict[str, Any], select: str, mode: str,
                    score: Any) -> float:
    """The best epoch's selection score a checkpoint continues from. A checkpoint written before
    trials selected by their objective holds ``best_val_elbo`` only: its best epoch's value of
    ``select`` is then read from its best values (every objective's value at that epoch)."""
    if tuple(payload.get("select") or ("val_elbo", "min")) == (select, mode) and "best_score" in payload:
        return float(payload["best_score"])
    if (select, mode) == ("val_elbo", "min") and "best_val_elbo" in payload:
        return float(payload["best_val_elbo"])
    value = score({select: best_values.get(f"best_{select}")}, select, mode)
    return math.inf if value is None else value


def _copy_best(checkpoint: Any, dest: Path) -> None:
    import shutil

    with checkpoint.as_directory() as d:
        shutil.copy2(Path(d) / "model.pt", dest / "model.pt")
