"""Study overhead: a 16-trial study's wall time against the ideal, with the overhead broken down.

ideal = (sum of the trials' own training seconds) / (parallel slots). The trials' training
seconds are measured inside the trials (the training loop of every epoch), so the ratio
wall / ideal is what Ray start-up, actor start, imports, data loading, validation, per-digit
evaluation, checkpoints and Parquet writes cost on top.

    python benchmarks/bench_study.py                       # 16 trials x 15 epochs, mlp, mnist-sample, no ASHA
    python benchmarks/bench_study.py --arch conv --epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--asha", action="store_true", help="keep ASHA on (default: off, so every trial runs all epochs)")
    ap.add_argument("--no-refit", action="store_true", help="turn the winner's refit off (default: on, as in the tool)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    t_import = time.perf_counter()
    import ray

    from study import cluster, results
    from study.runner import recipes
    from study.spec.spec import build_spec
    import_seconds = time.perf_counter() - t_import

    with tempfile.TemporaryDirectory() as tmp:
        spec = build_spec(None, {"name": "bench", "storage": tmp, "trials": args.trials, "epochs": args.epochs,
                                 "arch": args.arch, "num_cpus": args.num_cpus,
                                 "scheduler": None if args.asha else "none", "refit": not args.no_refit})
        t0 = time.perf_counter()
        t0_unix = time.time()
        res = recipes.run(spec, printer=lambda s: None)  # starts Ray, as the CLI does
        wall = time.perf_counter() - t0
        slots = cluster.slots(spec, cluster.view())
        trials = results.load(res.folder)
        epochs = results.load(res.folder, "epochs")
        ray.shutdown()

    # Ray start, the driver's checks and Tune's set-up: until the driver starts the first trial
    before_first = float(trials["started_at"].min().timestamp()) - t0_unix
    search_end = float(trials.loc[trials["status"] != results.REFIT, "finished_at"].max().timestamp()) - t0_unix
    refit = trials[trials["status"] == results.REFIT]
    trials = trials[trials["status"] != results.REFIT]
    # the refit is training too: the ideal counts it, as one more piece of work for the slots
    train = float(trials["train_seconds"].sum()) + float(refit["train_seconds"].sum())
    val = float(epochs["val_seconds"].sum())
    setup = float(trials["setup_seconds"].sum())
    report = float(trials["report_seconds"].sum())
    ckpt = float(trials["checkpoint_seconds"].sum())
    ideal = train / slots
    out = {
        "trials": len(trials), "epochs": int(len(epochs)), "arch": args.arch, "slots": slots,
        "wall_seconds": wall, "ideal_seconds": ideal, "ratio": wall / ideal,
        "breakdown_seconds": {
            "before the first trial (Ray start, driver checks, Tune set-up)": before_first,
            "driver_imports": import_seconds,
            "trial_setup_per_slot (imports, data, model; in the trial)": setup / slots,
            "validation_per_slot (in the trial, every epoch)": val / slots,
            "tune.report round trips per slot (in the trial, waiting for the driver)": report / slots,
            "checkpoints per slot (in the trial: per-digit test eval, saving)": ckpt / slots,
            "parquet_writes (driver, overlaps trials)": res.write_seconds,
            "rest (outside trials: actor start, hand-over, driver set-up, refit set-up, compaction)":
                wall - before_first - ideal - (setup + val + report + ckpt) / slots,
        },
        "refit_train_seconds": float(refit["train_seconds"].sum()),
        # the search alone (its last trial's end), without the refit and compaction after it
        "search_wall_seconds": search_end,
        "search_ideal_seconds": (train - float(refit["train_seconds"].sum())) / slots,
        # issue 13's figure: slot-seconds per trial not spent in the trials' training loops
        "overhead_slot_seconds_per_trial": (wall * slots - train) / len(trials),
        "first_setup_seconds": float(trials.sort_values("started_at")["setup_seconds"].iloc[0]),
        "median_setup_seconds": float(trials["setup_seconds"].median()),
    }
    # the search's slots left idle between its first trial's start and its last trial's end:
    # hand-overs between trials, and the tail, when fewer trials are left than slots
    spans = sorted((float(r.started_at.timestamp()) - t0_unix, float(r.finished_at.timestamp()) - t0_unix)
                   for r in trials.itertuples())
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    running, last, short = 0, events[0][0], 0.0
    for t, step in events:
        if running < slots:
            short += t - last
        running, last = running + step, t
    out["search_idle_slot_seconds"] = slots * (search_end - before_first) - sum(b - a for a, b in spans)
    out["search_seconds_under_full"] = short  # seconds with fewer trials running than slots
    search_train = train - out["refit_train_seconds"]
    out["search_ratio"] = out["search_wall_seconds"] / out["search_ideal_seconds"]
    out["search_overhead_slot_seconds_per_trial"] = (out["search_wall_seconds"] * slots - search_train) / len(trials)
    print(f"{out['trials']} trials x {args.epochs} epochs ({args.arch}, {slots} slots): wall {wall:.1f} s, "
          f"ideal {ideal:.1f} s -> {out['ratio']:.2f}x; overhead {out['overhead_slot_seconds_per_trial']:.2f} "
          "slot-seconds per trial (wall x slots - training) / trials")
    print(f"the search alone (to its last trial's end): wall {out['search_wall_seconds']:.1f} s, ideal "
          f"{out['search_ideal_seconds']:.1f} s -> {out['search_ratio']:.2f}x; overhead "
          f"{out['search_overhead_slot_seconds_per_trial']:.2f} slot-seconds per trial; the refit trained "
          f"{out['refit_train_seconds']:.1f} s")
    print(f"the search's idle slot-seconds: {out['search_idle_slot_seconds']:.1f} (fewer trials running than "
          f"slots for {out['search_seconds_under_full']:.1f} s)")
    for k, v in out["breakdown_seconds"].items():
        print(f"  {k:<62} {v:7.2f} s")
    print(f"  trial set-up: first {out['first_setup_seconds']:.2f} s (cold worker), median {out['median_setup_seconds']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
