"""Gather what the checkpoint figures need: the winner's model, through the ``vae`` package, to
typed containers (the "compute" half of optuna's compute/draw split). Nothing here draws or
writes files; ``figures`` draws these containers and ``report`` writes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from analysis import metrics as M

PANEL_MODES = ("posterior_mean", "posterior_sample", "decoder_only")


class Settings(NamedTuple):
    """How much of the test split each computation uses, and its seeds."""

    tsne_points: int = 10000
    gap_images: int = 1000
    decoder_steps: int = 150
    k: int = 10
    seed: int = 0
    device: str = "cpu"


class TsneData(NamedTuple):
    embedding: np.ndarray  # (N, 2)
    labels: np.ndarray  # (N,)
    seed: int
    seconds: float


class PanelData(NamedTuple):
    digits: np.ndarray  # (10,) the digit of each column
    index: np.ndarray  # (10,) test-set positions of the images shown
    original: np.ndarray  # (10, 28, 28)
    recon: dict[str, np.ndarray]  # mode -> (10, 28, 28) pixel probabilities
    mse: dict[str, np.ndarray]  # mode -> (10,) per-image MSE
    k: int  # representatives per digit the panel image was chosen from


class GapData(NamedTuple):
    per_digit: pd.DataFrame  # recon_mode, digit, n_images, mse, psnr (vae.evaluate.per_digit rows)
    steps: int  # Adam steps of decoder_only
    n_images: int


class TraversalData(NamedTuple):
    images: np.ndarray  # (rows, cols, 28, 28)
    plan: M.Traversal
    kl_all: np.ndarray  # (d,) average KL per latent dimension


class WinnerData(NamedTuple):
    tsne: TsneData
    panel: PanelData
    gap: GapData
    traversals: TraversalData
    prior: np.ndarray  # (64, 28, 28) decode(z), z ~ N(0, I)


def winner_data(checkpoint_path: str | os.PathLike, s: Settings, say: Any = lambda line: None) -> WinnerData:
    """Everything the checkpoint figures need, from one checkpoint and its test split."""
    import torch

    from vae import checkpoint
    from vae.data import load, stratified_subset
    from vae.evaluate import (decode_probs, encode, mse_per_image, optimise_latents, per_digit, reconstruct,
                              representative_indices)
    from vae.train import resolve_device

    device = resolve_device(s.device)
    model, config, _ = checkpoint.load(Path(checkpoint_path), device)
    test = load(config).test
    x = test.pixels(device)  # (N, 1, 28, 28)
    labels = test.labels.numpy()

    t = time.perf_counter()
    mu, logvar = encode(model, x)
    mu_np, logvar_np = mu.float().cpu().numpy(), logvar.float().cpu().numpy()
    sel = np.arange(len(labels)) if len(labels) <= s.tsne_points else stratified_subset(labels, s.tsne_points, s.seed)
    tsne_data = TsneData(tsne(mu_np[sel], s.seed), labels[sel], s.seed, 0.0)
    tsne_data = tsne_data._replace(seconds=time.perf_counter() - t)
    say(f"  t-SNE of {len(sel)} latent means      {tsne_data.seconds:6.1f} s")

    reps = representative_indices(test, k=s.k)
    digits = sorted(reps)
    pos = np.array([reps[d][len(reps[d]) // 2] for d in digits])
    xp = x[torch.as_tensor(pos, device=device)]
    recon, mse = {}, {}
    for mode in PANEL_MODES:
        r = reconstruct(model, xp, mode, seed=s.seed, decoder_steps=s.decoder_steps)
        recon[mode] = r[:, 0].float().cpu().numpy()
        mse[mode] = mse_per_image(r, xp).cpu().numpy()
    panel = PanelData(np.array(digits), test.index.numpy()[pos], xp[:, 0].cpu().numpy(), recon, mse, s.k)

    t = time.perf_counter()
    gsel = np.arange(len(labels)) if len(labels) <= s.gap_images else stratified_subset(labels, s.gap_images, s.seed)
    gidx = torch.as_tensor(gsel, device=device)
    xg = x[gidx]
    by_mode = {"posterior_mean": mse_per_image(decode_probs(model, mu[gidx]), xg).cpu().numpy(),
               "decoder_only": mse_per_image(decode_probs(model, optimise_latents(model, xg, steps=s.decoder_steps,
                                                                                   seed=s.seed)), xg).cpu().numpy()}
    rows = [{"recon_mode": mode, **row} for mode, m in by_mode.items() for row in per_digit(m, labels[gsel])]
    gap = GapData(pd.DataFrame(rows), s.decoder_steps, len(gsel))
    say(f"  decoder-only on {len(gsel)} images        {time.perf_counter() - t:6.1f} s")

    plan = M.traversal_plan(mu_np, logvar_np)
    base = torch.as_tensor(mu_np.mean(0), device=device)
    codes = base.repeat(len(plan.order), len(plan.offsets), 1)  # (rows, cols, d)
    for r, dim in enumerate(plan.order):
        codes[r, :, dim] = base[dim] + torch.as_tensor(plan.offsets, device=device, dtype=codes.dtype)
    imgs = decode_probs(model, codes.reshape(-1, model.latent_dim))
    trav = TraversalData(imgs[:, 0].reshape(len(plan.order), len(plan.offsets), 28, 28).cpu().numpy(), plan,
                         M.kl_per_dimension(mu_np, logvar_np))

    gen = torch.Generator(device=device).manual_seed(s.seed)
    z = torch.randn((64, model.latent_dim), generator=gen, device=device)
    prior = decode_probs(model, z)[:, 0].cpu().numpy()
    return WinnerData(tsne_data, panel, gap, trav, prior)


def tsne(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE, PCA-initialised and seeded: openTSNE (faster here), else scikit-learn."""
    if len(points) < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {len(points)}")
    perplexity = float(min(30, (len(points) - 1) / 3))
    try:
        from openTSNE import TSNE

        return np.asarray(TSNE(n_components=2, perplexity=perplexity, initialization="pca", random_state=seed,
                               n_jobs=os.cpu_count() or 1, verbose=False).fit(points.astype(np.float64)))
    except ImportError:
        from sklearn.manifold import TSNE as SkTSNE

        return SkTSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


