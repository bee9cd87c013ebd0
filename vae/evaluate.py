"""Per-digit metrics, the three reconstruction modes, and latent optimisation.

Definitions (the README's Definitions section): MSE per image is the mean over its 784 pixels; a digit's MSE is the
mean over *all* images of that digit; PSNR = 10 log10(1 / MSE) with data range 1.

Reconstruction modes:
  * ``posterior_mean``: decode(mu(x)), the "full VAE" reconstruction;
  * ``posterior_sample``: decode(z), z ~ q(z|x), seeded;
  * ``decoder_only``: no encoder. z* = argmin_z BCE(decode(z), x) + 1/2 |z|^2 by Adam through
    the frozen decoder (batched, seeded), then decode(z*). Its gap to ``posterior_mean`` is the
    amortisation gap.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vae.data import Split
from vae.loss import bce_per_image, kl_terms
from vae.model import BetaVAE

MODES = ("posterior_mean", "posterior_sample", "decoder_only")
DECODER_STEPS = 150
DECODER_LR = 0.05
EVAL_BATCH = 2048
DIGITS = tuple(range(10))


def psnr(mse: float | np.ndarray) -> np.floating | np.ndarray:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]: 10 log10(1 / MSE)."""
    return 10.0 * np.log10(1.0 / np.asarray(mse, dtype=np.float64))


def mse_per_image(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, ...) reconstructions and targets in [0, 1] -> (N,) mean squared error per image."""
    return (recon.float() - x.float()).pow(2).flatten(1).mean(1)


def per_digit(mse: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    """Per-digit rows {digit, n_images, mse, psnr} from per-image MSE; digits absent are skipped."""
    rows = []
    for d in DIGITS:
        sel = labels == d
        n = int(sel.sum())
        if n == 0:
            continue
        m = float(mse[sel].mean())
        rows.append({"digit": d, "n_images": n, "mse": m, "psnr": float(psnr(m))})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Unweighted means over the per-digit rows, as the reference project reported them."""
    return {
        "mean_mse": float(np.mean([r["mse"] for r in rows])),
        "mean_psnr": float(np.mean([r["psnr"] for r in rows])),
        "per_digit": rows,
    }


@torch.no_grad()
def encode(model: BetaVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mu, logvar) for a whole split, in batches."""
    model.eval()
    parts = [model.encode(x[i : i + EVAL_BATCH]) for i in range(0, x.shape[0], EVAL_BATCH)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def decode_probs(model: BetaVAE, z: torch.Tensor) -> torch.Tensor:
    """Pixel probabilities (N, 1, 28, 28) for latent codes z (N, d)."""
    model.eval()
    return torch.cat([torch.sigmoid(model.decode(z[i : i + EVAL_BATCH])) for i in range(0, z.shape[0], EVAL_BATCH)])


def optimise_latents(
    model: BetaVAE,
    x: torch.Tensor,
    *,
    steps: int = DECODER_STEPS,
    lr: float = DECODER_LR,
    seed: int = 0,
    batch_size: int = EVAL_BATCH,
    z0: torch.Tensor | None = None,
) -> torch.Tensor:
    """z* = argmin_z BCE(decode(z), x) + 1/2 |z|^2 per image, by Adam through the frozen decoder.

    Starts from a seeded draw from the prior (or ``z0``); the objective is the negative log
    joint, so z* is the MAP code. Returns (N, d).
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if z0 is None:
        z0 = torch.randn((x.shape[0], model.latent_dim), generator=gen, device=x.device)
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            z = z0[i : i + batch_size].clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                logits = model.decode(z)
                bce = bce_per_image(logits, xb)
                # Sum over images: each z only affects its own term, so this is per-image descent.
                loss = (bce + 0.5 * z.pow(2).sum(1)).sum()
                loss.backward()
                opt.step()
            out.append(z.detach())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return torch.cat(out)


def reconstruct(
    model: BetaVAE,
    x: torch.Tensor,
    mode: str,
    *,
    seed: int = 0,
    decoder_steps: int = DECODER_STEPS,
) -> torch.Tensor:
    """Reconstructions (pixel probabilities) of x (N, 1, 28, 28) in one of ``MODES``."""
    if mode == "posterior_mean":
        mu, _ = encode(model, x)
        return decode_probs(model, mu)
    if mode == "posterior_sample":
        mu, logvar = encode(model, x)
        gen = torch.Generator(device=x.device).manual_seed(seed)
        return decode_probs(model, model.reparameterize(mu, logvar, gen))
    if mode == "decoder_only":
        return decode_probs(model, optimise_latents(model, x, steps=decoder_steps, seed=seed))
    raise ValueError(f"unknown reconstruction mode {mode!r}: choose from {', '.join(MODES)}")


