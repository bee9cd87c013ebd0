"""Trainer throughput: vae.train.fit against the canonical PyTorch loop, in one run, on the same data.

Canonical loop: torchvision dataset + DataLoader + ToTensor, the same MLP 784-400-20, Adam, batch 128.
Also measures this machine's fp32 matmul limit, and what fraction of it fit reaches at batch 512
(about 3.9 MFLOP per image per training step for this MLP: 3 x the forward pass's 1.30 MFLOP).

    python benchmarks/bench_trainer.py            # fashion-mnist IDX (48k train images) if installed, else mnist-sample
    python benchmarks/bench_trainer.py --json out.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.config import TrainConfig  # noqa: E402
from vae.data import load  # noqa: E402
from vae.loss import beta_vae_loss  # noqa: E402
from vae.model import BetaVAE  # noqa: E402
from vae.train import fit  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


def flops_per_image(d: int = 20, hidden: int = 400) -> float:
    macs = 784 * hidden + 2 * hidden * d + d * hidden + hidden * 784
    return 3 * 2 * macs  # forward + backward (about 2x forward)


def matmul_limit(n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained fp32 GFLOP/s of torch.mm on this machine's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def canonical_loop(root: Path, cls: type, batch: int, max_images: int, device: str = "cpu") -> float:
    """pytorch/examples style: per-item ToTensor through a DataLoader, each batch moved to the
    device. Returns images/s."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    ds = cls(str(root), train=True, download=False, transform=transforms.ToTensor())
    n = min(len(ds), max_images)
    loader = DataLoader(Subset(ds, range(n)), batch_size=batch, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = BetaVAE("mlp", 20, 400).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen, t0 = 0, time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        logits, mu, logvar = model(x)
        loss, _, _ = beta_vae_loss(logits, x, mu, logvar, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += x.shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def ours(config: TrainConfig) -> float:
    data = load(config)
    result = fit(config, data)
    # steady state: the epochs after the first (which pays one-off allocation and warm-up)
    return float(np.median([h["images_per_second"] for h in result.history[1:]]))


def torchvision_root(dataset: str, tmp: Path) -> tuple[Path, type]:
    import torchvision

    if dataset == "fashion-mnist":
        raw = tmp / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in FASHION.glob("*.gz"):
            with gzip.open(f, "rb") as src, open(raw / f.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return tmp, torchvision.datasets.FashionMNIST
    # mnist-sample: write its training part as IDX so torchvision's MNIST class reads it
    import struct

    data = load(TrainConfig(dataset="mnist-sample"))
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x = torch.cat([data.train.images, data.val.images]).numpy()
    y = torch.cat([data.train.labels, data.val.labels]).numpy().astype(np.uint8)
    for name, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", data.test.images.numpy()),
                      ("t10k-labels-idx1-ubyte", data.test.labels.numpy().astype(np.uint8))):
        (raw / name).write_bytes(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())
    return tmp, torchvision.datasets.MNIST


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("fashion-mnist", "mnist-sample"),
                    default="fashion-mnist" if FASHION.exists() else "mnist-sample")
    ap.add_argument("--canonical-images", type=int, default=20000, help="images the canonical loop trains on")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", action="store_true", help="also print where a batch-128 training step spends its time")
    args = ap.parse_args()

    data_dir = str(FASHION) if args.dataset == "fashion-mnist" else None
    base = TrainConfig(dataset=args.dataset, data_dir=data_dir, arch="mlp", latent_dim=20, hidden=400,
                       epochs=3, device="cpu")
    rounds: dict[str, list[float]] = {"canon": [], "b128": [], "b512": [], "limit": []}
    with tempfile.TemporaryDirectory() as tmp:
        root, cls = torchvision_root(args.dataset, Path(tmp))
        # Interleaved rounds, so a noisy neighbour on this shared machine hits both sides alike.
        for _ in range(args.rounds):
            rounds["canon"].append(canonical_loop(root, cls, 128, args.canonical_images))
            rounds["b128"].append(ours(base.replace(batch_size=128)))
            rounds["b512"].append(ours(base.replace(batch_size=512)))
            rounds["limit"].append(matmul_limit())
    canon_128, ours_128, ours_512, limit = (float(np.median(rounds[k])) for k in ("canon", "b128", "b512", "limit"))
    fpi = flops_per_image()
    res = {
        "dataset": args.dataset,
        "n_train": len(load(base).train),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "canonical_b128_img_s": canon_128,
        "fit_b128_img_s": ours_128,
        "speedup_b128": ours_128 / canon_128,
        "speedup_b128_paired_median": float(np.median(np.array(rounds["b128"]) / np.array(rounds["canon"]))),
        "speedup_b128_paired_range": [float(min(np.array(rounds["b128"]) / np.array(rounds["canon"]))),
                                      float(max(np.array(rounds["b128"]) / np.array(rounds["canon"])))],
        "fit_b512_img_s": ours_512,
        "fit_b512_gflops": ours_512 * fpi / 1e9,
        "matmul_limit_gflops": limit,
        "fraction_of_limit_b512": ours_512 * fpi / 1e9 / limit,
        "mflop_per_image": fpi / 1e6,
        "rounds": rounds,
    }
    print(f"dataset {res['dataset']} ({res['n_train']} training images), {res['threads']} threads, "
          f"torch {res['torch']}, median of {args.rounds} interleaved rounds")
    print(f"canonical DataLoader loop, batch 128: {canon_128:10.0f} img/s")
    lo, hi = res["speedup_b128_paired_range"]
    print(f"vae.train.fit, batch 128:            {ours_128:10.0f} img/s  ({res['speedup_b128']:.2f}x; "
          f"per round {lo:.2f}x-{hi:.2f}x, median {res['speedup_b128_paired_median']:.2f}x)")
    print(f"vae.train.fit, batch 512:            {ours_512:10.0f} img/s  = {res['fit_b512_gflops']:.1f} GFLOP/s")
    print(f"fp32 matmul limit (torch.mm 2048):   {limit:10.1f} GFLOP/s -> {100 * res['fraction_of_limit_b512']:.0f}% of it at batch 512")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        small = base.replace(batch_size=128, epochs=1, max_train_images=128 * 100)
        data = load(small)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fit(small, data)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(table)
        res["profile_b128"] = table
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
