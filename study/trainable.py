"""The Ray Tune function trainable: config dict -> TrainConfig -> vae.fit, tune.report per epoch.

This is the only place that calls ``tune.report``: once per epoch, so ``training_iteration``
equals the epoch. Each report carries the epoch's metrics and the best-so-far values of every
objective; a new best epoch also carries the test split's per-digit metrics and a checkpoint
(weights, optimiser state, epoch) from which a retried or resumed trial continues.
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
    import ray
    import torch
    from ray import tune

    from vae import checkpoint as ckpt_io
    from vae.config import ConfigError, TrainConfig
    from vae.data import load
    from vae.evaluate import evaluate_split
    from vae.train import effective_precision, fit, resolve_device

    torch.set_num_threads(max(1, int(runtime.get("cpus_per_trial", 1))))
    try:
        tc = TrainConfig.from_dict(trial_config(config, runtime))
    except ConfigError as exc:
        raise TrialFailed(f"invalid trial config: {exc}") from None
    device = resolve_device(tc.device)
    data = load(tc)  # memoised per worker process: a reused actor never parses twice
    x_test = data.test  # evaluated on the device at each new best epoch

    start_epoch, model, opt_state, best_elbo, best_epoch = 1, None, None, math.inf, None
    best_values: dict[str, float] = {}
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            model, _, payload = ckpt_io.load(Path(d) / "model.pt", device)
        start_epoch = int(payload["epoch"]) + 1
        opt_state = payload.get("optimizer")
        best_elbo = float(payload["best_val_elbo"])
        best_epoch = int(payload["epoch"])
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
        "param_beta": tc.beta,
    }

    def on_epoch(m: dict[str, Any], state: Any) -> None:
        metrics = {**m, **static}
        checkpoint = None
        tmp = None
        if state.is_best:
            best_values.update({f"best_{k}": m[k] for k in OBJECTIVES})
            best_values["best_epoch"] = m["epoch"]
            ev = evaluate_split(state.model, x_test, modes=TRIAL_MODES, device=device)
            state.model.train()
            metrics["test_elbo"] = ev["neg_elbo"]
            metrics["test_mse"] = ev["modes"]["posterior_mean"]["mean_mse"]
            metrics["test_psnr"] = ev["modes"]["posterior_mean"]["mean_psnr"]
            metrics["test_digits"] = json.dumps(
                [{"split": "test", "recon_mode": mode, **row}
                 for mode, entry in ev["modes"].items() for row in entry["per_digit"]]
            )
            tmp = tempfile.TemporaryDirectory(prefix="vae-ckpt-")
            ckpt_io.save(
                Path(tmp.name) / "model.pt", state.model, tc,
                epoch=m["epoch"], optimizer=state.optimizer.state_dict(),
                best_val_elbo=m["val_elbo"], best_values=dict(best_values),
            )
            checkpoint = tune.Checkpoint.from_directory(tmp.name)
        metrics.update(best_values)
        try:
            tune.report(metrics, checkpoint=checkpoint)
        finally:
            if tmp is not None:
                tmp.cleanup()

    result = fit(
        tc, data, on_epoch=on_epoch, model=model, optimizer_state=opt_state,
        start_epoch=start_epoch, best_val_elbo=best_elbo, best_epoch=best_epoch,
    )
    if result.status == "failed":
        raise TrialFailed(result.error)