def evaluate_split(
    model: BetaVAE,
    split: Split,
    *,
    modes: tuple[str, ...] = MODES,
    seed: int = 0,
    decoder_steps: int = DECODER_STEPS,
    device: torch.device | str = "cpu",
    split_name: str = "test",
) -> dict[str, Any]:
    """Per-digit MSE/PSNR for each mode over all images of ``split``, plus -ELBO.

    Returns:
        ``{"split", "n_images", "neg_elbo", "recon", "kl", "modes": {mode: {"mean_mse",
        "mean_psnr", "per_digit": [{"digit", "n_images", "mse", "psnr"}, ...]}}}``; the
        ``decoder_only`` entry also records ``steps``.
    """
    model = model.to(device).eval()
    x = split.pixels(device)
    labels = split.labels.numpy()
    # One encoder pass serves every mode; the posterior sample's decode also gives -ELBO.
    mu, logvar = encode(model, x)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    z = model.reparameterize(mu, logvar, gen)
    recon_sum = 0.0
    sample_probs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], EVAL_BATCH):
            logits = model.decode(z[i : i + EVAL_BATCH]).float()
            recon_sum += float(bce_per_image(logits, x[i : i + EVAL_BATCH]).sum())
            sample_probs.append(torch.sigmoid(logits))
    kl = float(kl_terms(mu, logvar).sum()) / len(split)
    recon = recon_sum / len(split)
    out: dict[str, Any] = {"split": split_name, "n_images": len(split), "neg_elbo": recon + kl, "recon": recon, "kl": kl}
    out["modes"] = {}
    for mode in modes:
        if mode == "posterior_mean":
            probs = decode_probs(model, mu)
        elif mode == "posterior_sample":
            probs = torch.cat(sample_probs)
        else:
            probs = reconstruct(model, x, mode, seed=seed, decoder_steps=decoder_steps)
        entry = summarise(per_digit(mse_per_image(probs, x).cpu().numpy(), labels))
        if mode == "decoder_only":
            entry["steps"] = decoder_steps
            entry["lr"] = DECODER_LR
        out["modes"][mode] = entry
    return out


def representative_indices(split: Split, k: int = 10) -> dict[int, list[int]]:
    """k images per digit, chosen deterministically and independently of any model.

    Images are ranked by their distance to their digit's mean image, and k ranks are taken
    evenly from the most typical to the least, so a panel shows easy and hard cases alike.
    Returns positions within ``split`` (``split.index`` maps them to the source file).
    """
    x = split.images.reshape(len(split), -1).float().numpy()
    labels = split.labels.numpy()
    chosen: dict[int, list[int]] = {}
    for d in DIGITS:
        pos = np.flatnonzero(labels == d)
        if len(pos) == 0:
            continue
        dist = np.linalg.norm(x[pos] - x[pos].mean(0), axis=1)
        order = pos[np.lexsort((pos, dist))]  # ties broken by position: fully deterministic
        ranks = np.unique(np.linspace(0, len(order) - 1, num=min(k, len(order))).round().astype(int))
        chosen[d] = [int(i) for i in order[ranks]]
    return chosen


def evaluate_checkpoint(
    path: str,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    modes: tuple[str, ...] | None = None,
    decoder_steps: int | None = None,
    device: str = "auto",
    download: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Load a checkpoint and evaluate it on a split of a dataset (its own by default)."""
    from vae import checkpoint
    from vae.config import ConfigError
    from vae.data import load
    from vae.train import resolve_device

    modes = modes or MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown mode {bad[0]!r}: choose from {', '.join(MODES)}")
    steps = DECODER_STEPS if decoder_steps is None else decoder_steps
    if not 1 <= steps <= 100000:
        raise ConfigError(f"decoder_steps={steps} is out of range: it must be between 1 and 100000")
    dev = resolve_device(device if device in ("auto", "cpu", "cuda") else _bad_device(device))
    model, config, _ = checkpoint.load(path, dev)
    # Evaluation always covers the whole split, whatever subset the model was trained on.
    changes: dict[str, Any] = {"download": download, "device": device, "max_train_images": None}
    if dataset is not None:
        changes["dataset"] = dataset
        changes["data_dir"] = data_dir
    elif data_dir is not None:
        changes["data_dir"] = data_dir
    config = config.replace(**changes)
    data = load(config)
    out = evaluate_split(model, data.split(split), modes=tuple(modes), seed=seed,
                         decoder_steps=steps, device=dev, split_name=split)
    return {"checkpoint": str(path), "dataset": config.dataset, **out}


def _bad_device(name: str) -> str:
    from vae.config import ConfigError

    raise ConfigError(f"device={name!r} is not allowed: choose one of auto, cpu, cuda")
