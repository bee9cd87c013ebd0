"""A table of learning curves over the search space, recorded once and replayed to the searchers.

Comparing searchers at ten seeds each costs hundreds of real studies; most of that is training
the same configurations again. As HPOBench, LCBench and YAHPO do, this records the full learning
curve (every epoch's metrics, as ``vae.train.fit`` hands them to ``on_epoch``) of N configurations
spread over the space by a scrambled Sobol sequence, once; a replayed study then trains nothing:

- ``replay_fit`` keeps ``vae.train.fit``'s contract (``on_epoch(metrics, state)`` after each
  epoch, a real model and optimiser in the state for checkpoints, resume from ``start_epoch``,
  a ``FitResult``), and hands each epoch the recorded metrics of the **nearest recorded
  configuration** (in the space's own scale: d linear, beta and lr on a log scale, each axis
  mapped to [0, 1]); it sleeps ``--pace`` seconds an epoch, so trials that run side by side
  interleave as real ones do.
- ``install()`` puts it in place of ``vae.train.fit``; ``benchmarks/replay_site/sitecustomize.py``
  calls it in every process started with that folder on ``PYTHONPATH`` and
  ``VAE_REPLAY_CURVES`` set, so the study's own code, Ray's workers and the peers' worker
  processes all replay (``bench_peers.py --replay``).

What a replay is not: a trial's outcome depends only on its nearest recorded configuration, at
the table's one training seed (0, as the peers train), so the surface is piecewise constant at the
table's resolution and seed noise between two runs of one configuration is absent. Searchers
are compared on the same surface; ``bench_peers.py --replay`` beside real runs of the same
protocol says how close the standings come.

    python benchmarks/curves.py --n 512 --out benchmarks/results/curves.json     # record (resumable)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EPOCHS = 15
SPACE = {"latent_dim": ("int", 2, 64), "beta": ("log", 0.01, 10.0), "lr": ("log", 1e-4, 3e-3)}
NAMES = sorted(SPACE)  # beta, latent_dim, lr
TABLE_SEED = 20261204  # the Sobol sequence's; no searcher is seeded with it


def to_unit(params: dict[str, Any]) -> list[float]:
    out = []
    for name in NAMES:
        kind, lo, hi = SPACE[name]
        v = float(params[name])
        out.append((math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) if kind == "log"
                   else (v - lo) / (hi - lo))
    return out


def from_unit(u: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, x in zip(NAMES, u):
        kind, lo, hi = SPACE[name]
        if kind == "log":
            out[name] = float(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo))))
        else:
            out[name] = int(min(hi, lo + math.floor(x * (hi - lo + 1))))
    return out


def configurations(n: int) -> list[dict[str, Any]]:
    from torch.quasirandom import SobolEngine

    return [from_unit(u) for u in SobolEngine(len(NAMES), scramble=True, seed=TABLE_SEED).draw(n).double().tolist()]


def _train(params: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vae.config import TrainConfig
    from vae.data import load
    from vae.train import fit

    torch.set_num_threads(1)
    tc = TrainConfig(dataset="mnist-sample", latent_dim=int(params["latent_dim"]), beta=float(params["beta"]),
                     lr=float(params["lr"]), epochs=EPOCHS, seed=0)
    epochs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    fit(tc, load(tc), on_epoch=lambda m, s: epochs.append({k: v for k, v in m.items()}))
    return {"params": params, "epochs": epochs, "seconds": time.perf_counter() - t0}


def record(n: int, out: Path, workers: int) -> None:
    """Train the first ``n`` configurations of the sequence (those in ``out`` already are kept)."""
    import multiprocessing as mp

    table = json.loads(out.read_text()) if out.is_file() else {"epochs": EPOCHS, "space": SPACE, "rows": []}
    done = {json.dumps(r["params"], sort_keys=True) for r in table["rows"]}
    todo = [p for p in configurations(n) if json.dumps(p, sort_keys=True) not in done]
    print(f"{len(table['rows'])} recorded, {len(todo)} to train", flush=True)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        for i, row in enumerate(pool.imap_unordered(_train, todo), 1):
            table["rows"].append(row)
            if i % 16 == 0 or i == len(todo):
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(table))
                os.replace(tmp, out)
                print(f"{i}/{len(todo)} in {time.perf_counter() - t0:.0f} s", flush=True)


class Table:
    def __init__(self, path: str | Path) -> None:
        import numpy as np

        data = json.loads(Path(path).read_text())
        self.rows = data["rows"]
        self.unit = np.array([to_unit(r["params"]) for r in self.rows])

    def nearest(self, params: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        d = ((self.unit - np.array(to_unit(params))) ** 2).sum(axis=1)
        return self.rows[int(d.argmin())]

    def best(self, metric: str) -> float:
        return min(e[metric] for r in self.rows for e in r["epochs"])


_TABLE: Table | None = None
PACE_S = float(os.environ.get("VAE_REPLAY_PACE", "0.05"))


def replay_fit(config: Any, data: Any, on_epoch: Any = None, *, model: Any = None, optimizer_state: Any = None,
               start_epoch: int = 1, best_score: float = math.inf, best_epoch: int | None = None,
               keep: str = "best", select: str = "val_elbo", mode: str = "min") -> Any:
    """``vae.train.fit``'s contract, the metrics read from the table (see the module's docstring)."""
    import torch

    from vae.model import BetaVAE
    from vae.train import EpochState, FitResult, check_select, improves, make_optimizer, score

    check_select(select, mode)
    row = _TABLE.nearest({"latent_dim": config.latent_dim, "beta": config.beta, "lr": config.lr})
    if model is None:
        model = BetaVAE.from_config(config)
    opt = make_optimizer(model, config.lr)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    result = FitResult(model=model, config=config, best_epoch=best_epoch)
    best = best_score
    for epoch in range(start_epoch, min(config.epochs, len(row["epochs"])) + 1):
        time.sleep(PACE_S)
        m = dict(row["epochs"][epoch - 1], epoch=epoch)
        this = score(m, select, mode)
        is_best = improves(this, best)  # fit's own rule for a better epoch
        if is_best:
            best, result.best_epoch = this, epoch
        result.history.append(m)
        state = EpochState(epoch=epoch, model=model, optimizer=opt, is_best=is_best, best_epoch=result.best_epoch,
                           best_score=best, best_state={k: v.detach().clone() for k, v in model.state_dict().items()}
                           if is_best else None)
        if on_epoch is not None and on_epoch(m, state) is False:
            break
    return result


def install(path: str | Path | None = None) -> None:
    """Replay the table at ``path`` (default ``$VAE_REPLAY_CURVES``) in place of ``vae.train.fit``."""
    global _TABLE
    import vae.train

    _TABLE = Table(path or os.environ["VAE_REPLAY_CURVES"])
    vae.train.fit = replay_fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="configurations (a power of 2 keeps Sobol balanced)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/curves.json"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    record(args.n, Path(args.out), args.workers)


if __name__ == "__main__":
    main()
