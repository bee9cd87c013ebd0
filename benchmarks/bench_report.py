"""Report time: `vae-study report` on a finished 16-trial study, cold and with its cache; and the
t-SNE of 10,000 latent means, openTSNE (what the report uses) against scikit-learn.

    python benchmarks/bench_report.py            # runs the 16-trial mnist-sample study first
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
FASHION = Path("/usr/share/datasets/fashion-mnist")


def cli(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "study", *args], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t0


def tsne_10k() -> dict[str, float]:
    """Latent means of 10,000 test images (fashion-mnist's full test split, or the sample's 1,000
    tiled with jitter when it is not installed) through a briefly trained MLP encoder."""
    import numpy as np
    from sklearn.manifold import TSNE

    from analysis.compute import tsne
    from vae.config import TrainConfig
    from vae.data import load
    from vae.evaluate import encode
    from vae.train import fit

    if FASHION.exists():
        config = TrainConfig(dataset="fashion-mnist", data_dir=str(FASHION), epochs=1, latent_dim=16, device="cpu")
    else:
        config = TrainConfig(dataset="mnist-sample", epochs=3, latent_dim=16, device="cpu")
    data = load(config)
    model = fit(config, data).model
    mu = encode(model, data.test.pixels())[0].numpy()
    if len(mu) < 10000:
        rng = np.random.default_rng(0)
        mu = np.concatenate([mu + 0.01 * rng.standard_normal(mu.shape) for _ in range(10000 // len(mu) + 1)])[:10000]
    out = {"points": float(len(mu))}
    t0 = time.perf_counter()
    tsne(mu, seed=0)
    out["opentsne_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    TSNE(n_components=2, perplexity=30, init="pca", random_state=0).fit_transform(mu)
    out["sklearn_seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args()
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        res["study_seconds"] = cli("run", "--name", "r16", "--storage", tmp, "--trials", "16", "--epochs", "15",
                                   "--num-cpus", "2")
        folder = Path(tmp) / "r16"
        res["report_cold_seconds"] = cli("report", str(folder))
        res["report_cached_seconds"] = cli("report", str(folder))
        summary = json.loads((folder / "report" / "summary.json").read_text())
        res["report_inside_seconds_cached"] = summary["seconds"]
        shutil.rmtree(folder / "report")
    res.update(tsne_10k())
    print(f"16-trial study: {res['study_seconds']:.0f} s")
    print(f"vae-study report, cold (t-SNE of the 1,000-image test split included): {res['report_cold_seconds']:.1f} s")
    print(f"vae-study report, second run (arrays from the cache):                  {res['report_cached_seconds']:.1f} s")
    print(f"t-SNE of {int(res['points'])} latent means: openTSNE {res['opentsne_seconds']:.1f} s, "
          f"scikit-learn {res['sklearn_seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
