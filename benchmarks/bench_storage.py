"""A study in a bucket against the same study in a local folder, in the same run.

The README's study (16 trials x 15 epochs, ASHA on, mnist-sample, 2 CPUs), once with
``--storage`` a local folder and once with ``s3://`` on moto's S3 server on 127.0.0.1, rounds
interleaved. Each study runs in its own driver process (``vae-study run``), as a user runs it.
Reported: wall seconds of each, their ratio, and the Optuna snapshot's cost per trial (the
driver's time publishing snapshots to the bucket, divided by trials).

    python benchmarks/bench_storage.py --rounds 2 --json benchmarks/results/storage.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

PROBE = """
import json, sys, time
from study import cluster
from study.runner import recipes
from study.spec.spec import build_spec
spec = build_spec(None, json.loads(sys.argv[1]))
t0 = time.perf_counter()
res = recipes.run(spec, printer=lambda s: None)
print(json.dumps({"wall": time.perf_counter() - t0, "publish_seconds": res.publish_seconds,
                  "publishes": res.publishes, "write_seconds": res.write_seconds, "trials": len(res.trials)}))
"""


def one(storage: str, name: str, args: argparse.Namespace) -> dict:
    spec = {"name": name, "storage": storage, "trials": args.trials, "epochs": args.epochs, "num_cpus": args.num_cpus}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    from s3 import s3_server

    runs: dict[str, list[dict]] = {"local": [], "s3": []}
    with s3_server(), tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind in (("local", "s3") if r % 2 == 0 else ("s3", "local")):
                storage = tmp if kind == "local" else "s3://studies/bench"
                got = one(storage, f"{kind}{r}", args)
                runs[kind].append(got)
                print(f"round {r} {kind:<5} wall {got['wall']:6.1f} s (process {got['process_seconds']:.1f} s), "
                      f"{got['publishes']} snapshots in {got['publish_seconds']:.2f} s, "
                      f"parquet writes {got['write_seconds']:.2f} s", flush=True)
    local = statistics.median(x["wall"] for x in runs["local"])
    s3 = statistics.median(x["wall"] for x in runs["s3"])
    per_trial = [x["publish_seconds"] / x["trials"] for x in runs["s3"]]
    per_snapshot = [x["publish_seconds"] / max(1, x["publishes"]) for x in runs["s3"]]
    out = {"trials": args.trials, "epochs": args.epochs, "rounds": args.rounds, "runs": runs,
           "median_wall_local": local, "median_wall_s3": s3, "ratio_s3_to_local": s3 / local,
           "snapshot_seconds_per_trial": statistics.median(per_trial),
           "snapshot_seconds_each": statistics.median(per_snapshot)}
    print(f"median wall: local {local:.1f} s, s3 {s3:.1f} s -> {s3 / local:.2f}x; Optuna snapshot "
          f"{1000 * out['snapshot_seconds_per_trial']:.1f} ms per trial ({1000 * out['snapshot_seconds_each']:.1f} ms each)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
