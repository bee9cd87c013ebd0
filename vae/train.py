"""The trainer: ``fit(config, data, on_epoch=...) -> FitResult``.

The whole training split sits on the device as one float tensor, converted once; each epoch
permutes it once and walks contiguous batches, so there is no per-item DataLoader work.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vae.config import ConfigError, TrainConfig
from vae.data import Data
from vae.loss import beta_vae_loss, per_image_terms
from vae.model import BetaVAE

# Validation draws its z with this seed every epoch, so epochs and trials compare on the same noise.
VAL_SEED = 1234
EVAL_BATCH = 2048
# How often (steps) the running loss is checked for NaN/inf; checking every step forces a sync.
FINITE_CHECK_EVERY = 25


# The validation metrics an epoch can be chosen by (lower is better for each).
SELECTABLE = ("val_elbo", "val_recon", "val_kl", "val_mse")


def score(metrics: dict[str, Any], select: str = "val_elbo", mode: str = "min") -> float | None:
    """An epoch's selection score, lower is better: its ``select`` metric, negated for ``mode='max'``."""
    value = metrics.get(select)
    if value is None:
        return None
    return float(value) if mode == "min" else -float(value)


def improves(score: float | None, best_score: float) -> bool:
    """The one definition of a better epoch: a finite score strictly below the best so far (a tie
    keeps the earlier epoch). ``fit`` keeps those weights; a study's trials row reports the
    metrics of that epoch (``best_epoch``). The score is the validation -ELBO unless a study
    selects by its objective (:func:`score`)."""
    return score is not None and math.isfinite(score) and score < best_score


def best_epoch(history: list[dict[str, Any]], select: str = "val_elbo", mode: str = "min") -> dict[str, Any] | None:
    """The best epoch's row of an epoch history (rows with ``epoch`` and ``select``), or None."""
    best, best_score = None, math.inf
    for row in sorted(history, key=lambda r: r["epoch"]):
        s = score(row, select, mode)
        if improves(s, best_score):
            best, best_score = row, s
    return best


def check_select(select: str, mode: str = "min") -> None:
    if select not in SELECTABLE:
        raise ValueError(f"select={select!r}: choose one of {', '.join(SELECTABLE)}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: choose min or max")


