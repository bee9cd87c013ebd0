"""The Ray Tune function trainable: config dict -> TrainConfig -> vae.fit, tune.report per epoch.

This is the only place that calls ``tune.report``: once per epoch, so ``training_iteration``
equals the epoch. Each report carries the epoch's metrics and the best-so-far values of every
objective.

Checkpoints are persisted where they can matter, not at every epoch: at each epoch where ASHA
may stop the trial (its rungs), at the last epoch, and at least every ``PERSIST_EVERY_S``
seconds. Each holds ``model.pt``, the best epoch's weights (what the report analyses), and
``state.pt``, the current weights with the optimiser state, from which a retried or resumed trial
continues. The test split's per-digit metrics of the best weights travel with each checkpoint
that has a new best. On mnist-sample an epoch takes a fraction of a second, and evaluating plus
saving at every improving epoch cost about a third on top.
"""
from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from study.spec import OBJECTIVES

# Recon modes recorded per trial; decoder_only is costly and left to the report.
TRIAL_MODES = ("posterior_mean", "posterior_sample")
PERSIST_EVERY_S = 30.0


class TrialFailed(RuntimeError):
    """Training cannot go on (NaN loss, bad config); Ray records the trial as errored."""


def trial_config(config: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig values of one trial: Tune's config plus rules that derive values."""
    values = dict(config)
    if runtime.get("beta_times_latent"):
        values["beta"] = runtime["beta_times_latent"] / values["latent_dim"]
    return values


def train_trial(config: dict[str, Any], runtime: dict[str, Any]) -> None:
    """Train one trial. ``runtime`` holds settings that are not hyperparameters (CPU threads)."""
    import time

    entered = time.perf_counter()
    import ray
    import torch
    from ray import tune

    from vae import checkpoint as ckpt_io
    from vae.config import ConfigError, TrainConfig
    from vae.data import load
    from vae.evaluate import evaluate_split
    from vae.model import BetaVAE
    from vae.train import effective_precision, fit, resolve_device

    torch.set_num_threads(max(1, int(runtime.get("cpus_per_trial", 1))))
    try:
        tc = TrainConfig.from_dict(trial_config(config, runtime))
    except ConfigError as exc:
        raise TrialFailed(f"invalid trial config: {exc}") from None
    device = resolve_device(tc.device)
    data = load(tc)  # memoised per worker process: a reused actor never parses twice

    start_epoch, model, opt_state, best_elbo, best_epoch = 1, None, None, math.inf, None
    best_values: dict[str, Any] = {}
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            model, _, payload = ckpt_io.load(Path(d) / "state.pt", device)
        start_epoch = int(payload["epoch"]) + 1
        opt_state = payload.get("optimizer")
        best_elbo = float(payload["best_val_elbo"])
        best_epoch = int(payload["best_epoch"])
        best_values = dict(payload.get("best_values", {}))
        if start_epoch > tc.epochs:
            return

    static = {
        "node": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "device": str(device) + (f":{torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "precision": effective_precision(tc, device),
        "torch_version": str(torch.__version__),
        "pid": os.getpid(),
        "entered_unix": time.time() - (time.perf_counter() - entered),
        "param_beta": tc.beta,
        "restored_from_epoch": start_epoch - 1,  # 0: this attempt started from scratch
        # imports, data (memoised in a reused worker) and model set-up, before the first step
        "setup_seconds": time.perf_counter() - entered,
    }
    persist_at = set(runtime.get("persist_epochs") or ()) | {tc.epochs}
    last_persist = [time.monotonic()]
    dirty = [False]  # a new best since the last persisted checkpoint
    scratch = BetaVAE.from_config(tc).to(device)

    def on_epoch(m: dict[str, Any], state: Any) -> None:
        metrics = {**m, **static}
        if state.is_best:
            best_values.update({f"best_{k}": m[k] for k in OBJECTIVES})
            best_values["best_epoch"] = m["epoch"]
            dirty[0] = True
        metrics.update({k: v for k, v in best_values.items() if not k.startswith("test")})
        due = m["epoch"] in persist_at or time.monotonic() - last_persist[0] >= PERSIST_EVERY_S
        if not due:
            tune.report(metrics)
            return
        if dirty[0] and state.best_state is not None:
            scratch.load_state_dict(state.best_state)
            ev = evaluate_split(scratch, data.test, modes=TRIAL_MODES, device=device)
            best_values["test_elbo"] = ev["neg_elbo"]
            best_values["test_mse"] = ev["modes"]["posterior_mean"]["mean_mse"]
            best_values["test_psnr"] = ev["modes"]["posterior_mean"]["mean_psnr"]
            best_values["test_digits"] = json.dumps(
                [{"split": "test", "recon_mode": mode, **row}
                 for mode, entry in ev["modes"].items() for row in entry["per_digit"]]
            )
        # Every persisted checkpoint carries the best weights' test metrics, so a driver that
        # restarted since they were computed still records them.
        metrics.update({k: best_values[k] for k in ("test_elbo", "test_mse", "test_psnr", "test_digits")
                        if k in best_values})
        with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as tmp:
            if state.best_state is not None:
                scratch.load_state_dict(state.best_state)
                ckpt_io.save(Path(tmp) / "model.pt", scratch, tc, epoch=state.best_epoch,
                             best_values={k: v for k, v in best_values.items() if k != "test_digits"})
            else:  # resumed, and no better epoch yet: the best weights are in the restored checkpoint
                _copy_best(restored, Path(tmp))
            ckpt_io.save(Path(tmp) / "state.pt", state.model, tc, epoch=m["epoch"],
                         optimizer=state.optimizer.state_dict(), best_val_elbo=state.best_val_elbo,
                         best_epoch=state.best_epoch, best_values=dict(best_values))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        dirty[0] = False
        last_persist[0] = time.monotonic()

    result = fit(
        tc, data, on_epoch=on_epoch, model=model, optimizer_state=opt_state,
        start_epoch=start_epoch, best_val_elbo=best_elbo, best_epoch=best_epoch,
    )
    if result.status == "failed":
        raise TrialFailed(result.error)


def _copy_best(checkpoint: Any, dest: Path) -> None:
    import shutil

    with checkpoint.as_directory() as d:
        shutil.copy2(Path(d) / "model.pt", dest / "model.pt")
