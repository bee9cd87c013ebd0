"""Quality levers, one configuration at a time: test PSNR of single training runs, every seed.

Each row trains one configuration on mnist-sample (3,200 training / 800 validation images) with
``vae.train.fit`` for ``--epochs`` epochs, keeps the best validation -ELBO epoch (as a study's
trial does) and evaluates it on the fixed 1,000-image test split: mean per-digit PSNR of the
posterior mean, and the number of digits whose MSE is below the reference project's d = 15 row.
A lever's gain is its PSNR minus the base row's, per seed, so the seeds' own noise cancels.

    python benchmarks/bench_levers.py --json benchmarks/results/levers.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# What each lever changes, on top of BASE (the default space's high-d, low-beta corner, where a
# reconstruction study's winners land).
BASE = {"latent_dim": 32, "beta": 0.1, "lr": 2e-3, "batch_size": 128}
LEVERS = {
    "base (batch 128, constant lr, no augmentation)": {},
    "cosine lr": {"lr_schedule": "cosine"},
    "one-cycle lr": {"lr_schedule": "onecycle"},
    "augment shift (±1 px)": {"augment": "shift"},
    "augment affine (±2 px, 10°, 10%)": {"augment": "affine"},
    "mlp 2 layers": {"layers": 2},
    "batch 32": {"batch_size": 32},
    "batch 32 + shift": {"batch_size": 32, "augment": "shift"},
    "batch 32 + shift + cosine": {"batch_size": 32, "augment": "shift", "lr_schedule": "cosine"},
    "batch 32 + shift + cosine, d = 64": {"batch_size": 32, "augment": "shift", "lr_schedule": "cosine",
                                          "latent_dim": 64},
}


def run_one(values: dict, epochs: int) -> dict:
    import torch

    from analysis.metrics import digits_beaten
    from vae.config import TrainConfig
    from vae.data import load
    from vae.evaluate import evaluate_split
    from vae.train import fit

    torch.set_num_threads(1)
    cfg = TrainConfig(**{"dataset": "mnist-sample", "epochs": epochs, **values})
    data = load(cfg)
    t0 = time.perf_counter()
    fitted = fit(cfg, data)
    seconds = time.perf_counter() - t0
    pm = evaluate_split(fitted.model, data.test, modes=("posterior_mean",))["modes"]["posterior_mean"]
    mse = {row["digit"]: row["mse"] for row in pm["per_digit"]}
    return {"psnr": pm["mean_psnr"], "mse": pm["mean_mse"], "digits_beaten": digits_beaten(mse),
            "best_epoch": fitted.best_epoch, "val_mse": fitted.best["val_mse"], "val_elbo": fitted.best["val_elbo"],
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", help="lever names to run (default: all)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    rows = []
    levers = {k: v for k, v in LEVERS.items() if not args.only or k in args.only}
    for seed in args.seeds:
        for name, change in levers.items():
            r = run_one({**BASE, **change, "seed": seed}, args.epochs)
            rows.append({"lever": name, "seed": seed, **r})
            print(json.dumps(rows[-1]), flush=True)
    base_name = next(iter(LEVERS))
    base = {r["seed"]: r["psnr"] for r in rows if r["lever"] == base_name}
    print(f"\n| lever | PSNR per seed ({', '.join(map(str, args.seeds))}) | gain vs base, per seed | mean gain "
          f"| digits beaten per seed | s per run |")
    print("|---|---|---|---|---|---|")
    for name in levers:
        rs = [r for r in rows if r["lever"] == name]
        gains = [r["psnr"] - base[r["seed"]] for r in rs if r["seed"] in base]
        psnrs = ", ".join(f"{r['psnr']:.2f}" for r in rs)
        per_seed = ", ".join(f"{g:+.2f}" for g in gains)
        beaten = ", ".join(str(r["digits_beaten"]) for r in rs)
        seconds = statistics.mean(r["seconds"] for r in rs)
        print(f"| {name} | {psnrs} | {per_seed} | {statistics.mean(gains):+.2f} | {beaten} | {seconds:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": BASE, "epochs": args.epochs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
