"""The GPU numbers of BENCHMARKS §7, in one run (benchmarks/gpu_check.sh calls this).

1. Trainer images per second at batch 32, 128 and 1024 against the canonical DataLoader loop
   (per-item ToTensor, each batch copied to the device) at the same batch, on the same device.
2. Trials packed on one GPU: the same 16-trial study (ASHA off, no refit) at
   --gpus-per-trial 1, 0.5, 0.25 and 0.125, wall time of each.
3. The seed-replication preset at full size, if MNIST's IDX files are in --mnist-dir.

    python benchmarks/bench_gpu.py --json gpu.json                    # on a machine with CUDA
    python benchmarks/bench_gpu.py --device cpu --quick --json x.json # a dry run of the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_trainer import FASHION, canonical_loop, ours, torchvision_root  # noqa: E402
from vae.config import TrainConfig  # noqa: E402


def trainer_rows(device: str, dataset: str, batches: list[int], canonical_images: int, epochs: int) -> list[dict]:
    data_dir = str(FASHION) if dataset == "fashion-mnist" else None
    base = TrainConfig(dataset=dataset, data_dir=data_dir, arch="mlp", latent_dim=20, hidden=400, epochs=epochs,
                       device=device, augment="none")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root, cls = torchvision_root(dataset, Path(tmp))
        for b in batches:
            canon = canonical_loop(root, cls, b, canonical_images, device)
            fit = ours(base.replace(batch_size=b))
            rows.append({"batch": b, "canonical_img_s": canon, "fit_img_s": fit, "speedup": fit / canon})
            print(f"batch {b:5d}: canonical {canon:10.0f} img/s, vae.train.fit {fit:10.0f} img/s ({fit / canon:.2f}x)",
                  flush=True)
    return rows


def study_wall(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    storage = Path(args.work) / "studies"
    cmd = [sys.executable, "-m", "study", "run", "--name", name, "--storage", str(storage), "--overwrite",
           "--no-refit", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"name": name, "args": extra, "wall_s": round(wall, 1), "rc": p.returncode}
    if p.returncode != 0:
        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
    else:
        import pandas as pd

        df = pd.read_parquet(storage / name / "trials")
        row["trials"] = len(df)
        row["sum_train_s"] = round(float(df["train_seconds"].sum()), 1) if "train_seconds" in df else None
        row["devices"] = sorted(df["device"].dropna().unique().tolist()) if "device" in df else None
        if "test_psnr" in df:
            row["best_test_psnr"] = round(float(df["test_psnr"].max()), 2)
    print(f"{name}: {row}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the numbers")
    ap.add_argument("--mnist-dir", default=os.environ.get("MNIST_DIR"), help="MNIST's IDX files (seed-replication)")
    ap.add_argument("--work", default=tempfile.mkdtemp(prefix="vae-gpu-"))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here (pass --device cpu for a dry run)")
    dataset = "fashion-mnist" if FASHION.exists() else "mnist-sample"
    res: dict = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
                 "torch": torch.__version__, "dataset": dataset, "quick": args.quick}
    t0 = time.perf_counter()
    res["trainer"] = trainer_rows(args.device, dataset, [32, 128, 1024],
                                  2000 if args.quick else 20000, 2 if args.quick else 3)
    n, epochs = (4, 2) if args.quick else (16, 5)
    data = ["--dataset", dataset] + (["--data-dir", str(FASHION)] if dataset == "fashion-mnist" else [])
    if args.quick:
        data += ["--max-train-images", "600"]
    gpu = args.device.startswith("cuda")
    res["packing"] = []
    for share in (1, 0.5, 0.25, 0.125):
        extra = [*data, "--trials", str(n), "--epochs", str(epochs), "--no-early-stopping", "--seed", "0",
                 "--batch-size", "128", "--device", args.device]
        extra += ["--gpus-per-trial", str(share), "--cpus-per-trial", "1"] if gpu else ["--num-cpus", "2"]
        res["packing"].append({"gpus_per_trial": share, **study_wall(args, f"pack-{share}", extra)})
        if not gpu:
            break  # nothing to pack without a GPU
    mnist = Path(args.mnist_dir) if args.mnist_dir else None
    if mnist and mnist.is_dir() and not args.quick:
        res["seed_replication"] = study_wall(args, "seed-replication", ["--preset", "seed-replication", "--dataset",
                                                                        "mnist", "--data-dir", str(mnist),
                                                                        "--device", args.device])
    else:
        res["seed_replication"] = "skipped: no MNIST IDX files (--mnist-dir)" if not args.quick else "skipped: --quick"
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
