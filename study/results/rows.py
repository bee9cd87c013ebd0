"""The rows a study writes, each built in one place: a trials row (for a trial of the search and
for the winner's refit alike), a trial's per-digit test rows, and the facts about where it ran.

Pure but for :func:`node_facts` (asked in the worker that trains) and :func:`provenance` (the
driver's library versions and git commit, read once per process).
"""
from __future__ import annotations

import functools
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from study.spec import RECORDED
from vae.train import best_epoch

NODE_KEYS = ("node", "hostname", "device", "pack", "precision", "torch_version")
TEST_KEYS = ("test_elbo", "test_mse", "test_psnr")
# Facts a trial reports about itself, kept in its row as they are.
META_KEYS = ("setup_seconds", "restored_from_epoch", "report_seconds", "checkpoint_seconds")


def trial_results(epochs: list[dict[str, Any]], *, status: str, objective: str,
                  select: tuple[str, str] = ("val_elbo", "min")) -> dict[str, Any]:
    """A trial's results from its epoch rows: the best epoch (``vae.train.best_epoch``, the one
    definition of it), that epoch's validation metrics, and the objective read at that epoch.

    Args:
        epochs: one dict per epoch with ``epoch``, ``val_*``, ``seconds``, ``images_per_second``.
        status: completed, pruned or failed.
        objective: the metric the study ranks on (its first objective), e.g. ``val_elbo``.
        select: (metric, mode) that chooses the best epoch, as the trial chose it (``StudySpec.select``).
    """
    best = best_epoch(epochs, *select)
    seconds = sum(r.get("seconds") or 0 for r in epochs)
    images = sum((r.get("images_per_second") or 0) * (r.get("seconds") or 0) for r in epochs)
    return {
        "status": status,
        "best_epoch": best["epoch"] if best else None,
        "epochs_run": max((r["epoch"] for r in epochs), default=0),
        **{k: (best[k] if best else None) for k in ("val_elbo", "val_recon", "val_kl", "val_mse")},
        "objective": best.get(objective) if best else None,
        "train_seconds": seconds,
        "images_per_second": images / seconds if seconds else None,
    }


def trials_row(*, status: str, results: dict[str, Any], values: dict[str, Any], facts: dict[str, Any],
               attempts: int, checkpoint: str | None, started_at: Any, error: str | None = None,
               refit_of: str | None = None) -> dict[str, Any]:
    """The one trials row of a trial (or of a refit): ``study`` and ``trial_id`` are added by
    ``results.write_trial``.

    Args:
        status: completed, pruned, failed or refit.
        results: best epoch, validation metrics, objective and cost (:func:`trial_results`).
        values: the TrainConfig values it trained with; the registered ones become ``param_*``.
        facts: what it reported about itself: :data:`NODE_KEYS`, :data:`TEST_KEYS`, :data:`META_KEYS`.
        attempts: attempts it took (1: none failed).
        checkpoint: its ``model.pt``, relative to the study folder where inside it.
        started_at: when its first attempt started.
        error: why it failed.
        refit_of: for a refit, the trial whose configuration it retrained.
    """
    return {
        "status": status,
        "refit_of": refit_of,
        "error": error,
        **{f"param_{k}": values.get(k) for k in RECORDED},
        "dataset": values.get("dataset"),
        **{k: v for k, v in results.items() if k != "status"},
        **{k: facts.get(k) for k in TEST_KEYS + META_KEYS},
        "attempts": attempts,
        **{k: facts.get(k) for k in NODE_KEYS},
        **provenance(),
        "checkpoint": checkpoint,
        "started_at": started_at,
        "finished_at": now(),
    }


def test_rows(ev: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """From ``vae.evaluate.evaluate_split`` on the test split: the row's test metrics (posterior
    mean, unweighted mean over digits) and the per-digit rows, one per mode and digit."""
    pm = ev["modes"]["posterior_mean"]
    metrics = {"test_elbo": ev["neg_elbo"], "test_mse": pm["mean_mse"], "test_psnr": pm["mean_psnr"]}
    digits = [{"split": "test", "recon_mode": mode, **r} for mode, entry in ev["modes"].items()
              for r in entry["per_digit"]]
    return metrics, digits


def node_facts(tc: Any, device: Any) -> dict[str, Any]:
    """Where a trial (or a refit) trains: asked in its worker."""
    import socket

    import ray
    import torch

    from vae.train import effective_precision

    name = str(device) + (f":{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    return {"node": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(), "device": name,
            "precision": effective_precision(tc, device), "torch_version": str(torch.__version__)}


@functools.cache
def provenance() -> dict[str, str | None]:
    """The driver's Ray and Optuna versions and this code's git commit."""
    import optuna
    import ray

    return {"ray_version": ray.__version__, "optuna_version": optuna.__version__, "git_sha": git_sha()}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> datetime:
    return datetime.now(timezone.utc)
