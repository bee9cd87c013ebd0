"""Figures: ``plot_*(data, ax=None) -> Axes | Figure``. They draw; they never write files."""
from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from analysis.metrics import Traversal, pareto_front

DIGIT_COLORS = matplotlib.colormaps["tab10"]


def _figure(size: tuple[float, float]) -> Figure:
    """A Figure of its own, outside pyplot: drawing a report never touches the caller's backend
    or pyplot's figure list (a notebook keeps its own), and nothing needs closing."""
    return Figure(figsize=size, layout="constrained")


def _ax(ax: Axes | None, size: tuple[float, float] = (6.4, 4.2)) -> Axes:
    if ax is None:
        ax = _figure(size).subplots()
    return ax


def plot_digit_metric_vs_latent(matrix: pd.DataFrame, *, metric: str = "MSE", ax: Axes | None = None,
                                recon_mode: str = "posterior_mean") -> Axes:
    """One line per digit: the metric of each latent size's best trial (reference figures 1 and 2)."""
    ax = _ax(ax)
    xs = np.asarray(matrix.columns, dtype=float)
    for d in matrix.index:
        ax.plot(xs, matrix.loc[d].to_numpy(), marker="o", ms=4, lw=1.5, color=DIGIT_COLORS(int(d)), label=str(d))
    mean = matrix.mean(axis=0)
    ax.plot(xs, mean.to_numpy(), color="black", lw=2.5, ls="--", label="mean")
    ax.set_xlabel("latent size d (best trial per d)")
    ax.set_ylabel(f"test {metric} ({recon_mode})" + (" [dB]" if metric == "PSNR" else ""))
    if metric == "MSE":
        ax.set_yscale("log")
    if len(xs) <= 8:
        ax.set_xticks(xs)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(title="digit", ncols=2, fontsize=8, title_fontsize=8, loc="best")
    ax.set_title(f"Per-digit {metric} against latent size")
    return ax


def plot_loss_curves(epochs: pd.DataFrame, winner_id: str, *, fig: Figure | None = None) -> Figure:
    """Train and validation -ELBO, recon and KL of the winner; every other trial's validation
    -ELBO faintly behind, so early-stopped trials show as short curves (reference figure 3)."""
    fig = fig or _figure((12, 3.8))
    axes = fig.subplots(1, 3)
    w = epochs[epochs["trial_id"] == winner_id].sort_values("epoch")
    others = epochs[epochs["trial_id"] != winner_id]
    train_elbo = w["train_recon"] + w["train_kl"]
    panels = [("-ELBO (nats/image)", train_elbo, w["val_elbo"], "val_elbo"),
              ("reconstruction (nats/image)", w["train_recon"], w["val_recon"], "val_recon"),
              ("KL (nats/image)", w["train_kl"], w["val_kl"], "val_kl")]
    others = others.sort_values(["trial_id", "epoch"])
    cuts = np.flatnonzero(others["trial_id"].to_numpy()[1:] != others["trial_id"].to_numpy()[:-1]) + 1
    x = np.split(others["epoch"].to_numpy(float), cuts) if len(others) else []
    for ax, (title, tr, va, col) in zip(axes, panels):
        if len(others):  # one artist for every other trial: a line each took 17 s at 10,000 trials
            ys = np.split(others[col].to_numpy(float), cuts)
            ax.add_collection(LineCollection([np.column_stack(xy) for xy in zip(x, ys)], colors="0.6", alpha=0.35,
                                             linewidths=0.8))
            ax.autoscale_view()
        ax.plot(w["epoch"], tr, marker="o", ms=3, label="train (winner)", color="C0")
        ax.plot(w["epoch"], va, marker="s", ms=3, label="validation (winner)", color="C3")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    lo, hi = np.nanpercentile(epochs["val_elbo"], [0, 90]) if len(epochs) else (0.0, 1.0)
    if hi > lo:  # clip the far tail of diverged trials so the winner's curve stays readable
        axes[0].set_ylim(lo - 0.05 * (hi - lo), hi)
    axes[0].plot([], [], color="0.6", alpha=0.6, label="other trials (validation)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Loss curves of the winner {winner_id}; train -ELBO is recon + KL at beta = 1")
    return fig