def lr_at(schedule: str, lr: float, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total_steps``.

    ``constant``: ``lr``. ``cosine``: ``lr * (1 + cos(pi * step / total)) / 2``, from ``lr`` to 0.
    ``onecycle``: linear warm-up from ``lr / 25`` to ``lr`` over the first 30% of the steps, then
    the same cosine down to 0 (Smith & Topin 2017, as torch's OneCycleLR with its defaults).
    """
    if schedule == "constant" or total_steps <= 1:
        return lr
    t = min(max(step, 0), total_steps) / total_steps
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "onecycle":
        warm = ONECYCLE_WARMUP
        if t < warm:
            return lr / 25.0 + (lr - lr / 25.0) * t / warm
        return lr * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (1.0 - warm)))
    raise ConfigError(f"unknown lr_schedule {schedule!r}")


ONECYCLE_WARMUP = 0.3
# augment -> (max shift in pixels, max rotation in degrees, max relative scale change)
AUGMENT_RANGES = {"shift": (1, 0.0, 0.0), "affine": (2, 10.0, 0.1)}


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A randomly moved copy of a batch (B, 1, 28, 28) for training; ``none`` returns ``x``.

    Shifts are whole pixels (exact: bilinear sampling at integer offsets), rotation and scale
    are continuous; what moves in from outside the frame is background (0). Draws from ``gen``,
    so a run's augmentations depend only on its seed and epoch.
    """
    if kind == "none":
        return x
    return augment_apply(x, kind, *augment_draws(x.shape[0], kind, gen, x.device))


def augment_draws(b: int, kind: str, gen: torch.Generator, device: torch.device | str,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of ``augment_batch`` for a batch of ``b`` (``kind`` not ``none``), drawn
    from ``gen`` in this order: whole-pixel shifts (B, 2) and uniforms in [0, 1) (B, 2).
    ``out``: contiguous (B, 2) int64 and float32 tensors to draw into, in place (a pack's
    buffers); without it, new ones (``torch.randint`` and ``torch.rand`` draw exactly so)."""
    max_shift = AUGMENT_RANGES[kind][0]
    if out is None:
        out = (torch.empty((b, 2), dtype=torch.int64, device=device), torch.empty((b, 2), device=device))
    out[0].random_(-max_shift, max_shift + 1, generator=gen)
    out[1].uniform_(generator=gen)
    return out


def augment_apply(x: torch.Tensor, kind: str, shift: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The deterministic part of ``augment_batch``: each image moved by its own draws. Every
    operation is per image, so images of several batches (a pack's members) moved at once come
    out exactly as each batch alone."""
    shift, u = shift.to(x.dtype), u.to(x.dtype) * 2 - 1  # u: (B, 2) in [-1, 1)
    _, max_deg, max_scale = AUGMENT_RANGES[kind]
    angle = u[:, 0] * math.radians(max_deg)
    scale = 1.0 + u[:, 1] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output coordinates to input ones, in [-1, 1] units: a pixel is 2/28.
    theta = torch.stack([
        torch.stack([cos, -sin, -shift[:, 0] * 2 / x.shape[-1]], dim=1),
        torch.stack([sin, cos, -shift[:, 1] * 2 / x.shape[-2]], dim=1),
    ], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class EpochState:
    """What ``on_epoch`` sees after each epoch: enough to checkpoint and resume."""

    epoch: int
    model: BetaVAE
    optimizer: torch.optim.Optimizer
    is_best: bool
    best_epoch: int | None
    best_score: float  # the best epoch's selection score (``score``: its validation -ELBO by default)
    best_state: dict[str, torch.Tensor] | None  # weights of the best epoch (None: before any, this run)


OnEpoch = Callable[[dict[str, Any], EpochState], Any]


@dataclass
class FitResult:
    """What ``fit`` returns. ``model`` holds the best epoch's weights."""

    model: BetaVAE
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    status: str = "completed"  # completed | failed
    error: str | None = None
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"

    @property
    def best(self) -> dict[str, Any] | None:
        return next((h for h in self.history if h["epoch"] == self.best_epoch), None)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first visible CUDA device (Ray sets CUDA_VISIBLE_DEVICES per trial) or CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if name == "cuda":
        raise ConfigError("device='cuda' but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device("cpu")


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and config.precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def effective_precision(config: TrainConfig, device: torch.device) -> str:
    """What the run really used: tf32/bf16 apply on a GPU only."""
    return config.precision if device.type == "cuda" else "fp32"


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    try:
        # One fused kernel for the whole update: fewer passes over the parameters.
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch or unsupported device
        return torch.optim.Adam(model.parameters(), lr=lr)


def fit(
    config: TrainConfig,
    data: Data,
    on_epoch: OnEpoch | None = None,
    *,
    model: BetaVAE | None = None,
    optimizer_state: dict[str, Any] | None = None,
    start_epoch: int = 1,
    best_score: float = math.inf,
    best_epoch: int | None = None,
    keep: str = "best",
    select: str = "val_elbo",
    mode: str = "min",
) -> FitResult:
    """Train a beta-VAE on ``data.train``, validating on ``data.val`` after every epoch.

    Args:
        config: the run's configuration.
        data: the loaded splits (``vae.data.load(config)``).
        on_epoch: called after each epoch as ``on_epoch(metrics, state)`` (an ``EpochState``);
            ``state.model`` then holds the current epoch's weights. Returning ``False`` stops.
        model, optimizer_state, start_epoch, best_score, best_epoch: resume a run from a
            checkpoint taken after epoch ``start_epoch - 1`` (``best_score``: ``state.best_score``).
        keep: ``best`` returns the weights of the best validation epoch; ``last`` those of the
            last epoch (a refit on train+validation, where validation cannot choose).
        select, mode: the validation metric that chooses the best epoch, and whether lower
            (``min``) or higher is better: by default the lowest validation -ELBO. A study selects
            by its objective, so that a trial reports its objective at that objective's best epoch.

    Returns:
        FitResult with the history, the best epoch and its weights.
        A NaN or infinite loss ends training with ``status='failed'`` and a reason; it does not raise.
    """
    if keep not in ("best", "last"):
        raise ValueError(f"keep={keep!r}: choose best or last")
    check_select(select, mode)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        allow = config.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
    if model is None:
        model = BetaVAE.from_config(config)
    model = model.to(device)
    opt = make_optimizer(model, config.lr)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    gen = torch.Generator(device=device)
    x_train = data.train.pixels(device)  # (N, 1, 28, 28), once per run
    x_val = data.val.pixels(device)
    n = x_train.shape[0]
    bs = min(config.batch_size, n)
    n_steps = (n + bs - 1) // bs
    total_steps = n_steps * config.epochs
    result = FitResult(model=model, config=config, device=str(device), best_epoch=best_epoch)
    best, best_state = best_score, None
    train_seconds = 0.0

    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        # Each epoch's batches and noise depend only on (seed, epoch): a run resumed from a
        # checkpoint after epoch k trains epochs k+1.. exactly as an uninterrupted run would.
        gen.manual_seed(config.seed + 1_000_003 * epoch)
        perm = torch.randperm(n, generator=gen, device=device)
        xs = x_train[perm]  # one gather per epoch; batches below are contiguous views
        sums = torch.zeros(3, device=device)
        failed_at: int | None = None
        for step in range(n_steps):
            if config.lr_schedule != "constant":
                step_lr = lr_at(config.lr_schedule, config.lr, (epoch - 1) * n_steps + step, total_steps)
                for group in opt.param_groups:
                    group["lr"] = step_lr
            xb = augment_batch(xs[step * bs : (step + 1) * bs], config.augment, gen)
            with _autocast(config, device):
                logits, mu, logvar = model(xb, gen)
                total, recon, kl = beta_vae_loss(logits.float(), xb, mu.float(), logvar.float(), config.beta)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sums += torch.stack([total.detach(), recon.detach(), kl.detach()]) * xb.shape[0]
            if (step + 1) % FINITE_CHECK_EVERY == 0 or step == n_steps - 1:
                if not bool(torch.isfinite(sums).all()):
                    failed_at = step + 1
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        if failed_at is not None:
            result.status = "failed"
            result.error = (
                f"non-finite loss at epoch {epoch}, step {failed_at} "
                f"(lr={config.lr:g}, beta={config.beta:g}); try a lower lr"
            )
            break
        train = (sums / n).tolist()
        v0 = time.perf_counter()
        val = evaluate_loss(model, x_val, config.beta)
        val_seconds = time.perf_counter() - v0
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train[0],
            "train_recon": train[1],
            "train_kl": train[2],
            **{f"val_{k}": v for k, v in val.items()},
            "seconds": seconds,
            "val_seconds": val_seconds,
            "images_per_second": n / seconds if seconds > 0 else float("nan"),
        }
        if not math.isfinite(metrics["val_elbo"]):
            result.history.append(metrics)
            result.status = "failed"
            result.error = f"non-finite validation -ELBO at epoch {epoch} (lr={config.lr:g}); try a lower lr"
            break
        this = score(metrics, select, mode)
        is_best = improves(this, best)
        if is_best:
            best = this
            best_state = copy.deepcopy(model.state_dict()) if keep == "best" else None
            result.best_epoch = epoch
        result.history.append(metrics)
        state = EpochState(epoch, model, opt, is_best, result.best_epoch, best, best_state)
        if on_epoch is not None and on_epoch(metrics, state) is False:
            break

    if keep == "last":
        result.best_epoch = result.history[-1]["epoch"] if result.status == "completed" and result.history else None
    elif best_state is not None:
        model.load_state_dict(best_state)
    result.train_seconds = train_seconds
    epochs_done = len(result.history)
    result.images_per_second = n * epochs_done / train_seconds if train_seconds > 0 else 0.0
    return result


@torch.no_grad()
def evaluate_loss(model: BetaVAE, x: torch.Tensor, beta: float, seed: int = VAL_SEED) -> dict[str, float]:
    """Loss terms over a whole split, per image: elbo (-ELBO, i.e. beta = 1), recon, kl,
    loss (the beta-weighted objective, not comparable across trials) and mse (posterior mean)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    recon_sum = kl_sum = mse_sum = 0.0
    for i in range(0, x.shape[0], EVAL_BATCH):
        xb = x[i : i + EVAL_BATCH]
        mu, logvar = model.encode(xb)
        z = model.reparameterize(mu, logvar, gen)
        recon, kl = per_image_terms(model.decode(z).float(), xb, mu.float(), logvar.float())
        recon_sum += float(recon.sum())
        kl_sum += float(kl.sum())
        mean_img = torch.sigmoid(model.decode(mu).float())
        mse_sum += float((mean_img - xb).pow(2).mean(dim=(1, 2, 3)).sum())
    model.train(was_training)
    n = x.shape[0]
    recon, kl = recon_sum / n, kl_sum / n
    return {"loss": recon + beta * kl, "elbo": recon + kl, "recon": recon, "kl": kl, "mse": mse_sum / n}


def train_and_save(
    config: TrainConfig, out: str | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Load the data, fit, and (with ``out``) write ``model.pt`` and ``metrics.json`` there.

    Returns a JSON-ready summary: status, best-epoch validation metrics, images_per_second
    (training images per wall second of the training loop, batching included), checkpoint.
    """
    import json
    import os
    from pathlib import Path

    from vae import checkpoint
    from vae.data import load

    data = load(config)

    def report(m: dict[str, Any], state: EpochState) -> None:
        if log is not None:
            log(
                f"epoch {m['epoch']:>3}/{config.epochs}  train loss {m['train_loss']:8.2f}  "
                f"val -ELBO {m['val_elbo']:8.2f}  val MSE {m['val_mse']:.5f}  "
                f"{m['images_per_second']:8.0f} img/s{'  *' if state.is_best else ''}"
            )

    result = fit(config, data, on_epoch=report)
    best = result.best or {}
    summary: dict[str, Any] = {
        "status": result.status,
        "error": result.error,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        **{k: best.get(k) for k in ("val_elbo", "val_recon", "val_kl", "val_mse", "val_loss")},
        "train_seconds": result.train_seconds,
        "images_per_second": result.images_per_second,
        "device": result.device,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "config": config.to_dict(),
        "checkpoint": None,
    }
    if out is not None and result.best_epoch is not None:
        folder = Path(out)
        path = checkpoint.save(folder / "model.pt", result.model, config, epoch=result.best_epoch)
        summary["checkpoint"] = str(path)
        tmp = folder / f".metrics.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({**summary, "history": result.history}, indent=2))
        os.replace(tmp, folder / "metrics.json")
    return summary
