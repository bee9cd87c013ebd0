"""Query speed: `vae-study results --top 10 --sort val_elbo` over 10,000 synthetic trials x 15 epochs.

The folder is written in the real schema with the real writer (one file per trial per table),
then queried as a user would (a subprocess, Python start-up included), before and after
`vae-study compact`. Both answers must be identical.

    python benchmarks/bench_query.py                   # 10,000 trials (about 2 minutes to write)
    python benchmarks/bench_query.py --trials 2000
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from study import results  # noqa: E402


def synthesize(root: Path, n_trials: int, n_epochs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    study = "synthetic"
    folder = root / study
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"name": study, "storage": str(root)}))
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(n_trials):
        tid = f"{i:08x}"
        d, beta, lr = int(rng.integers(2, 33)), float(10 ** rng.uniform(-2, 1)), float(10 ** rng.uniform(-4, -2.5))
        base = 100 + 60 * rng.random()
        epochs = [{"epoch": e, "train_loss": base + 40 / e, "train_recon": base, "train_kl": 10.0,
                   "val_loss": base + 35 / e, "val_elbo": base + 30 / e, "val_recon": base - 10, "val_kl": 10 + e / 10,
                   "val_mse": 0.02 + 0.01 / e, "seconds": 0.3, "val_seconds": 0.03, "images_per_second": 12000.0}
                  for e in range(1, n_epochs + 1)]
        best = epochs[-1]
        digits = [{"split": "test", "recon_mode": m, "digit": k, "n_images": 100, "mse": 0.02, "psnr": 17.0}
                  for m in ("posterior_mean", "posterior_sample") for k in range(10)]
        trial = {"status": "completed", "param_latent_dim": d, "param_beta": beta, "param_lr": lr,
                 "param_batch_size": 128, "param_arch": "mlp", "param_hidden": 400, "param_epochs": n_epochs,
                 "param_seed": 0, "dataset": "mnist-sample", "best_epoch": n_epochs, "epochs_run": n_epochs,
                 **{k: best[k] for k in ("val_elbo", "val_recon", "val_kl", "val_mse")},
                 "test_elbo": best["val_elbo"], "test_mse": 0.02, "test_psnr": 17.0, "objective": best["val_elbo"],
                 "train_seconds": 4.5, "images_per_second": 12000.0, "attempts": 1, "node": "n", "hostname": "h",
                 "device": "cpu", "started_at": t0 + timedelta(seconds=5 * i),
                 "finished_at": t0 + timedelta(seconds=5 * i + 5)}
        results.write_trial(folder, tid, trial, epochs, digits)
    return folder


def time_query(folder: Path, repeats: int) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "study", "results", str(folder), "--top", "10", "--sort", "val_elbo", "--format", "csv"]
    times, out = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t0)
        out = r.stdout
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = synthesize(Path(tmp), args.trials, args.epochs)
        write_s = time.perf_counter() - t0
        before, out_before = time_query(folder, args.repeats)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "study", "compact", str(folder)], cwd=REPO, check=True, capture_output=True)
        compact_s = time.perf_counter() - t0
        after, out_after = time_query(folder, args.repeats)
        baseline_t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import pandas, pyarrow.parquet"], check=True)
        import_floor = time.perf_counter() - baseline_t0
    assert out_before == out_after, "compaction changed the answer"
    res = {"trials": args.trials, "epochs": args.epochs, "write_seconds": write_s,
           "query_seconds_per_trial_files": before, "compact_seconds": compact_s,
           "query_seconds_compacted": after, "python_pandas_pyarrow_import_seconds": import_floor}
    print(f"{args.trials} trials x {args.epochs} epochs written in {write_s:.0f} s")
    print(f"results --top 10 --sort val_elbo, one file per trial: {before:.2f} s (median of {args.repeats})")
    print(f"vae-study compact:                                   {compact_s:.2f} s")
    print(f"results --top 10 --sort val_elbo, compacted:         {after:.2f} s  (same answer)")
    print(f"floor: python + import pandas, pyarrow:              {import_floor:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