def plot_tsne(embedding: np.ndarray, labels: np.ndarray, *, ax: Axes | None = None, title: str = "") -> Axes:
    """t-SNE of latent means, coloured by digit (reference figure 4)."""
    ax = _ax(ax, (6.4, 6.0))
    for d in range(10):
        sel = labels == d
        ax.scatter(embedding[sel, 0], embedding[sel, 1], s=3 if len(labels) > 3000 else 8,
                   color=DIGIT_COLORS(d), label=str(d), alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(title="digit", markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title or f"t-SNE of latent means ({len(labels)} test images)")
    return ax


def plot_recon_panel(originals: np.ndarray, rows: dict[str, tuple[np.ndarray, np.ndarray]],
                     digits: list[int], *, fig: Figure | None = None) -> Figure:
    """Columns: one image per digit. Rows: original, then each reconstruction with its MSE.

    ``rows`` maps a row title to (images (N, 28, 28), per-image MSE (N,)).
    """
    n_rows, n_cols = 1 + len(rows), len(digits)
    fig = fig or _figure((1.25 * n_cols + 1.2, 1.45 * n_rows))
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    titles = ["original", *rows]
    images = [originals, *[v[0] for v in rows.values()]]
    errors = [None, *[v[1] for v in rows.values()]]
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(images[r][c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if errors[r] is not None:
                ax.set_xlabel(f"{errors[r][c]:.4f}", fontsize=7, labelpad=1)
            if r == 0:
                ax.set_title(str(digits[c]), fontsize=9)
            if c == 0:
                ax.set_ylabel(titles[r].replace("_", " "), fontsize=8)
    fig.suptitle("Reconstructions (number under each: its MSE)", fontsize=10)
    return fig


def plot_amortisation_gap(gap: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Per-digit MSE of the encoder's reconstruction against decoder-only latent optimisation."""
    ax = _ax(ax)
    x = np.arange(len(gap))
    ax.bar(x - 0.2, gap["posterior_mean"], 0.4, label="posterior_mean (encoder)", color="C0")
    ax.bar(x + 0.2, gap["decoder_only"], 0.4, label="decoder_only (optimised z)", color="C2")
    for xi, (pm, pct) in enumerate(zip(gap["posterior_mean"], gap["gap_percent"])):
        ax.annotate(f"{pct:+.0f}%", (xi, pm), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [str(d) for d in gap["digit"]])
    ax.set_xlabel("digit")
    ax.set_ylabel("test MSE")
    ax.legend(fontsize=8)
    ax.set_title("Amortisation gap: what the encoder leaves on the table")
    ax.grid(alpha=0.3, axis="y")
    return ax


def plot_traversals(images: np.ndarray, plan: Traversal, *, fig: Figure | None = None) -> Figure:
    """Rows: latent dimensions by average KL; columns: offsets from the base code."""
    n_rows, n_cols = images.shape[:2]
    fig = fig or _figure((0.95 * n_cols + 1.6, 0.95 * n_rows + 0.6))
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(images[r, c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == n_rows - 1:
                ax.set_xlabel(f"{plan.offsets[c]:+.1f}", fontsize=7)
            if c == 0:
                label = f"z{plan.order[r]}\n{plan.kl[r]:.2f} nats"
                if not plan.active[r]:
                    label += "\ninactive"
                ax.set_ylabel(label, fontsize=7, color="black" if plan.active[r] else "red")
            if not plan.active[r]:
                for s in ax.spines.values():
                    s.set_edgecolor("red")
    fig.suptitle("Latent traversals of the winner (rows ordered by average KL; red: inactive)", fontsize=10)
    return fig


def plot_image_grid(images: np.ndarray, *, ax: Axes | None = None, title: str = "", ncols: int = 8) -> Axes:
    """A tiled grid of images (N, 28, 28) in one axes."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    canvas = np.ones((nrows * 30, ncols * 30))
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        canvas[r * 30 + 1 : r * 30 + 29, c * 30 + 1 : c * 30 + 29] = img
    ax = _ax(ax, (ncols * 0.7, nrows * 0.7 + 0.4))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    return ax


def plot_rate_distortion(trials: pd.DataFrame, *, ax: Axes | None = None, winner_id: str | None = None) -> Axes:
    """Every usable trial's validation KL (rate) against reconstruction (distortion), by beta."""
    from matplotlib.colors import LogNorm

    ax = _ax(ax, (6.6, 4.6))
    x, y, beta = trials["val_kl"].to_numpy(float), trials["val_recon"].to_numpy(float), trials["param_beta"].to_numpy(float)
    sc = ax.scatter(x, y, c=beta, cmap="viridis", norm=LogNorm(vmin=beta.min(), vmax=max(beta.max(), beta.min() * 1.0001)),
                    s=36, edgecolors="k", linewidths=0.4, zorder=3)
    ax.figure.colorbar(sc, ax=ax, label="beta")
    front = pareto_front(x, y)
    ax.plot(x[front], y[front], color="C3", lw=1.5, drawstyle="steps-post", label="Pareto front", zorder=2)
    if winner_id is not None and winner_id in set(trials["trial_id"]):
        w = trials[trials["trial_id"] == winner_id].iloc[0]
        ax.scatter([w["val_kl"]], [w["val_recon"]], marker="*", s=260, color="gold", edgecolors="k", zorder=4,
                   label="winner (lowest -ELBO)")
    ax.set_xlabel("rate: validation KL (nats/image)")
    ax.set_ylabel("distortion: validation recon (nats/image)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Rate-distortion plane of the study")
    return ax


def plot_search_efficiency(curves: dict[str, pd.DataFrame], *, ax: Axes | None = None,
                           target: float | None = None) -> Axes:
    """Best-so-far validation -ELBO against cumulative trial-epochs, one line per method."""
    ax = _ax(ax)
    for i, (name, df) in enumerate(curves.items()):
        ax.step(df["cumulative_epochs"], df["best_so_far"], where="post", label=name, color=f"C{i}", lw=2)
    if target is not None:
        ax.axhline(target, color="0.4", ls="--", lw=1, label="within 1% of the grid's best")
    ax.set_xlabel("cumulative trial-epochs")
    ax.set_ylabel("best validation -ELBO so far")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Search efficiency")
    return ax


def close(obj: Any) -> None:
    """Release a figure. Ours are not in pyplot's list; Optuna's plots are, and are closed there."""
    fig = obj if isinstance(obj, Figure) else getattr(obj, "figure", None)
    if fig is not None and getattr(fig.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
