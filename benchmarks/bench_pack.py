"""K beta-VAEs stacked into one pack (``vae.pack``) against the same K trained one after another
(``vae.train.fit``), in the same run, at 1 and 2 CPU threads.

Each member is the study's default configuration (MLP 784-400-d, batch 32, shift augmentation),
with its own d, beta, lr and seed; one epoch over ``--images`` training images of the embedded
sample. Reported: training images per second summed over the K members (the training loop only,
validation left out, as ``fit`` times it), for each K, thread count and way, and the pack's
ratio to the separate runs. Rounds alternate the two ways; medians of ``--rounds``.

With ``--what validation``: a pack's validation after a round, its K members one after another
(each taken out as a single model and run through ``vae.train.evaluate_loss``, as packs did
before) against one stacked pass (``vae.pack.evaluate_stacked``), over the sample's 1,000
validation images; reported as validation images per second summed over the members.

    python benchmarks/bench_pack.py --ks 1,4,16,64 --threads 1,2 --rounds 3 --json benchmarks/results/pack_cpu.json
    python benchmarks/bench_pack.py --what validation --ks 1,4,16 --threads 1,2 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def configs(k: int, images: int, device: str = "cpu", arch: str = "mlp") -> list:
    from vae.config import TrainConfig

    return [TrainConfig(dataset="mnist-sample", max_train_images=images, epochs=1, latent_dim=2 + (7 * i) % 63,
                        beta=0.1 * (1.5 ** (i % 12)), lr=1e-4 * (1.2 ** (i % 20)), seed=i, device=device, arch=arch) for i in range(k)]


def separate(cfgs: list, data) -> float:
    from vae.train import fit

    seconds = sum(fit(c, data).train_seconds for c in cfgs)
    return len(cfgs) * len(data.train) / seconds


def stacked(cfgs: list, data) -> float:
    from vae.pack import Pack

    pack = Pack(cfgs, data)
    pack.run_epoch()
    return len(cfgs) * len(data.train) / pack.train_seconds


def validation_pair(cfgs: list, data):
    """Two ways of validating a freshly built pack of these members: (separate, stacked),
    each returning validation images per second summed over the members."""
    import time

    from vae.pack import evaluate_stacked, stacked_model
    from vae.train import evaluate_loss

    c = cfgs[0]
    x = data.val.pixels(c.device)
    model = stacked_model(c.arch, [m.latent_dim for m in cfgs], c.hidden, c.layers).to(x.device)
    betas = [m.beta for m in cfgs]

    def sync() -> None:
        if x.device.type == "cuda":
            import torch
            torch.cuda.synchronize()

    def separate_val() -> float:
        sync()
        t0 = time.perf_counter()
        for i, beta in enumerate(betas):
            evaluate_loss(model.member(i, x.device), x, beta)
        sync()
        return len(betas) * x.shape[0] / (time.perf_counter() - t0)

    def stacked_val() -> float:
        sync()
        t0 = time.perf_counter()
        evaluate_stacked(model, x, betas)
        sync()
        return len(betas) * x.shape[0] / (time.perf_counter() - t0)

    return separate_val, stacked_val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="mlp", help="mlp (batched matmuls) or conv (torch.func)")
    ap.add_argument("--what", choices=["training", "validation"], default="training")
    args = ap.parse_args()
    import torch

    from vae.data import load

    rows = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for k in map(int, args.ks.split(",")):
            cfgs = configs(k, args.images, args.device, args.arch)
            data = load(cfgs[0])
            got: dict[str, list[float]] = {"separate": [], "stacked": []}
            if args.what == "validation":
                sep, stk = validation_pair(cfgs, data)
                stk()  # warm-up: the first call pays for allocation
            for _ in range(args.rounds):
                if args.what == "validation":
                    got["separate"].append(sep())
                    got["stacked"].append(stk())
                    continue
                got["separate"].append(separate(cfgs, data))
                got["stacked"].append(stacked(cfgs, data))
            med = {way: statistics.median(v) for way, v in got.items()}
            row = {"threads": threads, "k": k, "images_per_s": got, "median": med,
                   "stacked_over_separate": med["stacked"] / med["separate"]}
            rows.append(row)
            print(f"threads {threads}  K {k:>3}  separate {med['separate']:>9,.0f} img/s  stacked "
                  f"{med['stacked']:>9,.0f} img/s  ratio {row['stacked_over_separate']:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"what": args.what, "arch": args.arch, "device": args.device, "images": args.images, "rounds": args.rounds, "rows": rows,
                                         "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