# --------------------------------------------------------------------------- the cache's format

def to_arrays(data: WinnerData) -> dict[str, np.ndarray]:
    """Flatten the containers to named arrays (``np.savez``); ``from_arrays`` rebuilds them."""
    out: dict[str, np.ndarray] = {}

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            for name in value._fields:
                put(f"{prefix}.{name}", getattr(value, name))
        elif isinstance(value, dict):
            for k, v in value.items():
                put(f"{prefix}.{k}", v)
        elif isinstance(value, pd.DataFrame):
            for col in value.columns:  # text as fixed-width strings: the cache is read without pickle
                v = value[col]
                text = v.dtype == object or pd.api.types.is_string_dtype(v)
                put(f"{prefix}.{col}", v.to_numpy(dtype=str) if text else v.to_numpy())
        else:
            out[prefix] = np.asarray(value)

    put("w", data)
    return out


def from_arrays(a: dict[str, np.ndarray]) -> WinnerData:
    def sub(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) + 1:]: v for k, v in a.items() if k.startswith(prefix + ".")}

    def scalar(key: str) -> Any:
        return a[key].item()

    per_digit = pd.DataFrame({k: v for k, v in sub("w.gap.per_digit").items()})
    plan = M.Traversal(*(a[f"w.traversals.plan.{f}"] for f in M.Traversal._fields))
    return WinnerData(
        TsneData(a["w.tsne.embedding"], a["w.tsne.labels"], scalar("w.tsne.seed"), scalar("w.tsne.seconds")),
        PanelData(a["w.panel.digits"], a["w.panel.index"], a["w.panel.original"], sub("w.panel.recon"),
                  sub("w.panel.mse"), scalar("w.panel.k")),
        GapData(per_digit, scalar("w.gap.steps"), scalar("w.gap.n_images")),
        TraversalData(a["w.traversals.images"], plan, a["w.traversals.kl_all"]),
        a["w.prior"],
    )
