"""What a bucket outage costs a study: the same study in a bucket with and without an outage, in
the same run.

A study of 8 trials x 4 epochs (ASHA, no refit, 400 images, 2 CPUs) on moto's S3 server on
127.0.0.1, run through the CLI as a user runs it. In the outage rounds the fault layer answers
every request 503 SlowDown, 500 InternalError or with a dropped connection for ``--outage``
seconds from the first trials row on; the study's patience (``--storage-patience``) is longer.
Rounds alternate (plain, outage). Reported: each study's wall seconds, the median of each kind,
and the cost: the outage kind's median minus the plain one's.

    python benchmarks/bench_outage.py --rounds 2 --outage 60 --json benchmarks/results/outage.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

STUDY = ("--trials", "8", "--epochs", "4", "--num-cpus", "2", "--max-train-images", "400", "--no-refit")


def one(kind: str, outage: float, patience: float, tmp: str, i: int) -> dict:
    from conftest import run_cli
    from s3 import BUCKET, s3_endpoint

    control: list = []
    with s3_endpoint(control=control) as (_, counts):
        if kind == "outage":
            control[0].outage(outage, after=r"/trials/")
        t0 = time.monotonic()
        r = run_cli("run", "--name", f"{kind}{i}", "--storage", f"s3://{BUCKET}/bench", *STUDY,
                    "--storage-patience", str(patience), env={"VAE_STUDY_CACHE": f"{tmp}/{kind}{i}"}, timeout=1800)
        wall = time.monotonic() - t0
        if r.returncode != 0:
            raise SystemExit(f"{kind} round {i} failed: {r.stderr[-2000:]}")
        lines = [ln for ln in r.stdout.splitlines() if "reachable again after" in ln or "unreachable since" in ln]
        return {"kind": kind, "wall_s": round(wall, 2), "outage_requests": counts.get("outage requests", 0),
                "requests": counts["requests"], "lines": lines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--patience", type=float, default=120.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        for i in range(args.rounds):
            for kind in ("plain", "outage"):
                runs.append(one(kind, args.outage, args.patience, tmp, i))
                print(json.dumps(runs[-1]), flush=True)
    med = {k: statistics.median(r["wall_s"] for r in runs if r["kind"] == k) for k in ("plain", "outage")}
    out = {"outage_s": args.outage, "patience_s": args.patience, "runs": runs, "median_wall_s": med,
           "cost_s": round(med["outage"] - med["plain"], 2)}
    print(f"median wall: {med['plain']:.1f} s without, {med['outage']:.1f} s with a {args.outage:g} s outage: "
          f"it cost {out['cost_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
