"""Run one `vae-study` command and say where its wall went: one line per study.

    python benchmarks/study_wall.py --label NAME -- run --name big --storage S --trials 64 ...

Prints ``study <label>: wall W s, N trials (statuses), E epochs, training T s summed (busy B% of
the wall), I images trained (I/W per second), packs: largest round R, mean M`` from the study's
own tables; the command's exit code is the script's. Used by benchmarks/gpu_check.sh (BENCHMARKS §7).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then vae-study's arguments")
    args = ap.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "study", *cli], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    name, storage = cli[cli.index("--name") + 1], cli[cli.index("--storage") + 1]
    if proc.returncode != 0:
        print(f"study {args.label}: exit {proc.returncode} after {wall:.1f} s: {proc.stderr.strip()[-300:]}")
        return proc.returncode
    from study import results

    folder = Path(storage) / name
    trials = results.search_trials(results.load(folder))
    epochs = results.load(folder, "epochs")
    images = float((epochs["images_per_second"] * epochs["seconds"]).sum())
    train = float(trials["train_seconds"].sum())
    statuses = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
    packs = epochs["pack_members"].dropna() if "pack_members" in epochs else []
    pack = f"largest round {int(packs.max())}, mean {packs.mean():.1f}" if len(packs) else "none"
    first = next((line for line in proc.stdout.splitlines() if line.startswith("pack:")), "")
    print(f"study {args.label}: wall {wall:.1f} s, {len(trials)} trials ({statuses}), {len(epochs)} epochs, "
          f"training {train:.1f} s summed, {images:,.0f} images trained ({images / wall:,.0f}/s of wall); "
          f"packs: {pack} {first}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
